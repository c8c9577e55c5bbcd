//! A private moatd for a test or a benchmark: the binary under test with its own policy
//! directory, state, socket, pending directory and pin root (set through [`MoatdBuilder`]),
//! optionally inside a network namespace. [`MoatdBuilder::spawn`] returns once moatd answers
//! on its socket (or is ready, if asked); the [`Moatd`] it returns is killed and reaped when
//! dropped, also when a test fails.

use std::{
    ffi::{OsStr, OsString},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use moat_api::{Request, Response};

/// How moatd is started inside a network namespace (a name under /run/netns).
#[derive(Clone, Debug)]
pub enum Netns {
    /// `nsenter --net=/run/netns/<name>`: only the network changes, so the host's /sys, and
    /// the pins in the host's bpffs, stay visible.
    Nsenter(String),
    /// `ip netns exec <name>`: with a /sys of that namespace as well (the pins then live in a
    /// bpffs the test mounts itself).
    IpNetnsExec(String),
}

/// The flags and the environment of one moatd; [`Self::spawn`] starts it.
#[derive(Clone, Debug)]
pub struct MoatdBuilder {
    program: PathBuf,
    netns: Option<Netns>,
    policy_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    pending_dir: Option<PathBuf>,
    pin_root: Option<PathBuf>,
    poll_ms: Option<u64>,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    quiet: bool,
    log: Option<PathBuf>,
    die_with_parent: bool,
    wait_for_ready: bool,
    timeout: Duration,
}

impl MoatdBuilder {
    /// The moatd binary at `program`; no flags yet. `spawn` waits 20 s for an answer.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            netns: None,
            policy_dir: None,
            state_dir: None,
            socket: None,
            pending_dir: None,
            pin_root: None,
            poll_ms: None,
            args: Vec::new(),
            env: Vec::new(),
            quiet: false,
            log: None,
            die_with_parent: false,
            wait_for_ready: false,
            // Generous: loading and verifying the eBPF object takes seconds on a loaded 2-core
            // machine, and only a failing start waits this long.
            timeout: Duration::from_secs(60),
        }
    }

    /// `--policy-dir root/policies`, `--state-dir root/state`, `--socket root/moatd.sock` and
    /// `--pending-dir root/pending` (each can still be set on its own afterwards).
    pub fn layout(&mut self, root: &Path) -> &mut Self {
        self.policy_dir(root.join("policies"))
            .state_dir(root.join("state"))
            .socket(root.join("moatd.sock"))
            .pending_dir(root.join("pending"))
    }

    pub fn policy_dir(&mut self, dir: impl Into<PathBuf>) -> &mut Self {
        self.policy_dir = Some(dir.into());
        self
    }

    pub fn state_dir(&mut self, dir: impl Into<PathBuf>) -> &mut Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// The local API socket; `spawn` waits for moatd to answer there.
    pub fn socket(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.socket = Some(path.into());
        self
    }

    pub fn pending_dir(&mut self, dir: impl Into<PathBuf>) -> &mut Self {
        self.pending_dir = Some(dir.into());
        self
    }

    pub fn pin_root(&mut self, dir: impl Into<PathBuf>) -> &mut Self {
        self.pin_root = Some(dir.into());
        self
    }

    /// `--poll-ms`.
    pub fn poll_ms(&mut self, ms: u64) -> &mut Self {
        self.poll_ms = Some(ms);
        self
    }

    /// `--judge-after-dnat=false --masquerade=false`: a moatd in the host's own namespace,
    /// which others share, installs no host-wide netfilter rules.
    pub fn no_host_rules(&mut self) -> &mut Self {
        self.args(["--judge-after-dnat=false", "--masquerade=false"])
    }

    /// Any other flag (after the ones above on moatd's command line).
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Self {
        self.env
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    pub fn env_remove(&mut self, key: impl AsRef<OsStr>) -> &mut Self {
        self.env.push((key.as_ref().to_owned(), None));
        self
    }

    /// Runs moatd in the network namespace `netns`.
    pub fn netns(&mut self, netns: Netns) -> &mut Self {
        self.netns = Some(netns);
        self
    }

    /// moatd's stderr to /dev/null instead of the caller's (its stdout always is).
    pub fn quiet(&mut self) -> &mut Self {
        self.quiet = true;
        self
    }

    /// moatd's stderr (its log) into the file at `path`, for a test to read.
    pub fn log_to(&mut self, path: impl Into<PathBuf>) -> &mut Self {
        self.log = Some(path.into());
        self
    }

    /// moatd gets SIGKILL when this process dies, however it dies (PR_SET_PDEATHSIG).
    pub fn die_with_parent(&mut self) -> &mut Self {
        self.die_with_parent = true;
        self
    }

    /// `spawn` waits until moatd reports itself ready, not only until it answers.
    pub fn wait_for_ready(&mut self) -> &mut Self {
        self.wait_for_ready = true;
        self
    }

    /// How long `spawn` waits (default 20 s).
    pub fn timeout(&mut self, timeout: Duration) -> &mut Self {
        self.timeout = timeout;
        self
    }

    /// The command line `spawn` runs.
    pub fn command(&self) -> Command {
        let mut command = match &self.netns {
            None => Command::new(&self.program),
            Some(Netns::Nsenter(name)) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{name}")).arg(&self.program);
                c
            }
            Some(Netns::IpNetnsExec(name)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", name]).arg(&self.program);
                c
            }
        };
        let dirs = [
            ("--policy-dir", &self.policy_dir),
            ("--state-dir", &self.state_dir),
            ("--socket", &self.socket),
            ("--pending-dir", &self.pending_dir),
            ("--pin-root", &self.pin_root),
        ];
        for (flag, value) in dirs {
            if let Some(value) = value {
                command.arg(flag).arg(value);
            }
        }
        if let Some(ms) = self.poll_ms {
            command.arg("--poll-ms").arg(ms.to_string());
        }
        command.args(&self.args);
        for (key, value) in &self.env {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        let log = self.log.as_ref().and_then(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
        });
        command
            .stdout(Stdio::null())
            .stderr(match (log, self.quiet) {
                (Some(file), _) => Stdio::from(file),
                (None, true) => Stdio::null(),
                (None, false) => Stdio::inherit(),
            });
        if self.die_with_parent {
            // SAFETY: prctl is async-signal-safe and touches no memory of this process.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        command
    }

    /// Starts moatd and returns once it answers a status request on its socket (and reports
    /// itself ready, with [`Self::wait_for_ready`]); fails at once if it exits first.
    pub fn spawn(&self) -> Result<Moatd> {
        let socket = self
            .socket
            .clone()
            .context("moatd needs a socket (MoatdBuilder::socket or layout)")?;
        let child = self
            .command()
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        let mut moatd = Moatd { child, socket };
        let deadline = Instant::now() + self.timeout;
        loop {
            if moatd.answers(self.wait_for_ready) {
                return Ok(moatd);
            }
            if let Some(status) = moatd.exited() {
                bail!("moatd exited ({status}) before it answered");
            }
            if Instant::now() >= deadline {
                let what = if self.wait_for_ready {
                    "become ready"
                } else {
                    "answer"
                };
                bail!("moatd did not {what} within {} s", self.timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A running moatd, killed and reaped when dropped.
#[derive(Debug)]
pub struct Moatd {
    child: Child,
    socket: PathBuf,
}

impl Moatd {
    /// A builder for the moatd binary at `program`.
    pub fn builder(program: impl Into<PathBuf>) -> MoatdBuilder {
        MoatdBuilder::new(program)
    }

    /// Its local API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its process id (for /proc/<pid>/status).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if moatd has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills and reaps it (again on drop, which is then a no-op).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn answers(&self, ready: bool) -> bool {
        match moat_api::call(&self.socket, &Request::Status, Duration::from_secs(2)) {
            Ok(Response::Status(status)) => !ready || status.ready,
            Ok(_) => !ready,
            Err(_) => false,
        }
    }
}

impl Drop for Moatd {
    fn drop(&mut self) {
        self.kill();
    }
}
