//! Probes from inside a pod: `kubectl exec <pod> -c <container> -- /agnhost connect
//! <ip>:<port> --timeout=<t> --protocol=<p>`, as upstream's netpol e2e does.

use std::{net::IpAddr, path::PathBuf, process::Command, time::Duration};

use crate::cases::Proto;

/// The client end of a probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeFrom {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

pub trait Prober: Sync {
    /// `Ok(true)`: connected; `Ok(false)`: timed out or refused; `Err`: the probe could not
    /// run at all (which is a failure, never "denied").
    fn connect(
        &self,
        from: &ProbeFrom,
        target: IpAddr,
        port: u16,
        proto: Proto,
        timeout: Duration,
    ) -> Result<bool, String>;
}

pub struct KubectlExec {
    pub kubectl: PathBuf,
}

impl KubectlExec {
    pub fn args(
        from: &ProbeFrom,
        target: IpAddr,
        port: u16,
        proto: Proto,
        timeout: Duration,
    ) -> Vec<String> {
        let address = match target {
            IpAddr::V4(a) => format!("{a}:{port}"),
            IpAddr::V6(a) => format!("[{a}]:{port}"),
        };
        vec![
            "exec".into(),
            "-n".into(),
            from.namespace.clone(),
            from.pod.clone(),
            "-c".into(),
            from.container.clone(),
            "--".into(),
            "/agnhost".into(),
            "connect".into(),
            address,
            format!("--timeout={}ms", timeout.as_millis().max(1)),
            format!("--protocol={}", proto.lower()),
        ]
    }

    /// agnhost connect exits 0 on success and prints TIMEOUT, REFUSED or OTHER: on a failed
    /// connection; anything else is kubectl or the pod failing.
    pub fn verdict(success: bool, stdout: &str, stderr: &str) -> Result<bool, String> {
        if success {
            return Ok(true);
        }
        let out = format!("{stdout}{stderr}");
        if ["TIMEOUT", "REFUSED", "OTHER:"]
            .iter()
            .any(|m| out.contains(m))
        {
            Ok(false)
        } else {
            Err(format!("kubectl exec failed: {}", out.trim()))
        }
    }
}

impl Prober for KubectlExec {
    fn connect(
        &self,
        from: &ProbeFrom,
        target: IpAddr,
        port: u16,
        proto: Proto,
        timeout: Duration,
    ) -> Result<bool, String> {
        let out = Command::new(&self.kubectl)
            .args(Self::args(from, target, port, proto, timeout))
            .output()
            .map_err(|e| format!("running {}: {e}", self.kubectl.display()))?;
        Self::verdict(
            out.status.success(),
            &String::from_utf8_lossy(&out.stdout),
            &String::from_utf8_lossy(&out.stderr),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_exec_runs_agnhost_connect_in_the_client_container() {
        let from = ProbeFrom {
            namespace: "x".into(),
            pod: "a".into(),
            container: "cont-80-tcp".into(),
        };
        let args = KubectlExec::args(
            &from,
            "10.96.0.7".parse().unwrap(),
            81,
            Proto::Udp,
            Duration::from_secs(1),
        );
        assert_eq!(
            args.join(" "),
            "exec -n x a -c cont-80-tcp -- /agnhost connect 10.96.0.7:81 --timeout=1000ms --protocol=udp"
        );
        let v6 = KubectlExec::args(
            &from,
            "fd00::1".parse().unwrap(),
            80,
            Proto::Tcp,
            Duration::ZERO,
        );
        assert!(
            v6.contains(&"[fd00::1]:80".to_string()) && v6.contains(&"--timeout=1ms".to_string())
        );
    }

    #[test]
    fn only_agnhost_failures_count_as_denied() {
        assert_eq!(KubectlExec::verdict(true, "", ""), Ok(true));
        assert_eq!(KubectlExec::verdict(false, "TIMEOUT\n", ""), Ok(false));
        assert_eq!(KubectlExec::verdict(false, "", "REFUSED"), Ok(false));
        assert!(
            KubectlExec::verdict(
                false,
                "",
                "Error from server (NotFound): pods \"a\" not found"
            )
            .is_err()
        );
    }
}
