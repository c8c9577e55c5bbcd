//! Which backends the host's DNAT can pick for a Service port, read from the iptables nat
//! table as `iptables-save` prints it (kube-proxy's iptables mode, or any rule that DNATs).
//! `moatctl trace` uses it to say what the datapath really does with a connection to a
//! Service address: the verdict is made against the backend, not the address.
//!
//! The walk starts at PREROUTING (a pod's packets enter the host there) and follows jumps
//! the way netfilter would for a packet to the Service address and port: a rule whose
//! matches cannot be evaluated here (`-m statistic`, `-m addrtype`, marks) may or may not
//! match, so its backends are candidates and the walk goes on; a DNAT whose matches are all
//! known to hold ends it. Bounded: chains are followed at most `MAX_DEPTH` deep and rules
//! are visited at most `MAX_VISITS` times, whatever the table holds.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    process::Command,
};

use ipnetwork::IpNetwork;

const MAX_DEPTH: usize = 16;
const MAX_VISITS: usize = 100_000;

/// Where a Service backend lives, which says where the source's egress towards it is judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendPlace {
    LocalPod,
    RemotePod,
    ThisNodeHost,
    OtherNodeHost,
    Outside,
}

impl BackendPlace {
    pub fn label(self) -> &'static str {
        match self {
            Self::LocalPod => "pod of this node",
            Self::RemotePod => "pod on another node",
            Self::ThisNodeHost => "this node's host network",
            Self::OtherNodeHost => "another node's host network",
            Self::Outside => "outside the cluster",
        }
    }

    /// A pod of this node judges both perimeters at its own hook; everything else is left
    /// to `moat_after_dnat`.
    pub fn egress_judged_at(self) -> &'static str {
        match self {
            Self::LocalPod => "the backend's hook on this node (both perimeters)",
            _ => "moat_after_dnat in this node's netfilter (after DNAT, before SNAT)",
        }
    }
}

