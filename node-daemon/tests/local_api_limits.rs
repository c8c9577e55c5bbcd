//! The local API's limits against a real moatd on its real socket: a request line over the
//! maximum size is refused without being buffered, a flood of idle and slow connections
//! neither multiplies moatd's threads nor keeps moat-cni from registering pods, and a client
//! that trickles a request one byte at a time is dropped at its deadline. Every limit breaker
//! is answered with an error line where it still listens, and real clients keep working.

mod support_cni;
mod support_moatd;

use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    os::unix::net::UnixStream,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use moatd::{
    api::{Response, framing::MAX_REQUEST_LINE_BYTES},
    server::DEFAULT_MAX_CONNECTIONS,
};
use serde_json::json;
use support_moatd::Env;

/// A number from moatd's /proc/<pid>/status (`VmRSS` in KiB, `Threads`).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Samples a /proc status field every few milliseconds until dropped; keeps the maximum.
struct Sampler {
    max: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32, field: &'static str) -> Self {
        let max = Arc::new(AtomicU64::new(proc_status(pid, field)));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (max, stop) = (max.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    max.fetch_max(proc_status(pid, field), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Self {
            max,
            stop,
            thread: Some(thread),
        }
    }

    fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The first line moatd sends on `stream` (an answer), as a response.
fn answer_line(stream: &UnixStream) -> Response {
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("an answer line before the close");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

fn error_message(response: Response) -> String {
    match response {
        Response::Error { message } => message,
        other => panic!("an error answer expected, got {other:?}"),
    }
}

/// Reads `stream` to its end: Ok(what arrived) once moatd closed it (EOF or reset), Err if
/// it was still open at `deadline`.
fn read_until_closed(mut stream: &UnixStream, deadline: Instant) -> Result<String, String> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(String::from_utf8_lossy(&received).into_owned());
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return Ok(String::from_utf8_lossy(&received).into_owned()),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return Ok(String::from_utf8_lossy(&received).into_owned());
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading from moatd: {e}"),
        }
    }
}

#[test]
fn a_request_line_over_the_limit_is_refused_without_buffering_it() {
    const PAYLOAD: usize = 200 << 20;
    let env = Env::new("alsz");
    let daemon = env.start();
    let rss_before_kib = proc_status(daemon.pid(), "VmRSS");
    let rss = Sampler::start(daemon.pid(), "VmRSS");

    let stream = UnixStream::connect(env.socket()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // 200 MiB of one line, streamed without a newline until moatd stops taking it.
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![b'x'; 1 << 20];
            let mut sent = 0;
            while sent < PAYLOAD {
                match stream.write(&chunk[..chunk.len().min(PAYLOAD - sent)]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return sent,
                }
            }
            // All of it went in (a server that buffers it): end the line so that such a
            // server answers and the test reports instead of hanging.
            let _ = stream.shutdown(std::net::Shutdown::Write);
            sent
        })
    };
    let response = answer_line(&stream);
    let sent = writer.join().unwrap();
    let rss_max_kib = rss.max().max(proc_status(daemon.pid(), "VmRSS"));
    drop(rss);

    let growth_mib = rss_max_kib.saturating_sub(rss_before_kib) / 1024;
    assert!(
        growth_mib < 32,
        "moatd's RSS grew by {growth_mib} MiB for a 200 MiB line \
         ({rss_before_kib} KiB before, {rss_max_kib} KiB at most)"
    );
    assert!(
        sent < PAYLOAD,
        "moatd stopped reading the line (it took all {sent} bytes)"
    );
    let message = error_message(response);
    assert!(
        message.contains(&format!("longer than {MAX_REQUEST_LINE_BYTES} bytes")),
        "the answer names the limit: {message}"
    );
    eprintln!("RSS: {rss_before_kib} KiB before, {rss_max_kib} KiB at most; {sent} bytes sent");
    assert!(env.status().ready, "moatd still serves");
}

