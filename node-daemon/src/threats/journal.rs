//! Recent detections: a fixed-capacity list in memory (the oldest is dropped) for the API,
//! backed by JSON lines on disk (like the flow journal: two rotating files of bounded size) so
//! that a restarted moatd still shows what was detected before.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
};

use crate::api::ThreatRecord;

/// Detections kept in memory and returned by `moatctl threats`.
pub const CAPACITY: usize = 1024;
/// Bytes per file on disk before it rotates (two files are kept).
const FILE_BYTES: u64 = 1 << 20;

pub struct ThreatJournal {
    recent: VecDeque<ThreatRecord>,
    capacity: usize,
    /// Where the lines go; None keeps the journal in memory only.
    dir: Option<PathBuf>,
}

fn file(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("threats.{n}.jsonl"))
}

impl ThreatJournal {
    pub fn in_memory(capacity: usize) -> Self {
        Self {
            recent: VecDeque::with_capacity(capacity.min(CAPACITY)),
            capacity: capacity.max(1),
            dir: None,
        }
    }

    /// Opens the journal under `dir`, taking back the newest records written there.
    pub fn open(dir: &Path, capacity: usize) -> Self {
        let mut journal = Self::in_memory(capacity);
        for n in [1, 0] {
            let Ok(f) = File::open(file(dir, n)) else {
                continue;
            };
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                if let Ok(r) = serde_json::from_str::<ThreatRecord>(&line) {
                    journal.keep(r);
                }
            }
        }
        journal.dir = Some(dir.to_path_buf());
        journal
    }

    fn keep(&mut self, record: ThreatRecord) {
        if self.recent.len() == self.capacity {
            self.recent.pop_front();
        }
        self.recent.push_back(record);
    }

    /// Keeps the record and appends it to disk. A write failure is returned but the record
    /// stays in memory (the API still shows it).
    pub fn record(&mut self, record: ThreatRecord) -> std::io::Result<()> {
        let written = match &self.dir {
            Some(dir) => append(dir, &record),
            None => Ok(()),
        };
        self.keep(record);
        written
    }

    /// The newest `limit` (all without one), oldest first.
    pub fn recent(&self, limit: Option<usize>) -> Vec<ThreatRecord> {
        let skip = limit.map_or(0, |l| self.recent.len().saturating_sub(l));
        self.recent.iter().skip(skip).cloned().collect()
    }
}

fn append(dir: &Path, record: &ThreatRecord) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let current = file(dir, 0);
    if fs::metadata(&current).map(|m| m.len()).unwrap_or(0) >= FILE_BYTES {
        fs::rename(&current, file(dir, 1))?;
    }
    let mut line = serde_json::to_vec(record)?;
    line.push(b'\n');
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(current)?
        .write_all(&line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(count: u32) -> ThreatRecord {
        ThreatRecord {
            kind: "port-scan".into(),
            count,
            ..Default::default()
        }
    }

    #[test]
    fn the_oldest_record_goes_when_full_and_limits_return_the_newest() {
        let mut j = ThreatJournal::in_memory(3);
        for n in 0..5 {
            j.record(record(n)).unwrap();
        }
        let counts = |v: Vec<ThreatRecord>| v.iter().map(|r| r.count).collect::<Vec<_>>();
        assert_eq!(counts(j.recent(None)), [2, 3, 4]);
        assert_eq!(counts(j.recent(Some(2))), [3, 4]);
        assert_eq!(counts(j.recent(Some(10))), [2, 3, 4]);
    }

    #[test]
    fn a_reopened_journal_shows_what_was_recorded_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = ThreatJournal::open(dir.path(), 10);
        for n in 0..4 {
            j.record(record(n)).unwrap();
        }
        drop(j);
        let again = ThreatJournal::open(dir.path(), 2);
        let counts: Vec<u32> = again.recent(None).iter().map(|r| r.count).collect();
        assert_eq!(counts, [2, 3]);
    }
}
