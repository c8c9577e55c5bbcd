//! The unix-socket server and the datastore watcher. Requests are served one at a time under
//! one lock: registrations are short, and serialising them keeps the maps' diff-and-apply
//! simple and correct.
//!
//! The socket is bounded ([`ApiLimits`]): a request line has a maximum size and must arrive
//! in full within a deadline, an answer must be taken by the client within the same time,
//! and at most `max_connections` connections (one thread each) are open at once. At the cap a
//! newcomer takes the place of the connection that has waited longest for its request (or, if
//! none waits, of the oldest `FollowFlows` stream); a request being served is never cut off,
//! and when every connection is serving one the newcomer is told `busy` and closed.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufReader, Read, Write},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use tracing::{debug, warn};

use crate::{
    api::{
        HostRequest, Request, Response,
        framing::{self, FramingError},
    },
    daemon::Daemon,
    local,
    metrics::{self, EventKind},
};

pub fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file left by a killed daemon would make bind fail.
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The peer's uid from the kernel (SO_PEERCRED): who connected, whatever the socket's mode.
fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    let creds = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(std::io::Error::from)?;
    Ok(creds.uid())
}

/// How long a client that is not root may take to send the request it is refused for.
const REFUSAL_READ_TIME: Duration = Duration::from_secs(2);

/// The answer to a client that is not root: one error line, after reading its request (so
/// that closing does not reset the connection under an unread request). The read is bounded
/// like any other: at most one line of the maximum size, within [`REFUSAL_READ_TIME`].
fn refuse(
    stream: &UnixStream,
    reader: &mut BufReader<DeadlineReader<'_>>,
    uid: u32,
    limits: &ApiLimits,
) -> anyhow::Result<()> {
    reader.get_mut().deadline = Instant::now() + REFUSAL_READ_TIME.min(limits.request_timeout);
    let _ = framing::read_request_line(reader, limits.max_request_bytes);
    answer(
        stream,
        &Response::Error {
            message: format!(
                "permission denied: moatd's API accepts only root (uid 0); this client runs as \
                 uid {uid}"
            ),
        },
    )
}

/// One answer line.
fn answer(mut stream: &UnixStream, response: &Response) -> anyhow::Result<()> {
    let mut out = serde_json::to_vec(response)?;
    out.push(b'\n');
    stream.write_all(&out)?;
    Ok(())
}

/// Reads from the socket against an absolute deadline: each read may block only for the time
/// left, so a client that trickles bytes cannot stretch a request line past the deadline (a
/// plain read timeout restarts with every byte).
struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

/// The error line for a request line that broke a limit (the connection is dropped after it).
fn framing_refusal(error: &FramingError, limits: &ApiLimits) -> Response {
    let message = match error {
        FramingError::TooLong { limit } => {
            format!("request line longer than {limit} bytes: refused, closing the connection")
        }
        FramingError::TimedOut { received } => format!(
            "no complete request line within {} ms ({received} bytes received): closing the \
             connection",
            limits.request_timeout.as_millis()
        ),
        other => format!("{other}"),
    };
    Response::Error { message }
}

