//! Test gating only; the library and the binary never look at these cfgs.
//!
//! - `parley_external`: `PARLEY_TEST_EXTERNAL` is set (the contract suite
//!   aimed at another server). Tests that need a parley of their own (a
//!   restart, a kill, a flag) are compiled as ignored, with the reason, so the
//!   report counts them as skipped and never as passed.
//! - `parley_not_root`: the build does not run as root, so the full-disk test
//!   (it mounts a tmpfs) is compiled as ignored with that reason. CI runs as
//!   root, so there it runs; if the mount fails as root, the test fails.
//!
//! A cfg, not a check at run time: a test that returns early is reported as
//! passed, and only `#[ignore]` makes the harness say "ignored".

fn main() {
    println!("cargo::rustc-check-cfg=cfg(parley_external)");
    println!("cargo::rustc-check-cfg=cfg(parley_not_root)");
    println!("cargo::rerun-if-env-changed=PARLEY_TEST_EXTERNAL");
    // Switching user (su, sudo) changes these; the uid is read below.
    println!("cargo::rerun-if-env-changed=USER");
    println!("cargo::rerun-if-env-changed=SUDO_UID");
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("PARLEY_TEST_EXTERNAL").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=parley_external");
    }
    if effective_uid() != Some(0) {
        println!("cargo::rustc-cfg=parley_not_root");
    }
}

/// The effective uid, from `/proc/self/status` (`Uid: real effective …`).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}
