//! The sender's egress for connections the host DNATs. A pod that connects to a Service
//! address is seen by its own hook with the Service address as destination, which has no
//! identity; kube-proxy picks the backend later, in the host's netfilter. When the backend is
//! a pod of this node, that pod's hook judges both perimeters. Anything else (a pod on
//! another node, a host-network backend here or elsewhere, an address outside the cluster)
//! leaves through the host, where no pod hook sees it.
//!
//! Why netfilter, and why this hook: after DNAT and before SNAT is the only place where the
//! packet carries both the sending pod's address and the real destination. TCX on the uplink
//! sees the packet after masquerade (source rewritten) and never sees a backend on the node
//! itself (local delivery has no egress device). netfilter's FORWARD and INPUT hooks see
//! both kinds, after DNAT, before SNAT. aya cannot load BPF_PROG_TYPE_NETFILTER programs, so
//! the verdict runs as a socket filter (`moat_after_dnat`, which reads the same maps with the
//! same policy lookup as the pod hooks) from an iptables `bpf` match. The rule sits in the
//! mangle table, whose FORWARD and INPUT chains run before the filter table's at the same
//! hooks: kube-proxy's and others' ACCEPT rules in the filter table cannot skip it. Only the
//! first packets of DNATed connections reach the program (conntrack state NEW and DNAT);
//! everything else passes the chain with two conntrack checks.
//!
//! The rendering is pure; `AfterDnatRules` applies it with iptables-restore, per family.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// Moat's own chain in the mangle table.
pub const CHAIN: &str = "MOAT-AFTER-DNAT";

/// The built-in chains that jump to it: FORWARD for backends elsewhere, INPUT for backends on
/// this node's host network.
pub const HOOK_CHAINS: [&str; 2] = ["FORWARD", "INPUT"];

const COMMENT: &str = "moat: pod egress to a DNATed destination, judged by moat_after_dnat";

/// iptables-restore input (with --noflush) that creates or empties Moat's chain and fills it
/// with the one verdict rule. Declaring the chain empties it, so the rule always names the
/// program pinned now: a rule made before a restart still holds the old program.
pub fn chain_restore_input(program_pin: &Path) -> String {
    format!(
        "*mangle\n:{CHAIN} - [0:0]\n-A {CHAIN} -m conntrack --ctstate NEW -m bpf --object-pinned {} -m comment --comment \"{COMMENT}\" -j DROP\nCOMMIT\n",
        program_pin.display()
    )
}