fn serve_connection(
    daemon: &Mutex<Daemon>,
    stream: &UnixStream,
    slot: &Slot,
    limits: &ApiLimits,
) -> anyhow::Result<()> {
    // A client that stops reading its answers (or its stream) is dropped after this long.
    stream.set_write_timeout(Some(limits.request_timeout))?;
    let mut reader = BufReader::new(DeadlineReader {
        stream,
        deadline: Instant::now() + limits.request_timeout,
    });
    match peer_uid(stream) {
        Ok(0) => {}
        Ok(uid) => {
            warn!(uid, "refused a local API client that is not root");
            return refuse(stream, &mut reader, uid, limits);
        }
        Err(e) => {
            warn!(error = %e, "refused a local API client: no peer credentials");
            return refuse(stream, &mut reader, u32::MAX, limits);
        }
    }
    loop {
        let line = match framing::read_request_line(&mut reader, limits.max_request_bytes) {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(()),
            Err(FramingError::Io(e)) => return Err(e.into()),
            // The newline was consumed: the stream is still at a line boundary.
            Err(FramingError::NotUtf8) => {
                answer(
                    stream,
                    &Response::Error {
                        message: "bad request: not UTF-8".into(),
                    },
                )?;
                continue;
            }
            Err(error) => {
                // Too long (the rest of the line is unread) or too slow: answered if the
                // client still listens, then dropped.
                debug!(%error, "local API client broke a limit");
                let _ = answer(stream, &framing_refusal(&error, limits));
                return Ok(());
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        // From here the connection is not evictable; if it was evicted while its request
        // arrived, the request is not served (its socket is already shut down).
        if !slot.enter(Phase::Serving) {
            return Ok(());
        }
        if let Ok(host) = serde_json::from_str::<HostRequest>(&line) {
            answer(stream, &serve_host_request(daemon, host))?;
        } else {
            let response = match serde_json::from_str::<Request>(&line) {
                // A stream, served without the daemon lock for as long as the client stays.
                Ok(Request::FollowFlows { filter }) => {
                    let cfg = daemon.lock().expect("daemon lock").journal_config().clone();
                    if !slot.enter(Phase::Following) {
                        return Ok(());
                    }
                    return follow_flows(&cfg, stream, filter);
                }
                Ok(request) => {
                    // From the request's arrival (lock wait included) to the maps updated.
                    let started = Instant::now();
                    let kind = latency_kind(&request);
                    let response = daemon.lock().expect("daemon lock").handle(request);
                    let elapsed = started.elapsed();
                    if let Some(kind) = kind
                        && !matches!(response, Response::Error { .. })
                    {
                        metrics::global().observe_event(kind, elapsed);
                    }
                    debug!(elapsed_us = elapsed.as_micros() as u64, "request served");
                    response
                }
                Err(e) => Response::Error {
                    message: format!("bad request: {e}"),
                },
            };
            answer(stream, &response)?;
        }
        // The next request has its own full deadline, counted from this answer.
        if !slot.enter(Phase::AwaitingRequest) {
            return Ok(());
        }
        reader.get_mut().deadline = Instant::now() + limits.request_timeout;
    }
}

fn latency_kind(request: &Request) -> Option<EventKind> {
    match request {
        Request::Register { .. } => Some(EventKind::Register),
        Request::Unregister { .. } => Some(EventKind::Unregister),
        _ => None,
    }
}

/// A [`HostRequest`]: the veth's link pins are set aside first (the programs stay on until
/// the kernel removes them with the device, and the daemon's unregister finds nothing to
/// detach, which on a live device would wait for an RCU grace period per hook); then the
/// daemon forgets the endpoint like any unregister, so the programs drop everything on the
/// veth; the answer goes out and the veth is deleted in the background.
fn serve_host_request(daemon: &Mutex<Daemon>, request: HostRequest) -> Response {
    let started = Instant::now();
    let HostRequest::UnregisterAndDeleteLink {
        host_ifname,
        host_ifindex,
        ..
    } = &request;
    let mut guard = daemon.lock().expect("daemon lock");
    let pins = guard.pins().clone();
    // Only the pins of that very device: a veth re-created under the name keeps its own.
    let ours = moat_datapath::rtnl::ifindex_of(host_ifname) == Some(*host_ifindex);
    if ours
        && let Err(e) = moat_datapath::attach::set_aside_links(&pins, host_ifname, *host_ifindex)
    {
        warn!(ifname = %host_ifname, error = %e, "setting link pins aside failed");
    }
    let response = guard.handle(request.unregister());
    drop(guard);
    if matches!(response, Response::Error { .. }) {
        return response;
    }
    metrics::global().observe_event(EventKind::Unregister, started.elapsed());
    if ours {
        crate::links::delete_later(crate::links::DoomedLink {
            ifindex: *host_ifindex,
            name: host_ifname.clone(),
            pins,
        });
    }
    response
}

/// The local API's limits (moatd's `--api-*` flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiLimits {
    /// Connections open at once, each served by its own thread.
    pub max_connections: usize,
    /// The time a connection has to deliver a complete request line, from its opening or
    /// from its previous answer; also the longest one write of an answer may block on a
    /// client that does not read.
    pub request_timeout: Duration,
    /// The longest request line, in bytes.
    pub max_request_bytes: usize,
}

/// 256 connections: far above what the node's clients use at once (one per CNI invocation
/// in flight, a few moatctl), small enough that the threads and buffers stay cheap.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// A real client sends its request right after connecting; 10 s is generous for a loaded
/// node and short enough that idle connections do not pile up.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_request_bytes: framing::MAX_REQUEST_LINE_BYTES,
        }
    }
}

