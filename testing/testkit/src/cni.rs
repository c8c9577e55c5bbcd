//! One execution of a CNI plugin binary, as a runtime executes it: `CNI_COMMAND` and the other
//! `CNI_*` variables in its environment, the network configuration on stdin, the result or
//! error document on stdout.
//!
//! ```no_run
//! # use moat_testkit::cni::Exec;
//! # let (bin, config) = (std::path::Path::new("/opt/cni/bin"), serde_json::json!({}));
//! let out = Exec::new(bin.join("moat-cni"), "ADD")
//!     .container_id("ctr1")
//!     .netns("/run/netns/pod")
//!     .ifname("eth0")
//!     .path(bin)
//!     .run(Some(&config))
//!     .unwrap();
//! assert!(out.status.success(), "{}", out.text());
//! ```

use std::{
    ffi::{OsStr, OsString},
    io::Write,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
};

use serde_json::Value;

/// The command line and environment of one plugin execution.
#[derive(Clone, Debug)]
pub struct Exec {
    program: PathBuf,
    /// A command the plugin runs under (`nsenter --net=...`, `ip netns exec ...`).
    wrapper: Vec<OsString>,
    env_clear: bool,
    env: Vec<(OsString, OsString)>,
}

impl Exec {
    /// `program` with `CNI_COMMAND=command` (added to this process's environment unless
    /// [`Self::env_clear`]).
    pub fn new(program: impl Into<PathBuf>, command: &str) -> Self {
        let mut exec = Self {
            program: program.into(),
            wrapper: Vec::new(),
            env_clear: false,
            env: Vec::new(),
        };
        exec.env("CNI_COMMAND", command);
        exec
    }

    /// Starts from an empty environment (only what is set here; add `PATH` if the plugin
    /// needs one).
    pub fn env_clear(&mut self) -> &mut Self {
        self.env_clear = true;
        self
    }

    pub fn container_id(&mut self, id: impl AsRef<OsStr>) -> &mut Self {
        self.env("CNI_CONTAINERID", id)
    }

    /// `CNI_NETNS`, a path.
    pub fn netns(&mut self, path: impl AsRef<OsStr>) -> &mut Self {
        self.env("CNI_NETNS", path)
    }

    pub fn ifname(&mut self, name: impl AsRef<OsStr>) -> &mut Self {
        self.env("CNI_IFNAME", name)
    }

    /// `CNI_PATH`.
    pub fn path(&mut self, path: impl AsRef<OsStr>) -> &mut Self {
        self.env("CNI_PATH", path)
    }

    /// `CNI_ARGS`.
    pub fn args(&mut self, args: impl AsRef<OsStr>) -> &mut Self {
        self.env("CNI_ARGS", args)
    }

    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs the plugin under `nsenter --net=<netns path>`: in that network namespace, with
    /// this process's /sys (the pins of a moatd in the host's bpffs stay visible).
    pub fn nsenter_net(&mut self, netns_path: impl AsRef<OsStr>) -> &mut Self {
        let mut flag = OsString::from("--net=");
        flag.push(netns_path);
        self.wrapper = vec!["nsenter".into(), flag];
        self
    }

    /// Runs the plugin under `ip netns exec <name>`: in that network namespace and with a /sys
    /// of that namespace.
    pub fn ip_netns_exec(&mut self, name: impl AsRef<OsStr>) -> &mut Self {
        self.wrapper = vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            name.as_ref().to_owned(),
        ];
        self
    }

    fn command(&self) -> Command {
        let mut command = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        if self.env_clear {
            command.env_clear();
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Starts the plugin with `config` written to its stdin, which is then closed (no config:
    /// stdin is /dev/null); stdout and stderr are pipes.
    pub fn spawn(&self, config: Option<&Value>) -> std::io::Result<Child> {
        let mut child = self
            .command()
            .stdin(if config.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(config) = config {
            let mut stdin = child.stdin.take().expect("piped stdin");
            stdin.write_all(&serde_json::to_vec(config)?)?;
        }
        Ok(child)
    }

    /// Runs the plugin to its end (see [`Self::spawn`]).
    pub fn run(&self, config: Option<&Value>) -> std::io::Result<Output> {
        let out = self.spawn(config)?.wait_with_output()?;
        Ok(Output {
            status: out.status,
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
}

/// How a plugin execution ended and what it printed.
#[derive(Clone, Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    /// stdout as JSON: `Null` when it is empty.
    pub fn json(&self) -> serde_json::Result<Value> {
        if self.stdout.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.stdout)
    }

    /// stdout and stderr as text, separated by a space (for a failure message).
    pub fn text(&self) -> String {
        format!(
            "{} {}",
            String::from_utf8_lossy(&self.stdout),
            String::from_utf8_lossy(&self.stderr)
        )
    }
}

/// The two `CNI_*` values every pod-level test passes through `CNI_ARGS`.
pub fn pod_args(namespace: &str, name: &str) -> String {
    format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}")
}
