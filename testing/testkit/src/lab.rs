//! A test bench of real pods on this kernel: each "pod" is a network namespace behind a veth
//! pair, addressed and routed the way Moat's standalone CNI mode wires pods (a /32 and /128,
//! a link-local gateway, host routes per pod). Used by the namespace tests, the demo and the
//! benchmarks; it drives iproute2 so that what it builds is exactly what an operator can
//! inspect with `ip`.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs a shell command, failing with its output.
pub fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .with_context(|| format!("spawning: {cmd}"))?;
    if !out.status.success() {
        bail!(
            "command failed: {cmd}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Clone, Debug)]
pub struct LabPod {
    pub name: String,
    pub netns: String,
    /// Host side of the veth; Moat's programs attach here.
    pub host_if: String,
    pub ifindex: u32,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl LabPod {
    pub fn addrs(&self) -> [IpAddr; 2] {
        [IpAddr::V4(self.v4), IpAddr::V6(self.v6)]
    }

    /// Runs `f` on a fresh thread inside this pod's network namespace (a namespace switch
    /// must never happen on a thread that other work shares).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        in_netns(&self.netns, f)
    }

    /// Writes this pod's endpoint entry (enforce mode) and its ipcache entries (with the
    /// veth, as moatd writes local endpoints), for tests and benchmarks without moatd.
    pub fn register(
        &self,
        maps: &mut moat_datapath::Maps,
        identity: u32,
    ) -> moat_datapath::Result<()> {
        let mut ep = moat_common::EndpointInfo {
            identity,
            policy_id: identity,
            mode: moat_common::MODE_ENFORCE,
            v4_count: 1,
            v6_count: 1,
            ..Default::default()
        };
        ep.v4[0] = moat_common::raw_v4(self.v4);
        ep.v6[0] = moat_common::raw_v6(self.v6);
        maps.upsert_endpoint(self.ifindex, &ep)?;
        for addr in self.addrs() {
            let value = moat_common::IpcacheValue {
                identity,
                ifindex: self.ifindex,
                ..Default::default()
            };
            maps.upsert_ipcache(ipnetwork::IpNetwork::from(addr), &value)?;
        }
        Ok(())
    }

    /// Runs a command inside the pod.
    pub fn exec(&self, cmd: &str) -> Result<String> {
        sh(&format!("ip netns exec {} {cmd}", self.netns))
    }
}

pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    let handle = std::thread::spawn(move || -> Result<T> {
        setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {netns} panicked"))?
}

/// A set of pods that share one /24 and one /64; everything is removed on drop.
pub struct Lab {
    pub id: u32,
    pub tag: String,
    pub pods: Vec<LabPod>,
}

impl Lab {
    /// `tag` is a short prefix (<= 4 characters) for namespace and interface names.
    pub fn new(tag: &str) -> Result<Self> {
        // Distinct per process and per lab, so parallel tests never share an address.
        let id = (std::process::id() * 7 + LAB_COUNTER.fetch_add(1, Ordering::SeqCst)) % 250 + 1;
        sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")?;
        Ok(Self {
            id,
            tag: format!("{tag}{id}"),
            pods: Vec::new(),
        })
    }

    pub fn v4_subnet(&self) -> String {
        format!("10.77.{}.0/24", self.id)
    }

    pub fn add_pod(&mut self, name: &str) -> Result<LabPod> {
        let index = self.pods.len() as u8 + 1;
        let netns = format!("{}-{name}", self.tag);
        let host_if = format!("{}h{index}", self.tag);
        let v4 = Ipv4Addr::new(10, 77, self.id as u8, index);
        let v6: Ipv6Addr = format!("fd77:{:x}::{index:x}", self.id).parse()?;
        // What a killed earlier run may have left under the same names: its netns, its veth,
        // and its host routes (a route outlives nothing here, but one left on another device
        // makes the `ip route add` below fail with "File exists").
        let _ = sh(&format!(
            "ip netns del {netns} 2>/dev/null; ip link del {host_if} 2>/dev/null; \
             ip route del {v4}/32 2>/dev/null; ip -6 route del {v6}/128 2>/dev/null; true"
        ));
        // Recorded before it is configured, so that a failure halfway still has Drop remove
        // what was made.
        self.pods.push(LabPod {
            name: name.to_string(),
            netns: netns.clone(),
            host_if: host_if.clone(),
            ifindex: 0,
            v4,
            v6,
        });
        sh(&format!("ip netns add {netns}"))?;
        sh(&format!(
            "ip link add {host_if} type veth peer name eth0 netns {netns} && \
             ip link set {host_if} up && \
             ip -n {netns} link set lo up && ip -n {netns} link set eth0 up"
        ))?;
        let host_mac = std::fs::read_to_string(format!("/sys/class/net/{host_if}/address"))?
            .trim()
            .to_string();
        sh(&format!(
            "ip -n {netns} addr add {v4}/32 dev eth0 && \
             ip -n {netns} addr add {v6}/128 dev eth0 nodad && \
             ip -n {netns} route add 169.254.1.1 dev eth0 scope link && \
             ip -n {netns} route add default via 169.254.1.1 dev eth0 && \
             ip -n {netns} neigh add 169.254.1.1 lladdr {host_mac} dev eth0 nud permanent && \
             ip -n {netns} -6 route add default via fe80::1 dev eth0 && \
             ip -n {netns} -6 neigh add fe80::1 lladdr {host_mac} dev eth0 nud permanent && \
             ip route add {v4}/32 dev {host_if} && \
             ip -6 route add {v6}/128 dev {host_if}"
        ))?;
        let ifindex: u32 = std::fs::read_to_string(format!("/sys/class/net/{host_if}/ifindex"))?
            .trim()
            .parse()?;
        let pod = self.pods.last_mut().expect("pushed above");
        pod.ifindex = ifindex;
        Ok(pod.clone())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for pod in &self.pods {
            let _ = Command::new("ip")
                .args(["netns", "del", &pod.netns])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &pod.host_if])
                .output();
        }
    }
}

/// Probes with real sockets, run inside a pod.
pub mod probe {
    use std::{
        io::{Read, Write},
        net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        thread::JoinHandle,
        time::Duration,
    };

    use anyhow::Result;

    use super::LabPod;

    /// TCP and UDP echo servers on one port, both families, inside a pod.
    pub struct EchoServer {
        stop: Arc<AtomicBool>,
        threads: Vec<JoinHandle<()>>,
    }

    impl EchoServer {
        pub fn start(pod: &LabPod, port: u16) -> Result<Self> {
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, rx) = std::sync::mpsc::channel();
            let netns = pod.netns.clone();
            let stop_tcp = stop.clone();
            let stop_udp = stop.clone();
            let tcp = std::thread::spawn(move || {
                let (listener, udp) = super::in_netns(&netns, move || {
                    let l = TcpListener::bind(("::", port)).expect("bind tcp");
                    let u = UdpSocket::bind(("::", port)).expect("bind udp");
                    (l, u)
                })
                .expect("enter pod");
                tx.send(udp).unwrap();
                listener.set_nonblocking(true).unwrap();
                while !stop_tcp.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            std::thread::spawn(move || {
                                s.set_nonblocking(false).ok();
                                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                                let mut buf = [0u8; 4096];
                                while let Ok(n) = s.read(&mut buf) {
                                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
            let udp: UdpSocket = rx.recv()?;
            let udp_thread = std::thread::spawn(move || {
                udp.set_read_timeout(Some(Duration::from_millis(50))).ok();
                let mut buf = [0u8; 2048];
                while !stop_udp.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&buf[..n], from);
                    }
                }
            });
            Ok(Self {
                stop,
                threads: vec![tcp, udp_thread],
            })
        }
    }

    impl Drop for EchoServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    /// Connects and exchanges one message. False on refusal, timeout or a wrong echo.
    pub fn tcp(from: &LabPod, to: IpAddr, port: u16, timeout: Duration) -> bool {
        from.run(move || {
            let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::new(to, port), timeout) else {
                return false;
            };
            s.set_read_timeout(Some(timeout)).ok();
            if s.write_all(b"moat").is_err() {
                return false;
            }
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).is_ok() && &buf == b"moat"
        })
        .unwrap_or(false)
    }

    /// Sends one datagram and waits for its echo.
    pub fn udp(from: &LabPod, to: IpAddr, port: u16, timeout: Duration) -> bool {
        from.run(move || {
            let bind: SocketAddr = if to.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let Ok(sock) = UdpSocket::bind(bind) else {
                return false;
            };
            sock.set_read_timeout(Some(timeout)).ok();
            if sock.send_to(b"moat", SocketAddr::new(to, port)).is_err() {
                return false;
            }
            let mut buf = [0u8; 16];
            matches!(sock.recv_from(&mut buf), Ok((4, _))) && &buf[..4] == b"moat"
        })
        .unwrap_or(false)
    }

    /// One ICMP echo with busybox ping (raw socket, as root).
    pub fn ping(from: &LabPod, to: IpAddr) -> bool {
        let applet = if to.is_ipv4() { "ping" } else { "ping6" };
        from.exec(&format!("busybox {applet} -c 1 -W 1 {to}"))
            .is_ok()
    }
}
