//! Crash points for tests. Steps of a standalone ADD, in order: `veth-pair-created`,
//! `ipam-allocated` and `registered` (while the programs are being attached), `attached`,
//! `veth-configured` (the last step before the result is printed).
//! Built with the `test-hooks` feature (only the crate's own tests
//! enable it, through a dev-dependency on itself), `MOAT_CNI_TEST_ABORT_AT=<step>` makes the
//! process SIGKILL itself when it reaches the named step, so a test can stop an ADD at each
//! point deterministically and then check that GC or the next ADD cleans up. Without the
//! feature (every release and `cargo build` binary) `abort_point` is an empty inline function
//! and the variable is never read.

#[cfg(feature = "test-hooks")]
pub fn abort_point(step: &str) {
    if std::env::var("MOAT_CNI_TEST_ABORT_AT").is_ok_and(|wanted| wanted == step) {
        // SIGKILL, like `kill -9`: no destructors, no unwinding, nothing flushed.
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn abort_point(_step: &str) {}