/// The nat table of the family of `vip`, as iptables-save prints it.
pub fn read_nat_table(vip: IpAddr) -> Result<String, String> {
    let tool = if vip.is_ipv4() {
        "iptables-save"
    } else {
        "ip6tables-save"
    };
    let out = Command::new(tool)
        .args(["-t", "nat"])
        .output()
        .map_err(|e| format!("running {tool}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One `-A` line, reduced to what the walk needs.
#[derive(Debug, Default)]
struct Rule {
    destination: Option<(bool, IpNetwork)>,
    protocol: Option<(bool, String)>,
    dport: Option<(bool, u16, u16)>,
    /// Matches the walk cannot evaluate (statistic, addrtype, mark, source, ...).
    uncertain: bool,
    jump: Option<String>,
    to_destination: Option<String>,
}

/// The backends (address and port) a connection to `vip`:`port` over `proto` may be DNATed
/// to, in the order the table lists them, without repeats.
pub fn dnat_backends(save: &str, vip: IpAddr, port: u16, proto: u8) -> Vec<SocketAddr> {
    let chains = parse(save);
    let proto_name = match proto {
        moat_common::PROTO_TCP => "tcp",
        moat_common::PROTO_UDP => "udp",
        moat_common::PROTO_SCTP => "sctp",
        _ => "",
    };
    let mut walk = Walk {
        chains: &chains,
        vip,
        port,
        proto: proto_name,
        visits: 0,
        found: Vec::new(),
    };
    walk.chain("PREROUTING", 0);
    walk.found
}

struct Walk<'a> {
    chains: &'a HashMap<String, Vec<Rule>>,
    vip: IpAddr,
    port: u16,
    proto: &'a str,
    visits: usize,
    found: Vec<SocketAddr>,
}

impl Walk<'_> {
    /// True when the chain certainly ended in a DNAT (or another verdict that ends the nat
    /// table's traversal); false when the packet may come back out of it.
    fn chain(&mut self, name: &str, depth: usize) -> bool {
        if depth > MAX_DEPTH {
            return false;
        }
        let Some(rules) = self.chains.get(name) else {
            return false;
        };
        for rule in rules {
            self.visits += 1;
            if self.visits > MAX_VISITS {
                return false;
            }
            let Some(certain) = self.matches(rule) else {
                continue;
            };
            let ended = match rule.jump.as_deref() {
                Some("DNAT") => {
                    if let Some(to) = rule
                        .to_destination
                        .as_deref()
                        .and_then(|t| to_destination(t, self.port))
                        && !self.found.contains(&to)
                    {
                        self.found.push(to);
                    }
                    true
                }
                // Leaves this chain only: the caller's walk goes on.
                Some("RETURN") if certain => return false,
                Some("RETURN") => false,
                Some("ACCEPT" | "DROP" | "REJECT") => true,
                Some(target) if self.chains.contains_key(target) => self.chain(target, depth + 1),
                // MARK, MASQUERADE, SNAT, LOG, ...: the walk goes on.
                _ => false,
            };
            if ended && certain {
                return true;
            }
        }
        false
    }

    /// None: the rule cannot match. Some(certain): it may match, certainly when every match
    /// was evaluated.
    fn matches(&self, rule: &Rule) -> Option<bool> {
        if let Some((negated, net)) = &rule.destination
            && net.contains(self.vip) == *negated
        {
            return None;
        }
        if let Some((negated, p)) = &rule.protocol
            && (p == self.proto) == *negated
        {
            return None;
        }
        if let Some((negated, lo, hi)) = rule.dport
            && (lo <= self.port && self.port <= hi) == negated
        {
            return None;
        }
        Some(!rule.uncertain)
    }
}

/// `10.0.0.5:8080`, `10.0.0.5`, `[fd00::5]:8080`, `fd00::5`, `10.0.0.5-10.0.0.9:80-90`
/// (the first of a range). Without a port, the port is unchanged.
fn to_destination(text: &str, port: u16) -> Option<SocketAddr> {
    let (addr, ports) = if let Some(rest) = text.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        (addr, after.strip_prefix(':'))
    } else if text.matches(':').count() > 1 {
        (text, None)
    } else {
        match text.split_once(':') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        }
    };
    let addr: IpAddr = addr.split('-').next()?.parse().ok()?;
    let port = match ports {
        Some(p) => p.split('-').next()?.parse().ok()?,
        None => port,
    };
    Some(SocketAddr::new(addr, port))
}

fn parse(save: &str) -> HashMap<String, Vec<Rule>> {
    let mut chains: HashMap<String, Vec<Rule>> = HashMap::new();
    for line in save.lines() {
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let words = split_words(rest);
        let Some((chain, args)) = words.split_first() else {
            continue;
        };
        chains
            .entry(chain.clone())
            .or_default()
            .push(parse_rule(args));
    }
    chains
}

fn parse_rule(args: &[String]) -> Rule {
    let mut rule = Rule::default();
    let mut negate = false;
    let mut i = 0;
    while i < args.len() {
        let word = args[i].as_str();
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match word {
            "!" => {
                negate = true;
                i += 1;
                continue;
            }
            "-d" | "--destination" => {
                match value.parse::<IpNetwork>() {
                    Ok(net) => rule.destination = Some((negate, net)),
                    Err(_) => rule.uncertain = true,
                }
                i += 2;
            }
            "-p" | "--protocol" => {
                rule.protocol = Some((negate, value.to_ascii_lowercase()));
                i += 2;
            }
            "--dport" | "--destination-port" => {
                let (lo, hi) = value.split_once(':').unwrap_or((&value, &value));
                match (lo.parse(), hi.parse()) {
                    (Ok(lo), Ok(hi)) => rule.dport = Some((negate, lo, hi)),
                    _ => rule.uncertain = true,
                }
                i += 2;
            }
            "-j" | "--jump" | "-g" | "--goto" => {
                rule.jump = Some(value);
                i += 2;
            }
            "--to-destination" => {
                rule.to_destination = Some(value);
                i += 2;
            }
            // Match modules and their options: a module named here is not a condition by
            // itself (its options are); comments never are.
            "-m" | "--match" => i += 2,
            "--comment" => i += 2,
            // Protocol modules repeat -p; their options other than ports are conditions.
            _ if word.starts_with('-') => {
                rule.uncertain = true;
                // Options take one value unless the next word is another option.
                i += if args.get(i + 1).is_some_and(|v| !v.starts_with('-')) {
                    2
                } else {
                    1
                };
            }
            _ => i += 1,
        }
        negate = false;
    }
    rule
}

