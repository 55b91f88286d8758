//! Limits at the edge: how many sockets may be open (in all, per user),
//! how fast one client address may upgrade, and whether the server still
//! takes sockets at all (not once shutdown began).
//!
//! [`Gate`] is the one place a socket's slot is taken and given back, so it
//! also knows when the last socket is gone: shutdown waits on it instead of
//! tracking each socket task (no per-socket cost). The per-user and per-IP
//! books exist only when their flag is set; off, a slot is one atomic add.
//!
//! A leaf: it knows counts and addresses, nothing of HTTP or sockets.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use dashmap::DashMap;
use tokio::sync::Notify;

/// The peer address of an HTTP connection, put in its requests' extensions
/// when `--max-upgrades-per-ip` is set (and only then).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Why a socket may not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many open connections; retry later")]
    Full,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("too many open sockets for this user")]
    TooManyForUser,
}

/// Sockets open per user, with their ceiling (`--max-sockets-per-user`).
struct PerUser {
    max: u32,
    open: DashMap<Arc<str>, u32>,
}

/// Upgrades per client address in the current second
/// (`--max-upgrades-per-ip`): (second, count) per address.
struct PerIp {
    max: u32,
    seen: DashMap<IpAddr, (u64, u32)>,
    /// The second the map was last pruned of older entries.
    pruned: AtomicU64,
}

/// Entries kept before old seconds are pruned from the per-IP book.
const PER_IP_PRUNE_AT: usize = 4096;

/// Socket slots, the per-user and per-IP books, and the shutdown latch.
pub struct Gate {
    max_connections: usize,
    open: AtomicUsize,
    shutting_down: AtomicBool,
    /// Woken when the last slot is given back during shutdown.
    idle: Notify,
    per_user: Option<PerUser>,
    per_ip: Option<PerIp>,
}

fn now_secs() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

impl Gate {
    /// `None` / 0 turns a book off.
    pub fn new(max_connections: usize, per_user: Option<u32>, per_ip: Option<u32>) -> Gate {
        Gate {
            max_connections,
            open: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            idle: Notify::new(),
            per_user: per_user.filter(|n| *n > 0).map(|max| PerUser {
                max,
                open: DashMap::new(),
            }),
            per_ip: per_ip.filter(|n| *n > 0).map(|max| PerIp {
                max,
                seen: DashMap::new(),
                pruned: AtomicU64::new(0),
            }),
        }
    }

    /// Open (or upgrading) sockets.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Whether upgrades from `ip` are counted at all (the flag is set).
    pub fn limits_ips(&self) -> bool {
        self.per_ip.is_some()
    }

    /// Takes a slot for one of `user`'s sockets; give it back with
    /// [`Gate::give_back`] with the same user.
    pub fn take(&self, user: &Arc<str>) -> Result<(), Refusal> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(Refusal::ShuttingDown);
        }
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
            self.release_count();
            return Err(Refusal::Full);
        }
        if let Some(p) = &self.per_user {
            let mut n = p.open.entry(user.clone()).or_insert(0);
            if *n >= p.max {
                // The oldest sockets stay; the new one is refused.
                drop(n);
                self.release_count();
                return Err(Refusal::TooManyForUser);
            }
            *n += 1;
        }
        Ok(())
    }

    pub fn give_back(&self, user: &str) {
        if let Some(p) = &self.per_user {
            if let Some(mut n) = p.open.get_mut(user) {
                *n = n.saturating_sub(1);
            }
            p.open.remove_if(user, |_, n| *n == 0);
        }
        self.release_count();
    }

    fn release_count(&self) {
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 && self.is_shutting_down() {
            self.idle.notify_waiters();
        }
    }

    /// Counts an upgrade from `ip`; false when it is over the per-second
    /// ceiling (always true when the flag is off).
    pub fn allow_upgrade_from(&self, ip: IpAddr) -> bool {
        let Some(p) = &self.per_ip else {
            return true;
        };
        let now = now_secs();
        let allowed = {
            let mut e = p.seen.entry(ip).or_insert((now, 0));
            if e.0 != now {
                *e = (now, 0);
            }
            e.1 = e.1.saturating_add(1);
            e.1 <= p.max
        };
        if p.seen.len() > PER_IP_PRUNE_AT && p.pruned.swap(now, Ordering::Relaxed) != now {
            p.seen.retain(|_, (sec, _)| *sec == now);
        }
        allowed
    }

    /// From now on every [`Gate::take`] is refused. Whoever took a slot
    /// before must check [`Gate::is_shutting_down`] once joined (see
    /// `ws::Subscription::join`), so no socket misses its close.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Waits until every slot is given back (after [`Gate::begin_shutdown`]).
    pub async fn all_closed(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_user_keeps_the_oldest_and_refuses_the_new() {
        let gate = Gate::new(100, Some(2), None);
        let (alice, bob): (Arc<str>, Arc<str>) = (Arc::from("alice"), Arc::from("bob"));
        assert_eq!(gate.take(&alice), Ok(()));
        assert_eq!(gate.take(&alice), Ok(()));
        assert_eq!(gate.take(&alice), Err(Refusal::TooManyForUser));
        assert_eq!(gate.take(&bob), Ok(()));
        assert_eq!(gate.open(), 3);
        gate.give_back(&alice);
        assert_eq!(gate.take(&alice), Ok(()));
        for u in [&alice, &alice, &bob] {
            gate.give_back(u);
        }
        assert_eq!(gate.open(), 0);
        assert!(
            gate.per_user.as_ref().unwrap().open.is_empty(),
            "no entry left behind"
        );
    }

    #[test]
    fn max_connections_and_shutdown_refuse() {
        let gate = Gate::new(1, None, None);
        let u: Arc<str> = Arc::from("u");
        assert_eq!(gate.take(&u), Ok(()));
        assert_eq!(gate.take(&u), Err(Refusal::Full));
        gate.begin_shutdown();
        gate.give_back(&u);
        assert_eq!(gate.take(&u), Err(Refusal::ShuttingDown));
        assert_eq!(gate.open(), 0);
    }

    #[test]
    fn per_ip_counts_each_second() {
        let gate = Gate::new(100, None, Some(3));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let allowed = (0..5).filter(|_| gate.allow_upgrade_from(ip)).count();
        // The five calls may straddle a second boundary: 3 or more, never 5.
        assert!((3..5).contains(&allowed), "{allowed}");
        assert!(gate.allow_upgrade_from(other));
        assert!(Gate::new(1, None, None).allow_upgrade_from(ip), "off by default");
    }

    #[tokio::test]
    async fn all_closed_wakes_when_the_last_slot_goes() {
        let gate = Arc::new(Gate::new(10, None, None));
        let u: Arc<str> = Arc::from("u");
        gate.take(&u).unwrap();
        gate.begin_shutdown();
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.all_closed().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        gate.give_back(&u);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}
