//! Recent detections: a fixed-capacity list in memory (the oldest is dropped) for the API,
//! written to disk by the flow journal's code (flows.rs: JSON lines with sequence numbers in
//! rotating files of bounded size and age) so that a restarted moatd still shows what was
//! detected before.

use std::{collections::VecDeque, path::Path, time::Duration};

use crate::{
    api::ThreatRecord,
    flows::{self, Journal, JournalConfig},
};

/// Detections kept in memory and returned by `moatctl threats`.
pub const CAPACITY: usize = 1024;

/// Where detections go on disk: `<dir>/threats.<n>.jsonl`, two files of 1 MiB (several
/// thousand detections), a week at most.
pub fn disk_config(dir: &Path) -> JournalConfig {
    JournalConfig {
        dir: dir.to_path_buf(),
        stem: "threats",
        max_file_bytes: 1 << 20,
        max_files: 2,
        max_age: Duration::from_secs(7 * 24 * 3600),
    }
}

pub struct ThreatJournal {
    recent: VecDeque<ThreatRecord>,
    capacity: usize,
    /// None keeps the journal in memory only (the directory could not be opened).
    disk: Option<Journal>,
}

impl ThreatJournal {
    pub fn in_memory(capacity: usize) -> Self {
        Self {
            recent: VecDeque::with_capacity(capacity.min(CAPACITY)),
            capacity: capacity.max(1),
            disk: None,
        }
    }

    /// Opens the journal on disk, taking back the newest records written there (within the
    /// age limit). A directory that cannot be opened leaves it in memory, said in the log.
    pub fn open(cfg: JournalConfig, capacity: usize) -> Self {
        let mut journal = Self::in_memory(capacity);
        let oldest = flows::now_ms().saturating_sub(cfg.max_age.as_millis() as u64);
        for (_, r) in flows::read_records(&cfg, |r: &ThreatRecord| r.time_ms >= oldest) {
            journal.keep(r);
        }
        match Journal::open(cfg) {
            Ok(disk) => journal.disk = Some(disk),
            Err(e) => tracing::warn!(error = %e, "threat journal kept in memory only"),
        }
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
        let written = match &mut self.disk {
            Some(disk) => disk.append(std::slice::from_ref(&record)),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(count: u32) -> ThreatRecord {
        ThreatRecord {
            kind: "port-scan".into(),
            count,
            time_ms: flows::now_ms(),
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
    fn a_reopened_journal_shows_what_was_recorded_before_within_its_age() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = ThreatJournal::open(disk_config(dir.path()), 10);
        for n in 0..4 {
            j.record(record(n)).unwrap();
        }
        j.record(ThreatRecord {
            time_ms: 1,
            ..record(99)
        })
        .unwrap();
        drop(j);
        assert!(dir.path().join("threats.0.jsonl").exists());
        let again = ThreatJournal::open(disk_config(dir.path()), 2);
        let counts: Vec<u32> = again.recent(None).iter().map(|r| r.count).collect();
        assert_eq!(counts, [2, 3], "the newest, and nothing past the age limit");
    }
}