/// Splits an iptables-save rule into words, honouring double quotes (comments).
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_common::{PROTO_TCP, PROTO_UDP};

    /// kube-proxy's iptables mode, as iptables-save prints it (two endpoints, one of them
    /// picked at random), plus a NodePort chain that must not be mistaken for the ClusterIP.
    const KUBE_PROXY: &str = r#"# Generated by iptables-save v1.8.9
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-SEP-ONE - [0:0]
:KUBE-SEP-TWO - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-ABC
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 -j KUBE-SVC-ABC
-A KUBE-SVC-ABC ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-ABC -m comment --comment "default/web:http -> 10.244.1.5:8080" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-ONE
-A KUBE-SVC-ABC -m comment --comment "default/web:http -> 10.244.2.7:8080" -j KUBE-SEP-TWO
-A KUBE-SEP-ONE -s 10.244.1.5/32 -m comment --comment "default/web:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-ONE -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination 10.244.1.5:8080
-A KUBE-SEP-TWO -s 10.244.2.7/32 -m comment --comment "default/web:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-TWO -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination 10.244.2.7:8080
COMMIT
"#;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn kube_proxy_chains_lead_to_every_endpoint() {
        let vip = "10.96.0.10".parse().unwrap();
        assert_eq!(
            dnat_backends(KUBE_PROXY, vip, 80, PROTO_TCP),
            [sa("10.244.1.5:8080"), sa("10.244.2.7:8080")]
        );
        // Another port, protocol or address of the Service range: nothing.
        assert!(dnat_backends(KUBE_PROXY, vip, 81, PROTO_TCP).is_empty());
        assert!(dnat_backends(KUBE_PROXY, vip, 80, PROTO_UDP).is_empty());
        assert!(dnat_backends(KUBE_PROXY, "10.96.0.11".parse().unwrap(), 80, PROTO_TCP).is_empty());
    }

    #[test]
    fn a_plain_dnat_rule_ends_the_walk_and_keeps_the_port_when_it_names_none() {
        let save = "*nat\n-A PREROUTING -d 10.96.0.12/32 -p udp -m udp --dport 53 -j DNAT --to-destination 192.168.1.2\n-A PREROUTING -d 10.96.0.12/32 -p udp -j DNAT --to-destination 192.168.1.3:53\n-A PREROUTING -d fd96::13/128 -p tcp -m tcp --dport 80 -j DNAT --to-destination [2001:db8::1]:8083\nCOMMIT\n";
        assert_eq!(
            dnat_backends(save, "10.96.0.12".parse().unwrap(), 53, PROTO_UDP),
            [sa("192.168.1.2:53")]
        );
        assert_eq!(
            dnat_backends(save, "fd96::13".parse().unwrap(), 80, PROTO_TCP),
            [sa("[2001:db8::1]:8083")]
        );
    }

    #[test]
    fn loops_in_the_table_end_within_the_bounds() {
        let save = "*nat\n-A PREROUTING -j A\n-A A -j B\n-A B -j A\n-A B -j A\nCOMMIT\n";
        assert!(dnat_backends(save, "10.96.0.1".parse().unwrap(), 80, PROTO_TCP).is_empty());
    }

    #[test]
    fn words_honour_quotes() {
        assert_eq!(
            split_words(r#"X -m comment --comment "a \"b\" c" -j Y"#),
            ["X", "-m", "comment", "--comment", "a \"b\" c", "-j", "Y"]
        );
    }
}
