//! FQDN egress costs (issue 19), with real packets through the real datapath and a real
//! resolver (dnsmasq in a namespace of its own):
//! - DNS answer latency seen by the pod with the in-kernel parser off and on (the pod's
//!   FQDN flag cleared or set: with it cleared its DNS packets are not read at all), per
//!   query, p50 and p99;
//! - new connections per second to a named host allowed through its learned address (flag
//!   on, an FQDN rule) against the same host allowed by a plain rule (flag off).
//!
//! One datapath, one pod; the configuration is rewritten between batches and the order
//! alternates from batch to batch so that drift hits both alike.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use moat_common::{
    DIRECTION_EGRESS, ENDPOINT_FLAG_FQDN, FQDN_MATCH_EXACT, FqdnConfig, FqdnPatternKey,
    IDENTITY_ANY, IDENTITY_FQDN_FIRST, PROTO_TCP, PROTO_UDP, PolicyKey, PolicyValue,
    fqdn_name_hash,
};
use moat_datapath::{Datapath, FqdnMaps, Maps, PinDir, attach_endpoint};
use moat_testkit::{
    dns::{self, Dnsmasq},
    lab::{Lab, LabPod},
};
use serde_json::{Value, json};

use crate::util::{check_interrupted, median, round};

const CLIENT: u32 = 1000;
const SELECTOR: u32 = IDENTITY_FQDN_FIRST + 1;
const NAME: &str = "web.bench.test";
const PORT: u16 = 8080;

pub struct Params {
    pub queries: usize,
    pub batches: usize,
    pub secs: u64,
}

fn policy(maps: &mut Maps, remote: u32, dport: u16, proto: u8, rule_id: u32) -> Result<()> {
    let key = PolicyKey {
        policy_id: CLIENT,
        remote_identity: remote,
        dport,
        proto,
        direction: DIRECTION_EGRESS,
    };
    maps.upsert_policy(&key, &PolicyValue::allow(rule_id))?;
    Ok(())
}

/// Parser off: the flag cleared and the host allowed by a plain rule. Parser on: the flag
/// set, the plain rule gone, the host allowed only through its learned address.
fn configure(maps: &mut Maps, ifindex: u32, parser_on: bool) -> Result<()> {
    let mut ep = maps.endpoint(ifindex).context("client endpoint")?;
    let plain = PolicyKey {
        policy_id: CLIENT,
        remote_identity: IDENTITY_ANY,
        dport: PORT,
        proto: PROTO_TCP,
        direction: DIRECTION_EGRESS,
    };
    if parser_on {
        ep.flags |= ENDPOINT_FLAG_FQDN;
        let _ = maps.remove_policy(&plain);
    } else {
        ep.flags &= !ENDPOINT_FLAG_FQDN;
        policy(maps, IDENTITY_ANY, PORT, PROTO_TCP, 3)?;
    }
    maps.upsert_endpoint(ifindex, &ep)?;
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[at]
}

/// Sequential queries from the pod; each query's round trip in microseconds.
fn query_batch(client: &LabPod, server: IpAddr, queries: usize) -> Result<Vec<f64>> {
    client
        .run(move || -> Result<Vec<f64>> {
            let socket = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.connect((server, 53))?;
            let mut buf = [0u8; 1500];
            let mut out = Vec::with_capacity(queries);
            for i in 0..queries {
                let q = dns::query(i as u16, NAME, dns::TYPE_A);
                let started = Instant::now();
                socket.send(&q)?;
                let n = socket.recv(&mut buf).context("no DNS answer")?;
                out.push(started.elapsed().as_secs_f64() * 1e6);
                if n < 12 || buf[0..2] != (i as u16).to_be_bytes() {
                    bail!("answer {i} out of order");
                }
            }
            Ok(out)
        })
        .map_err(|e| anyhow::anyhow!("{e:#}"))?
}

/// A server in `pod` answering one byte per connection, on a thread of its own (it ends with
/// the process; the namespace goes with the lab).
fn answer_one_byte(pod: &LabPod) -> Result<()> {
    let listener = pod
        .run(|| std::net::TcpListener::bind(("0.0.0.0", PORT)))
        .map_err(|e| anyhow::anyhow!("{e:#}"))??;
    std::thread::spawn(move || {
        // One byte back, then wait for the client's close: the client closes first, so the
        // TIME_WAIT state stays on its side, where tcp_tw_reuse lets ports come back.
        for mut conn in listener.incoming().flatten() {
            let mut b = [0u8; 1];
            if conn.read_exact(&mut b).is_ok() && conn.write_all(&b).is_ok() {
                let _ = conn.read(&mut b);
            }
        }
    });
    Ok(())
}

