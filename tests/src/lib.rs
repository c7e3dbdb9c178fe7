//! Test and benchmark support: crafted frames for BPF_PROG_TEST_RUN, throwaway network
//! namespaces with veth pairs, and a handle on a real `apimon` daemon.
//!
//! Helpers panic on failure (with context) so a failing test keeps its location.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support: failing loudly is the point"
)]

pub mod corpus;
pub mod daemon;
pub mod frames;
pub mod netns;
pub mod nginx;
pub mod probe;
pub mod segments;
pub mod testrun;

/// Privileged tests need root; say so plainly instead of failing obscurely.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (CAP_BPF, CAP_NET_ADMIN): run them with `cargo xtask test`"
    );
}

/// Polls `done` (every 100 ms) until it holds; fails the test with `what` if it still
/// does not after `within`.
pub fn eventually(
    within: std::time::Duration,
    what: impl FnOnce() -> String,
    mut done: impl FnMut() -> bool,
) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "{}", what());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A name unique to this process and call, short enough for an interface (<= 15 bytes).
pub fn unique_tag() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{}{n}", std::process::id() % 100_000)
}