/// The jump from a built-in chain, as iptables arguments after `-t mangle -C|-I|-D <chain>`.
pub fn jump_args() -> Vec<String> {
    [
        "-m",
        "conntrack",
        "--ctstate",
        "DNAT",
        "-m",
        "comment",
        "--comment",
        COMMENT,
        "-j",
        CHAIN,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One address family's iptables tools.
#[derive(Clone, Debug)]
pub struct Family {
    pub name: &'static str,
    pub iptables: &'static str,
    pub restore: &'static str,
}

pub const IPV4: Family = Family {
    name: "IPv4",
    iptables: "iptables",
    restore: "iptables-restore",
};

pub const IPV6: Family = Family {
    name: "IPv6",
    iptables: "ip6tables",
    restore: "ip6tables-restore",
};

/// The families this host runs: IPv6 only where the kernel has it (`ipv6.disable=1` hosts
/// have no ip6tables tables to write to).
pub fn host_families() -> Vec<Family> {
    let mut families = vec![IPV4];
    if Path::new("/proc/sys/net/ipv6").exists() {
        families.push(IPV6);
    }
    families
}

/// Keeps Moat's after-DNAT rules in place in this network namespace.
pub struct AfterDnatRules {
    program_pin: PathBuf,
    families: Vec<Family>,
    /// The program pinned at start has been referenced by a rule since (a restart pins a new
    /// one, and the rule must be remade to run it).
    applied: bool,
}

impl AfterDnatRules {
    pub fn new(program_pin: PathBuf, families: Vec<Family>) -> Self {
        Self {
            program_pin,
            families,
            applied: false,
        }
    }

    /// Puts the rules in place: the chain on the first call (and whenever it is missing),
    /// the jumps whenever one is missing. The problems, by family, when it cannot.
    pub fn ensure(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut all_applied = true;
        for family in &self.families {
            if let Err(e) = ensure_family(family, &self.program_pin, !self.applied) {
                problems.push(format!(
                    "{} egress through Services is not judged after DNAT: {e}",
                    family.name
                ));
                all_applied = false;
            }
        }
        self.applied = all_applied;
        problems
    }

    /// Takes the rules out (the feature turned off).
    pub fn remove(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for family in &self.families {
            for hook in HOOK_CHAINS {
                // Delete every copy: one -D removes one.
                for _ in 0..16 {
                    if run(family.iptables, &jump_cmd("-D", hook)).is_err() {
                        break;
                    }
                }
            }
            let chain_present = run(family.iptables, &["-t", "mangle", "-n", "-L", CHAIN]).is_ok();
            if chain_present {
                for op in ["-F", "-X"] {
                    if let Err(e) = run(family.iptables, &["-t", "mangle", op, CHAIN]) {
                        problems.push(format!("{}: removing {CHAIN}: {e}", family.name));
                    }
                }
            }
        }
        problems
    }
}

fn jump_cmd(op: &str, hook: &str) -> Vec<String> {
    let mut args = vec!["-t".to_string(), "mangle".into(), op.into(), hook.into()];
    if op == "-I" {
        args.push("1".into());
    }
    args.extend(jump_args());
    args
}

fn ensure_family(family: &Family, program_pin: &Path, remake_chain: bool) -> Result<(), String> {
    let chain_present = run(family.iptables, &["-t", "mangle", "-n", "-L", CHAIN]).is_ok();
    if remake_chain || !chain_present {
        restore(family, &chain_restore_input(program_pin))?;
    }
    for hook in HOOK_CHAINS {
        if run(family.iptables, &jump_cmd("-C", hook)).is_err() {
            run(family.iptables, &jump_cmd("-I", hook))?;
        }
    }
    Ok(())
}

fn restore(family: &Family, input: &str) -> Result<(), String> {
    let mut child = Command::new(family.restore)
        .args(["--noflush", "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {}: {e}", family.restore))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("writing to {}: {e}", family.restore))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {}: {e}", family.restore))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed: {}",
            family.restore,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn run<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> Result<(), String> {
    let out = Command::new(program)
        .arg("--wait")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_input_names_the_pinned_program_and_drops_only_what_it_matches() {
        let input = chain_restore_input(Path::new("/sys/fs/bpf/moat/v9/programs/moat_after_dnat"));
        assert!(input.starts_with("*mangle\n:MOAT-AFTER-DNAT - [0:0]\n"));
        assert!(input.contains(
            "-A MOAT-AFTER-DNAT -m conntrack --ctstate NEW -m bpf --object-pinned /sys/fs/bpf/moat/v9/programs/moat_after_dnat "
        ));
        assert!(input.trim_end().ends_with("-j DROP\nCOMMIT"));
        assert_eq!(input.matches("-A ").count(), 1);
    }

    #[test]
    fn jumps_are_taken_only_by_dnated_connections() {
        let args = jump_cmd("-I", "FORWARD");
        assert_eq!(&args[..5], ["-t", "mangle", "-I", "FORWARD", "1"]);
        let joined = args.join(" ");
        assert!(joined.contains("-m conntrack --ctstate DNAT"));
        assert!(joined.ends_with("-j MOAT-AFTER-DNAT"));
        // -C and -D must name the same rule as -I, without the position.
        assert_eq!(jump_cmd("-C", "INPUT")[4..], args[5..]);
    }
}
