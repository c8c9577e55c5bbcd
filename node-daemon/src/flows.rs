//! The flow journal: verdict events from the ring buffer, explained (pods, identities, rule)
//! and kept on disk as JSON lines in a few rotating files, so history outlives the ring buffer
//! and a restart. Size and age are bounded by configuration.
//!
//! Every journaled record gets a sequence number (stored as the first field of its line and
//! carried on across restarts), so a `flows --follow` client can be handed the history and
//! then the live stream with nothing missing and nothing twice. Live records reach followers
//! through the [`FlowHub`]: the journal thread publishes each batch after writing it.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    path::PathBuf,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub use moat_api::FlowRecord;

#[derive(Clone, Debug)]
pub struct JournalConfig {
    pub dir: PathBuf,
    /// File names are `<stem>.<n>.jsonl` (`flows`; the threat journal uses the same code).
    pub stem: &'static str,
    /// Bytes per file before rotating.
    pub max_file_bytes: u64,
    /// Files kept (current included).
    pub max_files: usize,
    /// Records older than this are dropped at rotation and never returned.
    pub max_age: Duration,
}

impl JournalConfig {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            stem: "flows",
            max_file_bytes: 16 << 20,
            max_files: 4,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

pub struct Journal {
    cfg: JournalConfig,
    current: File,
    current_bytes: u64,
    /// Sequence number of the next record.
    next_seq: u64,
    /// Reused encoding buffer.
    buf: Vec<u8>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn numbered(cfg: &JournalConfig, n: usize) -> PathBuf {
    cfg.dir.join(format!("{}.{n}.jsonl", cfg.stem))
}

impl Journal {
    pub fn open(cfg: JournalConfig) -> std::io::Result<Self> {
        fs::create_dir_all(&cfg.dir)?;
        let path = numbered(&cfg, 0);
        let current = OpenOptions::new().create(true).append(true).open(&path)?;
        let current_bytes = current.metadata()?.len();
        let next_seq = last_seq(&cfg) + 1;
        Ok(Self {
            cfg,
            current,
            current_bytes,
            next_seq,
            buf: Vec::new(),
        })
    }

    /// The sequence number the next appended record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Writes the records (numbered from `next_seq()`), one write per file touched. Files
    /// rotate at a record boundary once they reach the size limit, so no file exceeds it by
    /// more than one record. The numbers are used up even when writing fails, so followers
    /// and the journal never disagree on them.
    pub fn append<T: serde::Serialize>(&mut self, records: &[T]) -> std::io::Result<()> {
        let first = self.next_seq;
        self.next_seq += records.len() as u64;
        self.buf.clear();
        for (seq, r) in (first..).zip(records) {
            encode_line(&mut self.buf, seq, r)?;
            if self.current_bytes + self.buf.len() as u64 >= self.cfg.max_file_bytes {
                self.write_buf()?;
                self.rotate()?;
            }
        }
        self.write_buf()
    }