/// Stack of a connection thread. Parsing is bounded (serde_json stops nesting at 128 levels)
/// and the daemon's work is on the heap, so a quarter of the default 2 MiB is ample; the
/// table's threads then reserve 128 MiB of address space at the default cap, not 512 MiB.
const CONNECTION_STACK_BYTES: usize = 512 * 1024;

/// How long accepting waits for an evicted connection's thread to end (a `FollowFlows`
/// stream notices at its next heartbeat, within 2 s) before the newcomer is told `busy`.
const EVICTION_WAIT: Duration = Duration::from_secs(5);

/// Where a connection is in its life: what decides whether it may be evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for (or receiving) a request line: evictable first, oldest first.
    AwaitingRequest,
    /// A request is being served: never evicted.
    Serving,
    /// A `FollowFlows` stream: evicted only when no connection awaits a request.
    Following,
}

struct Entry {
    /// Shared with the connection's thread, which serves it; kept here to shut it down.
    stream: Arc<UnixStream>,
    phase: Phase,
    /// When the connection entered its phase.
    since: Instant,
    evicted: bool,
}

/// The open connections (at most the limit), each entry removed when its thread ends.
struct Connections {
    limit: usize,
    entries: Mutex<BTreeMap<u64, Entry>>,
    /// Notified when an entry is removed.
    freed: Condvar,
    next_id: std::sync::atomic::AtomicU64,
}

/// A connection's place in the table, released when its thread drops it.
struct Slot {
    id: u64,
    connections: Arc<Connections>,
}

