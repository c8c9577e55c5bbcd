//! The flow journal: verdict events from the ring buffer, explained (pods, identities, rule)
//! and kept on disk as JSON lines in a few rotating files, so history outlives the ring buffer
//! and a restart. Size and age are bounded by configuration.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub use moat_api::FlowRecord;

#[derive(Clone, Debug)]
pub struct JournalConfig {
    pub dir: PathBuf,
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
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn numbered(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("flows.{n}.jsonl"))
}

impl Journal {
    pub fn open(cfg: JournalConfig) -> std::io::Result<Self> {
        fs::create_dir_all(&cfg.dir)?;
        let path = numbered(&cfg.dir, 0);
        let current = OpenOptions::new().create(true).append(true).open(&path)?;
        let current_bytes = current.metadata()?.len();
        Ok(Self {
            cfg,
            current,
            current_bytes,
        })
    }

    pub fn append(&mut self, records: &[FlowRecord]) -> std::io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        self.current.write_all(&buf)?;
        self.current_bytes += buf.len() as u64;
        if self.current_bytes >= self.cfg.max_file_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    /// flows.0 -> flows.1 -> ... ; the oldest file beyond the limit is deleted, and so is
    /// any file whose newest record is past the age limit.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.current.sync_all()?;
        let dir = self.cfg.dir.clone();
        let _ = fs::remove_file(numbered(&dir, self.cfg.max_files.saturating_sub(1)));
        for n in (0..self.cfg.max_files.saturating_sub(1)).rev() {
            let from = numbered(&dir, n);
            if from.exists() {
                fs::rename(&from, numbered(&dir, n + 1))?;
            }
        }
        let cutoff = now_ms().saturating_sub(self.cfg.max_age.as_millis() as u64);
        for n in 1..self.cfg.max_files {
            let path = numbered(&dir, n);
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
            .open(numbered(&dir, 0))?;
        self.current_bytes = 0;
        Ok(())
    }

    /// Total bytes on disk (for status and the size-limit test).
    pub fn disk_bytes(&self) -> u64 {
        (0..self.cfg.max_files)
            .filter_map(|n| fs::metadata(numbered(&self.cfg.dir, n)).ok())
            .map(|m| m.len())
            .sum()
    }
}

pub use moat_api::FlowFilter;

/// Reads the journal oldest first, applying the filter and the age limit.
pub fn read(cfg: &JournalConfig, filter: &FlowFilter) -> Vec<FlowRecord> {
    let now = now_ms();
    let oldest = now.saturating_sub(cfg.max_age.as_millis() as u64);
    let mut out = Vec::new();
    for n in (0..cfg.max_files).rev() {
        let Ok(file) = File::open(numbered(&cfg.dir, n)) else {
            continue;
        };
        for line in BufReader::new(file).lines().map_while(Result::ok) {
            if let Ok(r) = serde_json::from_str::<FlowRecord>(&line)
                && r.time_ms >= oldest
                && filter.matches(&r, now)
            {
                out.push(r);
            }
        }
    }
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

    fn record(verdict: &str, endpoint: &str, time_ms: u64) -> FlowRecord {
        FlowRecord {
            time_ms,
            verdict: verdict.into(),
            reason: "default-deny".into(),
            direction: "ingress".into(),
            mode: "enforce".into(),
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
            let verdict = if i % 2 == 0 { "dropped" } else { "allowed" };
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
                verdict: Some("dropped".into()),
                ..Default::default()
            },
        );
        assert!(!dropped.is_empty());
        assert!(dropped.iter().all(|r| r.verdict == "dropped"));
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
    fn filters_match_pod_either_side_and_age() {
        let now = now_ms();
        let r = record("dropped", "prod/web", now - 120_000);
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
