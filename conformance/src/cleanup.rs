//! Everything the run changes on the node (netfilter rules, network namespaces, moatd, pins)
//! is registered here as an undo action. The actions run once, in reverse order: when the run
//! ends, when it unwinds from a panic (the guard's Drop), or on SIGINT/SIGTERM/SIGHUP (a
//! dedicated thread waits for them; they are blocked everywhere else).

use std::sync::Mutex;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};

type Action = Box<dyn FnOnce() + Send>;

static ACTIONS: Mutex<Vec<(String, Action)>> = Mutex::new(Vec::new());

pub fn register(what: impl Into<String>, action: impl FnOnce() + Send + 'static) {
    ACTIONS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((what.into(), Box::new(action)));
}

/// Runs every registered action (newest first). Safe to call more than once.
pub fn run_all() {
    loop {
        let next = ACTIONS.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let Some((_what, action)) = next else { break };
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(action));
    }
}

/// Undoes everything when dropped (also while unwinding from a panic).
pub struct Guard;

impl Drop for Guard {
    fn drop(&mut self) {
        run_all();
    }
}

/// Blocks the termination signals in this thread (and every thread it starts later) and
/// starts the thread that cleans up and exits when one arrives. Call before any other thread
/// exists.
pub fn install_signal_handler() -> anyhow::Result<Guard> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(signal) = set.wait() {
                eprintln!("moat-conformance: {signal:?}: cleaning up");
                run_all();
                std::process::exit(128 + signal as i32);
            }
        })?;
    Ok(Guard)
}