impl Slot {
    /// Moves the connection into `phase`; false if it was evicted, and must end.
    fn enter(&self, phase: Phase) -> bool {
        let mut entries = self.connections.lock();
        match entries.get_mut(&self.id) {
            Some(entry) if !entry.evicted => {
                entry.phase = phase;
                entry.since = Instant::now();
                true
            }
            _ => false,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
        self.connections.freed.notify_all();
    }
}

impl Connections {
    fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            entries: Mutex::new(BTreeMap::new()),
            freed: Condvar::new(),
            next_id: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        // Entries are plain data: a panicking connection thread leaves them consistent.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection, evicting one if the table is full; None if every
    /// connection is serving a request (or an evicted one did not end in time).
    fn admit(self: &Arc<Self>, stream: &Arc<UnixStream>) -> Option<Slot> {
        let deadline = Instant::now() + EVICTION_WAIT;
        let mut entries = self.lock();
        loop {
            if entries.len() < self.limit {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                entries.insert(
                    id,
                    Entry {
                        stream: stream.clone(),
                        phase: Phase::AwaitingRequest,
                        since: Instant::now(),
                        evicted: false,
                    },
                );
                return Some(Slot {
                    id,
                    connections: self.clone(),
                });
            }
            // One eviction at a time: its thread ends promptly (its socket is shut down),
            // and waiting for it keeps the threads within the limit.
            if !entries.values().any(|e| e.evicted) {
                // None when every connection is serving a request: the newcomer is busy.
                let victim = entries
                    .values_mut()
                    .filter(|e| e.phase != Phase::Serving)
                    .min_by_key(|e| (e.phase == Phase::Following, e.since))?;
                debug!(phase = ?victim.phase, "connection table full: evicting the oldest");
                victim.evicted = true;
                // Wakes its thread from a blocked read or write; the client sees EOF.
                let _ = victim.stream.shutdown(std::net::Shutdown::Both);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            entries = self
                .freed
                .wait_timeout(entries, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The answer to a connection that found every place taken by a request being served. Sent
/// without blocking the accept loop: a fresh socket's buffer always has room for it.
fn refuse_busy(stream: &UnixStream, limit: usize) {
    let response = Response::Error {
        message: format!(
            "busy: moatd is serving {limit} local API connections (its limit); try again"
        ),
    };
    if let Ok(mut out) = serde_json::to_vec(&response) {
        out.push(b'\n');
        let mut writer = stream;
        let _ = stream
            .set_nonblocking(true)
            .and_then(|()| writer.write_all(&out));
    }
}

pub fn serve(daemon: Arc<Mutex<Daemon>>, listener: UnixListener, limits: ApiLimits) {
    let pins = daemon.lock().expect("daemon lock").pins().clone();
    crate::links::resume(&pins);
    let connections = Connections::new(limits.max_connections);
    let mut threads = Vec::new();
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => Arc::new(stream),
            Err(e) => {
                warn!(error = %e, "accept failed");
                continue;
            }
        };
        let Some(slot) = connections.admit(&stream) else {
            warn!(
                limit = connections.limit,
                "local API connection refused: every connection is serving a request"
            );
            refuse_busy(&stream, connections.limit);
            continue;
        };
        // A thread that gave its place up may still be returning: the cap counts threads.
        reap_finished(&mut threads);
        while threads.len() >= connections.limit {
            std::thread::sleep(Duration::from_millis(1));
            reap_finished(&mut threads);
        }
        let daemon = daemon.clone();
        let spawned = std::thread::Builder::new()
            .name("moatd-api".into())
            .stack_size(CONNECTION_STACK_BYTES)
            .spawn(move || {
                if let Err(e) = serve_connection(&daemon, &stream, &slot, &limits) {
                    debug!(error = %e, "connection ended");
                }
            });
        match spawned {
            Ok(thread) => threads.push(thread),
            // The closure, its slot and its stream are dropped: the client sees EOF.
            Err(e) => warn!(error = %e, "cannot start a local API connection thread"),
        }
    }
}

/// Joins the connection threads that have returned (which then have really exited).
fn reap_finished(threads: &mut Vec<std::thread::JoinHandle<()>>) {
    let mut i = 0;
    while i < threads.len() {
        if threads[i].is_finished() {
            let _ = threads.swap_remove(i).join();
        } else {
            i += 1;
        }
    }
}

/// Watches the local datastore directory (inotify: only the files named in events are
/// re-read) or polls the Kubernetes datastore's generation, and applies changes; resyncs
/// the maps against the kernel every `resync` to heal any drift. A full directory scan runs
/// at every resync too, and whenever the watch cannot say which files changed (queue
/// overflow, a non-object name such as the `..data` swap of a ConfigMap volume) or could
/// not be set up.
pub fn watch(daemon: Arc<Mutex<Daemon>>, poll: Duration, resync: Duration) {
    let (dir, is_local) = {
        let d = daemon.lock().expect("daemon lock");
        (
            d.policy_dir().to_path_buf(),
            d.source_generation().is_none(),
        )
    };
    let mut watch = if is_local {
        DirWatch::new(&dir)
            .map_err(
                |e| warn!(error = %e, dir = %dir.display(), "no inotify; polling the directory"),
            )
            .ok()
    } else {
        None
    };
    let mut last_resync = Instant::now();
    loop {
        let change = match &mut watch {
            Some(w) => w.wait(poll),
            None => {
                std::thread::sleep(poll);
                Change::Unknown
            }
        };
        let detected = Instant::now();
        let mut d = daemon.lock().expect("daemon lock");
        let changed = match &change {
            Change::None => false,
            Change::Files(paths) => d.reload_files(paths),
            Change::Unknown => d.reload_objects(),
        };
        if changed {
            let applied = detected.elapsed();
            // For the local datastore the event happened when the newest file was written;
            // for Kubernetes, when this poll saw it.
            let since_write = if is_local {
                newest_write_age(&dir)
            } else {
                None
            };
            let latency = since_write
                .filter(|l| *l <= applied + poll * 2)
                .unwrap_or(applied);
            metrics::global().observe_event(EventKind::Datastore, latency);
        }
        if last_resync.elapsed() >= resync {
            last_resync = Instant::now();
            if is_local {
                d.reload_objects();
            }
            match d.resync() {
                Ok(stats) if stats.upserts + stats.deletes > 0 => {
                    warn!(?stats, "resync corrected drift in the maps")
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "resync failed"),
            }
        }
    }
}

/// What a directory watch saw.
enum Change {
    None,
    Files(BTreeSet<PathBuf>),
    /// Something changed; which files is not known.
    Unknown,
}

/// inotify on the local datastore directory.
struct DirWatch {
    dir: PathBuf,
    inotify: nix::sys::inotify::Inotify,
}

impl DirWatch {
    fn new(dir: &Path) -> nix::Result<Self> {
        use nix::sys::inotify::{AddWatchFlags as F, InitFlags, Inotify};
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(
            dir,
            F::IN_CLOSE_WRITE
                | F::IN_MOVED_TO
                | F::IN_MOVED_FROM
                | F::IN_DELETE
                | F::IN_CREATE
                | F::IN_ATTRIB,
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            inotify,
        })
    }

    /// Waits up to `timeout` for events, then drains them.
    fn wait(&mut self, timeout: Duration) -> Change {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use nix::sys::inotify::AddWatchFlags as F;
        use std::os::fd::AsFd;
        let ms = PollTimeout::try_from(timeout.as_millis().min(60_000) as i32)
            .unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) => return Change::None,
            Ok(_) => {}
            Err(_) => return Change::Unknown,
        }
        let mut paths = BTreeSet::new();
        loop {
            match self.inotify.read_events() {
                Ok(events) if !events.is_empty() => {
                    for event in events {
                        if event.mask.contains(F::IN_Q_OVERFLOW) {
                            return Change::Unknown;
                        }
                        let Some(name) = event.name else {
                            // The directory itself.
                            return Change::Unknown;
                        };
                        let path = self.dir.join(name);
                        if local::is_object_file(&path) {
                            paths.insert(path);
                        } else if !path
                            .file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with('.') && !n.starts_with(".."))
                        {
                            // Not a hidden temp file: e.g. a ConfigMap's `..data` swap.
                            return Change::Unknown;
                        }
                    }
                }
                _ => break,
            }
        }
        if paths.is_empty() {
            Change::None
        } else {
            Change::Files(paths)
        }
    }
}