#[test]
fn malformed_requests_are_answered_and_the_connection_keeps_serving() {
    let env = Env::new("almf");
    let _daemon = env.start();
    let mut stream = UnixStream::connect(env.socket()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut next = |request: &[u8]| {
        stream.write_all(request).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        serde_json::from_str::<Response>(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    };
    let message = error_message(next(b"\xff\xfe\n"));
    assert!(message.contains("not UTF-8"), "{message}");
    // Nesting far deeper than the parser's recursion limit, on a connection thread's small
    // stack: refused by the parser, not by a stack overflow.
    let deep = format!("{{\"op\":\"status\",\"x\":{}}}\n", "[".repeat(50_000));
    let message = error_message(next(deep.as_bytes()));
    assert!(message.contains("bad request"), "{message}");
    assert!(
        matches!(
            next(b"{\"op\":\"ready\"}\n"),
            Response::Ready { ready: true, .. }
        ),
        "the same connection still serves"
    );
}

const CNI_NETWORK: &str = "api-limits";

fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a valid rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(limit.rlim_cur >= 2048, "open file limit {}", limit.rlim_cur);
}

/// Namespaces of the test, deleted on drop (also when an assertion fails).
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn a_thousand_slow_clients_do_not_stop_cni_adds() {
    const SLOW_CLIENTS: usize = 1000;
    const PODS: usize = 4;
    raise_open_file_limit();
    let env = Env::new("alfl");
    let mut objects = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: al\n".to_string();
    for i in 0..PODS {
        objects += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: al\n  \
             labels: {{app: p{i}}}\n"
        );
    }
    env.write("00-pods.yaml", &objects);
    // A short request deadline (the test waits for it) and the default connection cap.
    let timeout_ms = 4000;
    let daemon = env.start_with(&["--api-request-timeout-ms", &timeout_ms.to_string()]);
    let threads_before = proc_status(daemon.pid(), "Threads");
    let threads = Sampler::start(daemon.pid(), "Threads");

    // Half send nothing, half the start of a request that never ends.
    let slow: Vec<UnixStream> = (0..SLOW_CLIENTS)
        .map(|i| {
            let mut stream = UnixStream::connect(env.socket()).unwrap();
            if i % 2 == 1 {
                stream.write_all(b"{\"op\":").unwrap();
            }
            stream
        })
        .collect();
    let flood_done = Instant::now();

    let cni_bin = support_cni::cni_path(env.root());
    let mut conf = env.standalone_conf(
        CNI_NETWORK,
        json!([[{"subnet": "10.92.0.0/24"}], [{"subnet": "fd92::/64"}]]),
    );
    conf["registrationTimeoutMs"] = 5000.into();
    let tag = std::process::id() % 100_000;
    let mut namespaces = Netns(Vec::new());
    for i in 0..PODS {
        let netns = format!("al{tag}p{i}");
        assert!(
            Command::new("ip")
                .args(["netns", "add", &netns])
                .status()
                .unwrap()
                .success()
        );
        namespaces.0.push(netns.clone());
        let container_id = format!("al-p{i}");
        let name = format!("p{i}");
        let pod = support_cni::CniPod {
            container_id: &container_id,
            netns: &netns,
            namespace: "al",
            name: &name,
        };
        let added = support_cni::run(None, &cni_bin, &conf, "ADD", &pod)
            .unwrap_or_else(|e| panic!("ADD of {name} with the table full: {e}"));
        assert!(
            support_cni::result_ip(&added, false).is_some(),
            "an address: {added}"
        );
        assert_eq!(env.status().endpoints, 1, "{name} registered");
        support_cni::run(None, &cni_bin, &conf, "DEL", &pod)
            .unwrap_or_else(|e| panic!("DEL of {name} with the table full: {e}"));
        assert_eq!(env.status().endpoints, 0, "{name} unregistered");
    }
    let served_meanwhile = flood_done.elapsed();

    // Every slow client is closed by moatd: evicted ones at once (EOF), the ones still held
    // at their deadline, after an error line that says why.
    let deadline = Instant::now() + Duration::from_millis(timeout_ms) + Duration::from_secs(20);
    let mut timed_out = 0;
    for (i, stream) in slow.iter().enumerate() {
        let received = read_until_closed(stream, deadline)
            .unwrap_or_else(|got| panic!("slow client {i} still open ({got:?})"));
        if received.contains("no complete request line within") {
            timed_out += 1;
        } else {
            assert_eq!(received, "", "slow client {i}: evicted without an answer");
        }
    }
    let max_threads = threads.max();
    drop(threads);
    assert!(
        max_threads <= threads_before + DEFAULT_MAX_CONNECTIONS as u64 + 4,
        "moatd ran {max_threads} threads ({threads_before} before {SLOW_CLIENTS} slow \
         clients; cap {DEFAULT_MAX_CONNECTIONS})"
    );
    assert!(
        (1..=DEFAULT_MAX_CONNECTIONS).contains(&timed_out),
        "{timed_out} slow clients were held until their deadline (at most the cap, \
         {DEFAULT_MAX_CONNECTIONS}); the ADDs took {served_meanwhile:?}"
    );
    assert!(env.status().ready, "moatd still serves");
    eprintln!(
        "threads: {threads_before} before, {max_threads} at most; {timed_out} slow clients \
         held until their deadline, the rest evicted"
    );
}

#[test]
fn a_slowloris_is_dropped_at_its_deadline() {
    // A byte every 100 ms; never a newline. It would take this long to send them all.
    const BYTES: usize = 400;
    let env = Env::new("alsl");
    let timeout_ms = 1500;
    let _daemon = env.start_with(&["--api-request-timeout-ms", &timeout_ms.to_string()]);
    let stream = UnixStream::connect(env.socket()).unwrap();
    let trickle = {
        let mut stream = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            for sent in 0..BYTES {
                if stream.write_all(b" ").is_err() {
                    return sent;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            BYTES
        })
    };
    // A real client is served meanwhile.
    assert!(env.status().ready);
    let received = read_until_closed(&stream, Instant::now() + Duration::from_secs(60))
        .unwrap_or_else(|got| panic!("the slowloris is still connected ({got:?})"));
    let sent = trickle.join().unwrap();
    let answer: Response =
        serde_json::from_str(received.trim_end()).unwrap_or_else(|e| panic!("{e}: {received:?}"));
    let message = error_message(answer);
    assert!(
        message.contains(&format!("no complete request line within {timeout_ms} ms")),
        "{message}"
    );
    assert!(
        sent < BYTES,
        "moatd closed the connection while it trickled"
    );
    assert!(env.status().ready, "moatd still serves");
}