    fn write_buf(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.current.write_all(&self.buf)?;
            self.current_bytes += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// flows.0 -> flows.1 -> ... ; the oldest file beyond the limit is deleted, and so is
    /// any file whose newest record is past the age limit.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.current.sync_all()?;
        let cfg = &self.cfg;
        let _ = fs::remove_file(numbered(cfg, cfg.max_files.saturating_sub(1)));
        for n in (0..self.cfg.max_files.saturating_sub(1)).rev() {
            let from = numbered(cfg, n);
            if from.exists() {
                fs::rename(&from, numbered(cfg, n + 1))?;
            }
        }
        let cutoff = now_ms().saturating_sub(self.cfg.max_age.as_millis() as u64);
        for n in 1..self.cfg.max_files {
            let path = numbered(cfg, n);
            if let Ok(meta) = fs::metadata(&path) {
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                if modified < cutoff {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        self.current = OpenOptions::new()
            .create(true)
            .append(true)
            .open(numbered(cfg, 0))?;
        self.current_bytes = 0;
        Ok(())
    }

    /// Total bytes on disk (for status and the size-limit test).
    pub fn disk_bytes(&self) -> u64 {
        (0..self.cfg.max_files)
            .filter_map(|n| fs::metadata(numbered(&self.cfg, n)).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// One journal line: `{"seq":N,` followed by the record's own fields.
fn encode_line<T: serde::Serialize>(buf: &mut Vec<u8>, seq: u64, r: &T) -> std::io::Result<()> {
    let start = buf.len();
    serde_json::to_writer(&mut *buf, r)?;
    // The record is an object: replace its `{` with the sequence field.
    let prefix = format!("{{\"seq\":{seq},");
    buf.splice(start..start + 1, prefix.bytes());
    buf.push(b'\n');
    Ok(())
}

/// The sequence number of a journal line, 0 for lines written before numbering.
fn line_seq(line: &str) -> u64 {
    line.strip_prefix("{\"seq\":")
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The highest sequence number on disk (the newest non-empty file's last line).
fn last_seq(cfg: &JournalConfig) -> u64 {
    for n in 0..cfg.max_files {
        let Ok(mut file) = File::open(numbered(cfg, n)) else {
            continue;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len == 0 {
            continue;
        }
        let tail = len.min(64 << 10);
        let mut text = String::new();
        if file.seek(SeekFrom::Start(len - tail)).is_err()
            || file.read_to_string(&mut text).is_err()
        {
            continue;
        }
        if let Some(seq) = text.lines().rev().map(line_seq).find(|s| *s > 0) {
            return seq;
        }
    }
    0
}

/// Counters of the userspace half of the event path.
#[derive(Debug, Default)]
pub struct PathStats {
    /// Events read from the ring.
    pub received: AtomicU64,
    /// Records that could not be written to the journal.
    pub journal_write_failed: AtomicU64,
    /// Records not delivered to followers that fell behind.
    pub follower_dropped: AtomicU64,
}

/// A batch of journaled records with their sequence numbers.
pub type Batch = Arc<Vec<(u64, FlowRecord)>>;

/// Batches a follower may have queued before it counts as fallen behind.
const FOLLOWER_QUEUE: usize = 4096;

struct Follower {
    tx: SyncSender<Batch>,
    lost: Arc<AtomicU64>,
}

/// Live distribution of journaled records to `flows --follow` clients.
#[derive(Default)]
pub struct FlowHub {
    followers: Mutex<Vec<Follower>>,
    pub stats: PathStats,
}

/// A follower's end: batches in journal order, and how many records it missed.
pub struct Subscription {
    pub batches: Receiver<Batch>,
    pub lost: Arc<AtomicU64>,
}

impl FlowHub {
    pub fn subscribe(&self) -> Subscription {
        let (tx, batches) = std::sync::mpsc::sync_channel(FOLLOWER_QUEUE);
        let lost = Arc::new(AtomicU64::new(0));
        self.followers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Follower {
                tx,
                lost: lost.clone(),
            });
        Subscription { batches, lost }
    }

    /// Never blocks: a follower whose queue is full misses the batch (and is told so);
    /// one that went away is forgotten.
    pub fn publish(&self, batch: Batch) {
        let mut followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        followers.retain(|f| match f.tx.try_send(batch.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(b)) => {
                f.lost.fetch_add(b.len() as u64, Ordering::Relaxed);
                self.stats
                    .follower_dropped
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }

    pub fn followers(&self) -> usize {
        self.followers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// The process's hub (one journal per daemon).
pub fn hub() -> &'static FlowHub {
    static HUB: OnceLock<FlowHub> = OnceLock::new();
    HUB.get_or_init(FlowHub::default)
}

pub use moat_api::FlowFilter;

/// Every record of type `T` in the journal that `keep` takes, oldest first, with its
/// sequence number. Lines of another shape are skipped.
pub fn read_records<T: serde::de::DeserializeOwned>(
    cfg: &JournalConfig,
    keep: impl Fn(&T) -> bool,
) -> Vec<(u64, T)> {
    let mut out = Vec::new();
    for n in (0..cfg.max_files).rev() {
        let Ok(file) = File::open(numbered(cfg, n)) else {
            continue;
        };
        for line in BufReader::new(file).lines().map_while(Result::ok) {
            if let Ok(r) = serde_json::from_str::<T>(&line)
                && keep(&r)
            {
                out.push((line_seq(&line), r));
            }
        }
    }
    out
}

/// Reads the journal oldest first, applying the filter and the age limit.
pub fn read(cfg: &JournalConfig, filter: &FlowFilter) -> Vec<FlowRecord> {
    read_sequenced(cfg, filter)
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

/// As [`read`], with each record's sequence number.
pub fn read_sequenced(cfg: &JournalConfig, filter: &FlowFilter) -> Vec<(u64, FlowRecord)> {
    let now = now_ms();
    let oldest = now.saturating_sub(cfg.max_age.as_millis() as u64);
    let mut out = read_records(cfg, |r: &FlowRecord| {
        r.time_ms >= oldest && filter.matches(r, now)
    });
    if let Some(limit) = filter.limit
        && out.len() > limit
    {
        out.drain(..out.len() - limit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Direction, EndpointMode, Verdict};

    fn record(verdict: Verdict, endpoint: &str, time_ms: u64) -> FlowRecord {
        FlowRecord {
            time_ms,
            verdict,
            reason: "default-deny".into(),
            direction: Direction::Ingress,
            mode: EndpointMode::Enforce,
            protocol: "TCP".into(),
            source: "10.0.0.1".into(),
            destination: "10.0.0.2".into(),
            source_port: 1,
            destination_port: 80,
            endpoint: Some(endpoint.into()),
            peer: Some("prod/client".into()),
            local_identity: 300,
            remote_identity: 301,
            rule_id: 0,
            rule: "default deny".into(),
            bytes: 60,
        }
    }

    #[test]
    fn journal_rotates_within_its_size_limit_and_reads_back_filtered() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = JournalConfig::new(dir.path().to_path_buf());
        cfg.max_file_bytes = 4096;
        cfg.max_files = 3;
        let mut journal = Journal::open(cfg.clone()).unwrap();
        let now = now_ms();
        for i in 0..500 {
            let verdict = if i % 2 == 0 {
                Verdict::Dropped
            } else {
                Verdict::Allowed
            };
            journal.append(&[record(verdict, "prod/web", now)]).unwrap();
        }
        assert!(
            journal.disk_bytes() <= 3 * 4096 + 1024,
            "{}",
            journal.disk_bytes()
        );
        let dropped = read(
            &cfg,
            &FlowFilter {
                verdict: Some(Verdict::Dropped),
                ..Default::default()
            },
        );
        assert!(!dropped.is_empty());
        assert!(dropped.iter().all(|r| r.verdict == Verdict::Dropped));
        let limited = read(
            &cfg,
            &FlowFilter {
                limit: Some(5),
                ..Default::default()
            },
        );
        assert_eq!(limited.len(), 5);
        // A reopened journal (daemon restart) keeps what was written.
        drop(journal);
        let again = Journal::open(cfg.clone()).unwrap();
        assert!(again.disk_bytes() > 0);
        assert!(!read(&cfg, &FlowFilter::default()).is_empty());
    }

    #[test]
    fn sequence_numbers_continue_across_reopen_and_rotation_and_files_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = JournalConfig::new(dir.path().to_path_buf());
        cfg.max_file_bytes = 2048;
        cfg.max_files = 2;
        let mut journal = Journal::open(cfg.clone()).unwrap();
        assert_eq!(journal.next_seq(), 1);
        let now = now_ms();
        let batch: Vec<_> = (0..40)
            .map(|_| record(Verdict::Dropped, "prod/web", now))
            .collect();
        journal.append(&batch).unwrap();
        assert_eq!(journal.next_seq(), 41);
        let line_len = {
            let mut b = Vec::new();
            encode_line(&mut b, 41, &batch[0]).unwrap();
            b.len() as u64
        };
        for n in 0..cfg.max_files {
            let len = fs::metadata(numbered(&cfg, n))
                .map(|m| m.len())
                .unwrap_or(0);
            assert!(len < cfg.max_file_bytes + line_len, "file {n}: {len} bytes");
        }
        let seqs: Vec<u64> = read_sequenced(&cfg, &FlowFilter::default())
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(*seqs.last().unwrap(), 40);
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        drop(journal);
        let mut again = Journal::open(cfg.clone()).unwrap();
        assert_eq!(again.next_seq(), 41, "numbering continues after a restart");
        again.append(&batch[..1]).unwrap();
        let last = read_sequenced(&cfg, &FlowFilter::default());
        assert_eq!(last.last().unwrap().0, 41);
        assert_eq!(last.last().unwrap().1, batch[0]);
    }

    #[test]
    fn hub_delivers_in_order_and_counts_what_a_full_follower_misses() {
        let hub = FlowHub::default();
        let sub = hub.subscribe();
        let r = record(Verdict::Dropped, "prod/web", now_ms());
        for seq in 0..(FOLLOWER_QUEUE as u64 + 3) {
            hub.publish(Arc::new(vec![(seq, r.clone())]));
        }
        assert_eq!(sub.lost.load(Ordering::Relaxed), 3);
        assert_eq!(hub.stats.follower_dropped.load(Ordering::Relaxed), 3);
        let got: Vec<u64> = sub.batches.try_iter().map(|b| b[0].0).collect();
        assert_eq!(got, (0..FOLLOWER_QUEUE as u64).collect::<Vec<_>>());
        drop(sub);
        hub.publish(Arc::new(vec![(99, r)]));
        assert_eq!(hub.followers(), 0, "a gone follower is forgotten");
    }

    #[test]
    fn filters_match_pod_either_side_and_age() {
        let now = now_ms();
        let r = record(Verdict::Dropped, "prod/web", now - 120_000);
        let by_peer = FlowFilter {
            pod: Some("prod/client".into()),
            ..Default::default()
        };
        assert!(by_peer.matches(&r, now));
        let recent = FlowFilter {
            since_secs: Some(60),
            ..Default::default()
        };
        assert!(!recent.matches(&r, now));
    }
}