/// How long ago the newest object file in `dir` was written (as of the poll that saw it).
fn newest_write_age(dir: &Path) -> Option<Duration> {
    // The directory's own mtime moves on create, rename and delete.
    let newest = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .chain(std::fs::metadata(dir).and_then(|m| m.modified()))
        .max()?;
    std::time::SystemTime::now().duration_since(newest).ok()
}

/// Datapath settings moatd owns in the config map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathSettings {
    /// Verdict events each CPU may emit per second, and in a burst above that.
    pub event_rate_per_cpu: u32,
    pub event_burst: u32,
    /// Linked local flows cross the host's stack instead of being delivered directly.
    pub local_via_host: bool,
}

/// Writes moatd's settings into the datapath's config map; the other flags there are kept.
pub fn configure_datapath(
    pins: &moat_datapath::PinDir,
    settings: &DatapathSettings,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        settings.event_rate_per_cpu > 0 && settings.event_burst > 0,
        "the event rate and burst must be at least 1"
    );
    let mut maps = moat_datapath::Maps::open(pins)?;
    let mut config = maps.config.get(&0, 0).unwrap_or_default();
    config.events_per_second = settings.event_rate_per_cpu;
    config.events_burst = settings.event_burst;
    config.set_flag(
        moat_common::CONFIG_FLAG_LOCAL_VIA_HOST,
        settings.local_via_host,
    );
    maps.set_config(&config)?;
    Ok(())
}

