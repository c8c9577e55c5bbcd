//! The unix-socket server and the datastore watcher. Requests are served one at a time under
//! one lock: registrations are short, and serialising them keeps the maps' diff-and-apply
//! simple and correct.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use tracing::{debug, warn};

use crate::{
    api::{HostRequest, Request, Response},
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

/// The answer to a client that is not root: one error line, after reading its request (so
/// that closing does not reset the connection under an unread request).
fn refuse(stream: UnixStream, uid: u32) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut writer = stream.try_clone()?;
    let mut line = String::new();
    let _ = BufReader::new(stream).read_line(&mut line);
    let response = Response::Error {
        message: format!(
            "permission denied: moatd's API accepts only root (uid 0); this client runs as \
             uid {uid}"
        ),
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    writer.write_all(&out)?;
    Ok(())
}

fn latency_kind(request: &Request) -> Option<EventKind> {
    match request {
        Request::Register { .. } => Some(EventKind::Register),
        Request::Unregister { .. } => Some(EventKind::Unregister),
        _ => None,
    }
}

fn serve_connection(daemon: &Mutex<Daemon>, stream: UnixStream) -> anyhow::Result<()> {
    match peer_uid(&stream) {
        Ok(0) => {}
        Ok(uid) => {
            warn!(uid, "refused a local API client that is not root");
            return refuse(stream, uid);
        }
        Err(e) => {
            warn!(error = %e, "refused a local API client: no peer credentials");
            return refuse(stream, u32::MAX);
        }
    }
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        if let Ok(host) = serde_json::from_str::<HostRequest>(&line) {
            let mut out = serde_json::to_vec(&serve_host_request(daemon, host))?;
            out.push(b'\n');
            writer.write_all(&out)?;
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            // A stream, served without the daemon lock for as long as the client stays.
            Ok(Request::FollowFlows { filter }) => {
                let cfg = daemon.lock().expect("daemon lock").journal_config().clone();
                return follow_flows(&cfg, writer, filter);
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
        let mut out = serde_json::to_vec(&response)?;
        out.push(b'\n');
        writer.write_all(&out)?;
    }
    Ok(())
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

pub fn serve(daemon: Arc<Mutex<Daemon>>, listener: UnixListener) {
    let pins = daemon.lock().expect("daemon lock").pins().clone();
    crate::links::resume(&pins);
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let daemon = daemon.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve_connection(&daemon, stream) {
                        debug!(error = %e, "connection ended");
                    }
                });
            }
            Err(e) => warn!(error = %e, "accept failed"),
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
            let d = daemon.lock().expect("daemon lock");
            events.iter().map(|e| d.describe(e, mono, wall)).collect()
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
    stream: UnixStream,
    filter: crate::flows::FlowFilter,
) -> anyhow::Result<()> {
    use crate::flows::{self, FlowFilter};
    let subscription = flows::hub().subscribe();
    let history = flows::read_sequenced(cfg, &filter);
    let mut last = history.iter().map(|(seq, _)| *seq).max().unwrap_or(0);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stream);
    fn send(out: &mut std::io::BufWriter<UnixStream>, response: &Response) -> anyhow::Result<()> {
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
