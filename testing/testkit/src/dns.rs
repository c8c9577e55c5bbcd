//! DNS messages on the wire, for tests that talk to real resolvers (dnsmasq) and forge what a
//! resolver would not send: a query with a chosen id, a response with chosen records, and a
//! reader for the addresses of a response.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;

/// `name` in wire form (uncompressed), lower or mixed case as given.
pub fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() {
            continue;
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A recursive query with one question.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&encode_name(name));
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

/// One answer record: its owner name, and what it holds.
pub enum Record {
    Addr(String, IpAddr, u32),
    Cname(String, String, u32),
}

/// A response to `name` (question type `qtype`) with `records` in the answer section. The
/// first record's owner, when it is the question name, is written as a compression pointer
/// to the question, as resolvers do.
pub fn response(id: u16, name: &str, qtype: u16, records: &[Record]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&0x8180u16.to_be_bytes()); // QR, RD, RA, NOERROR
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(&(records.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&encode_name(name));
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    for record in records {
        let (owner, rtype, ttl, rdata) = match record {
            Record::Addr(owner, IpAddr::V4(a), ttl) => (owner, TYPE_A, *ttl, a.octets().to_vec()),
            Record::Addr(owner, IpAddr::V6(a), ttl) => {
                (owner, TYPE_AAAA, *ttl, a.octets().to_vec())
            }
            Record::Cname(owner, target, ttl) => (owner, TYPE_CNAME, *ttl, encode_name(target)),
        };
        if owner.eq_ignore_ascii_case(name) {
            m.extend_from_slice(&[0xc0, 12]);
        } else {
            m.extend_from_slice(&encode_name(owner));
        }
        m.extend_from_slice(&rtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&ttl.to_be_bytes());
        m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        m.extend_from_slice(&rdata);
    }
    m
}

/// Skips a (possibly compressed) name at `at`; the offset after it.
fn skip_name(m: &[u8], mut at: usize) -> Result<usize> {
    loop {
        let len = *m.get(at).context("name runs past the message")? as usize;
        if len == 0 {
            return Ok(at + 1);
        }
        if len & 0xc0 == 0xc0 {
            return Ok(at + 2);
        }
        at += 1 + len;
    }
}

/// The message id and the A/AAAA addresses (with TTLs) in a response's answer section.
pub fn answers(m: &[u8]) -> Result<(u16, Vec<(IpAddr, u32)>)> {
    if m.len() < 12 {
        bail!("response of {} bytes", m.len());
    }
    let id = u16::from_be_bytes([m[0], m[1]]);
    let rcode = m[3] & 0x0f;
    if rcode != 0 {
        bail!("response code {rcode}");
    }
    let count = u16::from_be_bytes([m[6], m[7]]);
    let mut at = skip_name(m, 12)? + 4;
    let mut out = Vec::new();
    for _ in 0..count {
        at = skip_name(m, at)?;
        let fixed = m.get(at..at + 10).context("record runs past the message")?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let len = u16::from_be_bytes([fixed[8], fixed[9]]) as usize;
        let data = m
            .get(at + 10..at + 10 + len)
            .context("record data runs past the message")?;
        match (rtype, len) {
            (TYPE_A, 4) => out.push((
                IpAddr::V4(Ipv4Addr::new(data[0], data[1], data[2], data[3])),
                ttl,
            )),
            (TYPE_AAAA, 16) => {
                let octets: [u8; 16] = data.try_into().unwrap();
                out.push((IpAddr::V6(Ipv6Addr::from(octets)), ttl));
            }
            _ => {}
        }
        at += 10 + len;
    }
    Ok((id, out))
}

/// Asks `server` (port 53) over UDP from `local_port` (0: any) and returns the response.
pub fn ask_udp(server: IpAddr, local_port: u16, message: &[u8]) -> Result<Vec<u8>> {
    let bind: SocketAddr = match server {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, local_port).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, local_port).into(),
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    socket.send_to(message, (server, 53))?;
    let mut buf = vec![0u8; 4096];
    let (n, _) = socket.recv_from(&mut buf).context("no DNS answer")?;
    buf.truncate(n);
    Ok(buf)
}

/// Asks `server` (port 53) over TCP and returns the response.
pub fn ask_tcp(server: IpAddr, message: &[u8]) -> Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&(server, 53).into(), Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut framed = (message.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(message);
    stream.write_all(&framed)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut buf)?;
    Ok(buf)
}

/// A real resolver for tests and benchmarks: dnsmasq in a network namespace, answering
/// only from a hosts file (`address name` lines, one name may have many addresses) with
/// every answer's TTL `ttl`. Killed, and its hosts file removed, on drop.
pub struct Dnsmasq {
    child: Child,
    hosts: PathBuf,
}

impl Dnsmasq {
    /// `extra` adds dnsmasq options (e.g. `--cname=alias,target`).
    pub fn start(
        netns: &str,
        listen: &[IpAddr],
        hosts: &str,
        ttl: u32,
        extra: &[&str],
    ) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("moat-dnsmasq-{netns}.hosts"));
        std::fs::write(&path, hosts)?;
        let listen = listen
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "dnsmasq", "--keep-in-foreground"])
            .args(["--no-resolv", "--no-hosts", "--bind-interfaces"])
            .args(["--pid-file=", "--user=root"])
            .arg(format!("--addn-hosts={}", path.display()))
            .arg(format!("--local-ttl={ttl}"))
            .arg(format!("--listen-address={listen}"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("dnsmasq (bootstrap installs dnsmasq-base)")?;
        Ok(Self { child, hosts: path })
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.hosts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_response_reads_back() {
        let m = response(
            7,
            "www.example.test",
            TYPE_A,
            &[
                Record::Cname("www.example.test".into(), "edge.cdn.test".into(), 30),
                Record::Addr("edge.cdn.test".into(), "192.0.2.1".parse().unwrap(), 5),
                Record::Addr("edge.cdn.test".into(), "2001:db8::1".parse().unwrap(), 6),
            ],
        );
        let (id, addrs) = answers(&m).unwrap();
        assert_eq!(id, 7);
        assert_eq!(
            addrs,
            vec![
                ("192.0.2.1".parse().unwrap(), 5),
                ("2001:db8::1".parse().unwrap(), 6)
            ]
        );
        assert_eq!(
            &query(9, "a.b", TYPE_A)[12..],
            &[1, b'a', 1, b'b', 0, 0, 1, 0, 1]
        );
    }
}