/// Drains the datapath's event ring into the flow journal, explaining each event.
pub fn journal_events(daemon: Arc<Mutex<Daemon>>) {
    let (pins, journal_cfg) = {
        let d = daemon.lock().expect("daemon lock");
        (d.pins().clone(), d.journal_config().clone())
    };
    let mut reader = match moat_datapath::EventReader::open(&pins) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "flow events unavailable");
            return;
        }
    };
    let mut journal = match crate::flows::Journal::open(journal_cfg) {
        Ok(j) => j,
        Err(e) => {
            warn!(error = %e, "flow journal unavailable");
            return;
        }
    };
    loop {
        let events = match reader.wait(Duration::from_millis(200)) {
            Ok(events) => events,
            Err(e) => {
                warn!(error = %e, "reading events");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if events.is_empty() {
            continue;
        }
        let hub = crate::flows::hub();
        hub.stats
            .received
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let mono = monotonic_ns();
        let wall = crate::flows::now_ms();
        let records: Vec<_> = {
            let mut d = daemon.lock().expect("daemon lock");
            let records: Vec<_> = events.iter().map(|e| d.describe(e, mono, wall)).collect();
            // Workloads under promotion learn from (and are held back by) their flows.
            d.observe_promotions(&records);
            records
        };
        metrics::global().journaled(&records);
        let first = journal.next_seq();
        if let Err(e) = journal.append(&records) {
            warn!(error = %e, "writing flow journal");
            hub.stats
                .journal_write_failed
                .fetch_add(records.len() as u64, Ordering::Relaxed);
        }
        if hub.followers() > 0 {
            hub.publish(Arc::new((first..).zip(records).collect()));
        }
    }
}

/// Records per `Flows` line of a follow stream (bounds a line's size).
const FOLLOW_LINE_RECORDS: usize = 4096;

/// Serves a `FollowFlows` stream: subscribe first, then read the history, so that every
/// record is in the history or in the stream; the sequence numbers drop the overlap.
fn follow_flows(
    cfg: &crate::flows::JournalConfig,
    stream: &UnixStream,
    filter: crate::flows::FlowFilter,
) -> anyhow::Result<()> {
    use crate::flows::{self, FlowFilter};
    let subscription = flows::hub().subscribe();
    let history = flows::read_sequenced(cfg, &filter);
    let mut last = history.iter().map(|(seq, _)| *seq).max().unwrap_or(0);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stream);
    fn send(out: &mut std::io::BufWriter<&UnixStream>, response: &Response) -> anyhow::Result<()> {
        serde_json::to_writer(&mut *out, response)?;
        out.write_all(b"\n")?;
        Ok(())
    }
    send(
        &mut out,
        &Response::Flows {
            flows: history.into_iter().map(|(_, r)| r).collect(),
        },
    )?;
    out.flush()?;
    // Live records are new by definition: no age or count limit.
    let live = FlowFilter {
        since_secs: None,
        limit: None,
        ..filter
    };
    loop {
        let first = match subscription.batches.recv_timeout(Duration::from_secs(2)) {
            Ok(batch) => batch,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // A heartbeat: finds out when the client has gone.
                send(&mut out, &Response::Flows { flows: Vec::new() })?;
                out.flush()?;
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        };
        // Everything queued goes out now, in lines of bounded size, then one flush.
        let mut batch = Some(first);
        while let Some(b) = batch.take() {
            let mut flows = Vec::new();
            for (seq, r) in b.iter() {
                if *seq > last && live.matches(r, 0) {
                    flows.push(r.clone());
                }
                last = last.max(*seq);
            }
            for chunk in flows.chunks(FOLLOW_LINE_RECORDS) {
                send(
                    &mut out,
                    &Response::Flows {
                        flows: chunk.to_vec(),
                    },
                )?;
            }
            batch = subscription.batches.try_recv().ok();
        }
        let lost = subscription.lost.swap(0, Ordering::Relaxed);
        if lost > 0 {
            send(&mut out, &Response::FlowsLost { lost })?;
        }
        out.flush()?;
    }
}

/// CLOCK_MONOTONIC, the clock the programs read (coarsely: bpf_ktime_get_coarse_ns() lags it by
/// at most a tick, so their timestamps are at most a tick early).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