/// Connections opened and closed per second for `secs`.
fn connect_batch(client: &LabPod, to: IpAddr, secs: u64) -> Result<f64> {
    client
        .run(move || -> Result<f64> {
            let started = Instant::now();
            let mut done = 0u64;
            while started.elapsed() < Duration::from_secs(secs) {
                let mut conn =
                    TcpStream::connect_timeout(&SocketAddr::new(to, PORT), Duration::from_secs(1))
                        .with_context(|| format!("connection {done} to the named host refused"))?;
                conn.set_read_timeout(Some(Duration::from_secs(1)))?;
                conn.write_all(b"m")?;
                let mut b = [0u8; 1];
                conn.read_exact(&mut b)
                    .context("no answer from the named host")?;
                done += 1;
            }
            Ok(done as f64 / started.elapsed().as_secs_f64())
        })
        .map_err(|e| anyhow::anyhow!("{e:#}"))?
}

pub fn measure(pin_root: &str, params: &Params) -> Result<Value> {
    let pins = PinDir::new(format!("{pin_root}/fqdn"));
    let _dp = Datapath::load(&pins).context("loading the datapath")?;
    let mut lab = Lab::new("mbq")?;
    let client = lab.add_pod("cli")?;
    let resolver = lab.add_pod("dns")?;
    let web = lab.add_pod("web")?;
    let mut maps = Maps::open(&pins)?;
    client.register(&mut maps, CLIENT)?;
    policy(&mut maps, IDENTITY_ANY, 53, PROTO_UDP, 1)?;
    policy(&mut maps, SELECTOR, PORT, PROTO_TCP, 2)?;
    let mut fqdn = FqdnMaps::open(&pins)?;
    fqdn.write_config(&FqdnConfig {
        ttl_floor_s: 3600,
        ttl_cap_s: 86_400,
    })?;
    fqdn.upsert_pattern(
        &FqdnPatternKey {
            identity: CLIENT,
            kind: FQDN_MATCH_EXACT,
            _pad: [0; 3],
            name_hash: fqdn_name_hash(NAME.as_bytes()).context("name")?,
        },
        SELECTOR,
    )?;
    attach_endpoint(&pins, &client.host_if)?;
    let _resolver = Dnsmasq::start(
        &resolver.netns,
        &[IpAddr::V4(resolver.v4)],
        &format!("{} {NAME}\n", web.v4),
        300,
        &[],
    )?;
    crate::traffic::tune_pod(&client)?;
    crate::traffic::tune_pod(&web)?;
    answer_one_byte(&web)?;
    let server = IpAddr::V4(resolver.v4);
    let target = IpAddr::V4(web.v4);
    // Warm up: dnsmasq answering, the address learned.
    let mut ready = false;
    for _ in 0..50 {
        configure(&mut maps, client.ifindex, true)?;
        if query_batch(&client, server, 1).is_ok() {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !ready {
        bail!("dnsmasq did not answer");
    }
    let mut latency: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut rate: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for batch in 0..params.batches {
        for step in 0..2 {
            let on = (batch + step) % 2;
            configure(&mut maps, client.ifindex, on == 1)?;
            latency[on].extend(query_batch(&client, server, params.queries)?);
            rate[on].push(
                connect_batch(&client, target, params.secs)
                    .with_context(|| format!("parser {}", if on == 1 { "on" } else { "off" }))?,
            );
            check_interrupted()?;
        }
    }
    let summary = |samples: &mut Vec<f64>| {
        samples.sort_by(f64::total_cmp);
        json!({
            "p50_us": round(percentile(samples, 0.5), 1),
            "p99_us": round(percentile(samples, 0.99), 1),
            "queries": samples.len(),
        })
    };
    let [off, on] = &mut latency;
    let (off_json, on_json) = (summary(off), summary(on));
    let p99_ratio = percentile(on, 0.99) / percentile(off, 0.99);
    let rate_off = median(&rate[0]).unwrap_or(f64::NAN);
    let rate_on = median(&rate[1]).unwrap_or(f64::NAN);
    Ok(json!({
        "method": "a pod resolving through dnsmasq (UDP, sequential queries) and connecting to \
                   the answered host, with the in-kernel parser off (FQDN flag cleared, the \
                   host allowed by a plain rule) and on (flag set, the host allowed through \
                   its learned address); configurations alternate by batch on one datapath",
        "goal": "no measurable difference in DNS answer latency at p99 (issue 19)",
        "batches": params.batches,
        "dns_answer_latency": {
            "parser_off": off_json,
            "parser_on": on_json,
            "p99_ratio_on_vs_off": round(p99_ratio, 3),
        },
        "new_connections_per_s": {
            "plain_rule": round(rate_off, 1),
            "named_host": round(rate_on, 1),
            "ratio_named_vs_plain": round(rate_on / rate_off, 3),
            "samples_plain": rate[0],
            "samples_named": rate[1],
        },
    }))
}
