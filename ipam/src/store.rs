//! On-disk state of one network: `<dataDir>/<network>/state.json` guarded by an flock on
//! `<dataDir>/<network>/lock`.
//!
//! CNI runs one process per invocation, concurrently for different containers, so every
//! read-modify-write holds the lock; writes go to a temp file that is fsynced and renamed over
//! the state, so a crash leaves either the old or the new state; after allocations the
//! directory is fsynced too (see `commit_release` for why releases skip that).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{IpamError, Result};
use crate::pool::{PoolState, STATE_FORMAT_VERSION};

pub const STATE_FILE: &str = "state.json";
pub const LOCK_FILE: &str = "lock";
/// Where a new state is written before being renamed into place; one left behind by a crash
/// is never read, and is overwritten by the next write.
pub const TEMP_STATE_FILE: &str = "state.json.tmp";

/// The state of one network, loaded under an exclusive lock that lasts as long as this value.
pub struct LockedPool {
    dir: PathBuf,
    pub state: PoolState,
    _lock: Flock<File>,
}

impl LockedPool {
    /// Creates the network directory if needed, waits for the lock, and loads the state (empty
    /// when no state file exists yet).
    pub fn open(dir: &Path) -> Result<LockedPool> {
        fs::create_dir_all(dir).map_err(|e| IpamError::io("creating directory", dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| IpamError::io("opening lock file", &lock_path, e))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, errno)| {
            IpamError::io("locking", &lock_path, std::io::Error::from(errno))
        })?;
        let state = read_state(&dir.join(STATE_FILE))?;
        Ok(LockedPool {
            dir: dir.to_path_buf(),
            state,
            _lock: lock,
        })
    }

    /// Durably replaces the state file with the current state (ADD, and GC).
    pub fn commit(&self) -> Result<()> {
        self.write(Durability::RenameSynced)
    }

    /// Replaces the state file after releases only (DEL). The new content is fsynced before
    /// the rename, so whatever a crash leaves is a whole, readable state; the directory is
    /// not, so a power loss right after may bring back the state before the release. That is
    /// the safe direction: the address stays held by a container that cannot exist any more
    /// (no container survives the node going down), GC hands it back, and it is never given
    /// out twice. An allocation (ADD) gets the directory fsync too: it must not be forgotten
    /// while its pod may be running. This saves DEL one of its two fsyncs, which under write
    /// load from other processes costs milliseconds each (a journal commit).
    pub fn commit_release(&self) -> Result<()> {
        self.write(Durability::ContentSynced)
    }

    fn write(&self, durability: Durability) -> Result<()> {
        let temp_path = self.dir.join(TEMP_STATE_FILE);
        let state_path = self.dir.join(STATE_FILE);
        let bytes = serde_json::to_vec_pretty(&self.state).expect("state serialises");

        let mut temp = File::create(&temp_path)
            .map_err(|e| IpamError::io("creating temp state file", &temp_path, e))?;
        temp.write_all(&bytes)
            .and_then(|()| temp.sync_all())
            .map_err(|e| IpamError::io("writing temp state file", &temp_path, e))?;
        drop(temp);
        fs::rename(&temp_path, &state_path)
            .map_err(|e| IpamError::io("renaming temp state file to", &state_path, e))?;
        if durability == Durability::ContentSynced {
            return Ok(());
        }
        // The rename is only durable once the directory entry is.
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| IpamError::io("syncing directory", &self.dir, e))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Content and rename both on disk when the call returns.
    RenameSynced,
    /// Content on disk; the rename may still be undone by a power loss.
    ContentSynced,
}

fn read_state(path: &Path) -> Result<PoolState> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(PoolState::default()),
        Err(e) => return Err(IpamError::io("reading state file", path, e)),
    };
    let state: PoolState = serde_json::from_slice(&bytes).map_err(|e| IpamError::CorruptState {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    if state.format_version != STATE_FORMAT_VERSION {
        return Err(IpamError::CorruptState {
            path: path.to_path_buf(),
            detail: format!(
                "format version {} is not the supported {STATE_FORMAT_VERSION}",
                state.format_version
            ),
        });
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::StoredAllocation;

    #[test]
    fn missing_state_reads_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let pool = LockedPool::open(&dir.path().join("net")).unwrap();
        assert_eq!(pool.state, PoolState::default());
    }

    #[test]
    fn committed_state_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut pool = LockedPool::open(dir.path()).unwrap();
        pool.state.allocations.push(StoredAllocation {
            address: "10.0.0.2".parse().unwrap(),
            container_id: "c".into(),
            ifname: "eth0".into(),
        });
        pool.commit().unwrap();
        let expected = pool.state.clone();
        drop(pool);
        assert_eq!(LockedPool::open(dir.path()).unwrap().state, expected);
        assert!(!dir.path().join(TEMP_STATE_FILE).exists());
    }

    #[test]
    fn leftover_temp_file_from_a_crash_is_ignored_and_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(TEMP_STATE_FILE),
            b"{\"formatVersion\":1,\"allocat",
        )
        .unwrap();
        let pool = LockedPool::open(dir.path()).unwrap();
        assert_eq!(pool.state, PoolState::default());
        pool.commit().unwrap();
        assert!(!dir.path().join(TEMP_STATE_FILE).exists());
    }

    #[test]
    fn truncated_state_file_is_a_clear_error_and_is_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let truncated = b"{\"formatVersion\":1,\"allocations\":[{\"address\":\"10.0";
        fs::write(dir.path().join(STATE_FILE), truncated).unwrap();
        let err = LockedPool::open(dir.path()).err().unwrap();
        assert!(matches!(err, IpamError::CorruptState { .. }));
        assert!(err.to_string().contains("state.json"));
        assert_eq!(fs::read(dir.path().join(STATE_FILE)).unwrap(), truncated);
    }

    #[test]
    fn empty_state_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE_FILE), b"").unwrap();
        assert!(matches!(
            LockedPool::open(dir.path()),
            Err(IpamError::CorruptState { .. })
        ));
    }

    #[test]
    fn unknown_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(STATE_FILE),
            br#"{"formatVersion":99,"allocations":[]}"#,
        )
        .unwrap();
        assert!(matches!(
            LockedPool::open(dir.path()),
            Err(IpamError::CorruptState { .. })
        ));
    }
}
