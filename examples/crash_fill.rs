//! Fills a data dir as a crash would leave it, for the start-up
//! measurement (README, "Durability"):
//!
//! ```sh
//! cargo run --release --example crash_fill -- DATA_DIR [TOTAL] [UNCHECKPOINTED]
//! ```
//!
//! Writes 1,000 conversations of 5 and `TOTAL` (default 1,000,000) chat
//! messages through the commit-log backend in groups of 1,000, as the
//! sequencer would. All but the last `UNCHECKPOINTED` (default 100,000) are
//! applied to sled and checkpointed; the rest are only in the log (the
//! store is opened with background application off for them), and then
//! the process aborts: `kill -9` right after the last `fdatasync`. A
//! parley started on `DATA_DIR` then replays those groups before it serves.

#[path = "../benches/common/mod.rs"]
mod common;

use parley::ids::{ConversationId, Seq};
use parley::protocol::Micros;
use parley::store::{Change, Conversation, EventKind, Store, WalOptions, WalStore};

const CONVERSATIONS: u64 = 1_000;
const GROUP: u64 = 1_000;

fn write(store: &WalStore, messages: u64, first: &mut bool) {
    let mut left = messages;
    while left > 0 {
        let mut g = store.begin().expect("begin");
        if *first {
            for _ in 0..CONVERSATIONS {
                let c = Conversation {
                    id: g.next_conversation().unwrap(),
                    title: None,
                    participants: ["alice", "bob", "carol", "dave", "erin"]
                        .map(String::from)
                        .to_vec(),
                    created_at: Micros(1),
                };
                g.apply(Change::Conversation(&c)).unwrap();
            }
            *first = false;
        }
        for _ in 0..GROUP.min(left) {
            let id = g.next_message().unwrap();
            let conversation = ConversationId(1 + id.0 % CONVERSATIONS);
            let seq: Seq = g.next_seq(conversation).unwrap();
            let (m, json) = common::chat_message(id, conversation, seq);
            g.apply(Change::Chat {
                message: &m,
                kind: EventKind::Created,
                seq,
                payload: &json,
                notifications: &[],
            })
            .unwrap();
            left -= 1;
        }
        g.commit().expect("commit");
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(
        args.next()
            .expect("usage: crash_fill DATA_DIR [TOTAL] [UNCHECKPOINTED]"),
    );
    let total: u64 = args.next().map_or(1_000_000, |a| a.parse().expect("TOTAL"));
    let tail: u64 = args
        .next()
        .map_or(100_000, |a| a.parse().expect("UNCHECKPOINTED"))
        .min(total);
    std::fs::create_dir_all(&dir).unwrap();
    let mut first = true;
    let t = std::time::Instant::now();
    {
        let store = WalStore::open(&dir, WalOptions::default()).expect("open");
        write(&store, total - tail, &mut first);
        store.flush().expect("apply and checkpoint");
    }
    let store = WalStore::open(
        &dir,
        WalOptions {
            apply_in_background: false,
            checkpoint_bytes: Some(u64::MAX),
            ..WalOptions::default()
        },
    )
    .expect("reopen");
    write(&store, tail, &mut first);
    eprintln!(
        "wrote {total} messages ({tail} only in the log) in {:.1} s; aborting as kill -9 would",
        t.elapsed().as_secs_f64()
    );
    std::process::abort();
}
