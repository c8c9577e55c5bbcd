//! BPF_PROG_TEST_RUN: runs a pinned program on a crafted packet, with no network at all.
//! Used by the datapath unit tests (every verdict path) and by the per-packet cost benchmark.

use std::time::Duration;

use anyhow::Context;
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use moat_common::program_name;

use moat_datapath::{PinDir, Result};

/// Which of the two endpoint programs to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Packets the pod sends (its egress).
    FromContainer,
    /// Packets delivered to the pod (its ingress).
    ToContainer,
}

impl Hook {
    pub fn program_name(self) -> &'static str {
        match self {
            Hook::FromContainer => program_name::FROM_CONTAINER,
            Hook::ToContainer => program_name::TO_CONTAINER,
        }
    }
}

/// TC_ACT_OK and TC_ACT_SHOT, as the programs return them.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

/// Size of the kernel's `struct __sk_buff`, and where `ifindex` sits in it. The kernel only
/// accepts a handful of fields in a test context; we set just the device, which is what the
/// programs key the endpoint on.
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_IFINDEX_OFFSET: usize = 40;

pub struct TestRunner {
    from_container: SchedClassifier,
    to_container: SchedClassifier,
}

pub struct RunResult {
    pub verdict: u32,
    /// Average time of one run, as the kernel measured it.
    pub per_run: Duration,
}

impl TestRunner {
    pub fn open(pins: &PinDir) -> Result<Self> {
        let open = |hook: Hook| {
            SchedClassifier::from_pin(pins.program(hook.program_name()))
                .with_context(|| format!("opening pinned {}", hook.program_name()))
        };
        Ok(Self {
            from_container: open(Hook::FromContainer)?,
            to_container: open(Hook::ToContainer)?,
        })
    }

    /// Runs `hook` on `packet` as if it crossed device `ifindex` (which must exist and be > 1).
    pub fn run(&self, hook: Hook, ifindex: u32, packet: &[u8], repeat: u32) -> Result<RunResult> {
        let mut ctx = [0u8; SK_BUFF_SIZE];
        ctx[SK_BUFF_IFINDEX_OFFSET..SK_BUFF_IFINDEX_OFFSET + 4]
            .copy_from_slice(&ifindex.to_ne_bytes());
        let program = match hook {
            Hook::FromContainer => &self.from_container,
            Hook::ToContainer => &self.to_container,
        };
        let opts = TestRunOptions {
            data_in: Some(packet),
            ctx_in: Some(&ctx),
            repeat: repeat.max(1),
            ..Default::default()
        };
        let result = program
            .test_run(opts)
            .with_context(|| format!("BPF_PROG_TEST_RUN of {}", hook.program_name()))?;
        Ok(RunResult {
            verdict: result.return_value,
            per_run: result.duration,
        })
    }
}
