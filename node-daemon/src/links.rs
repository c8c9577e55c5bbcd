//! Host veths that standalone DEL hands over for deletion ([`moat_api::HostRequest`]).
//!
//! The kernel takes tens of milliseconds to delete a veth (an RCU barrier before the device
//! is freed, plus a grace period per hook when TCX programs are on it), all inside the
//! deleting thread's netlink call. By the time a link arrives here moatd has already removed
//! its endpoint from the maps, so the programs drop everything on it: it only has to go away,
//! which one worker thread does in the background, in arrival order.

use std::sync::{OnceLock, mpsc};

use moat_datapath::{
    PinDir,
    attach::{drop_set_aside_links, set_aside_links_list},
    rtnl::{delete_link, ifindex_of},
};

use tracing::{debug, warn};

/// A host veth to delete: by index, and only while that index still has this name. Its link
/// pins (or, tc-attached, its marker pin) were set aside (`attach::set_aside_links`) and go
/// once the device is gone.
#[derive(Clone, Debug)]
pub struct DoomedLink {
    pub ifindex: u32,
    pub name: String,
    pub pins: PinDir,
}

/// At start: finishes deletions a previous moatd had queued (their pins are still set aside).
pub fn resume(pins: &PinDir) {
    for (ifindex, name) in set_aside_links_list(pins) {
        delete_later(DoomedLink {
            ifindex,
            name,
            pins: pins.clone(),
        });
    }
}

static WORKER: OnceLock<mpsc::Sender<DoomedLink>> = OnceLock::new();

/// Queues the link for deletion and returns at once.
pub fn delete_later(link: DoomedLink) {
    let sender = WORKER.get_or_init(|| {
        let (sender, receiver) = mpsc::channel::<DoomedLink>();
        let spawned = std::thread::Builder::new()
            .name("link-reaper".into())
            .spawn(move || {
                for link in receiver {
                    delete_now(&link);
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the link deletion thread");
        }
        sender
    });
    if let Err(mpsc::SendError(link)) = sender.send(link) {
        // No worker: delete on the caller's thread rather than leave the veth.
        delete_now(&link);
    }
}

/// Deletes the link if `ifindex` still names it (a link already gone is fine), then drops its
/// set-aside pins. A failed deletion keeps the pins: the programs stay on, dropping
/// everything, and a restarted moatd tries again.
pub fn delete_now(link: &DoomedLink) {
    if ifindex_of(&link.name) == Some(link.ifindex) {
        match delete_link(link.ifindex) {
            Ok(()) => debug!(name = %link.name, ifindex = link.ifindex, "host veth deleted"),
            Err(e) => {
                warn!(name = %link.name, ifindex = link.ifindex, error = %e, "deleting a host veth failed");
                return;
            }
        }
    }
    if let Err(e) = drop_set_aside_links(&link.pins, link.ifindex, &link.name) {
        warn!(name = %link.name, error = %e, "removing set-aside link pins failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn ip(args: &[&str]) {
        let status = Command::new("ip").args(args).status().unwrap();
        assert!(status.success(), "ip {args:?}");
    }

    fn exists(name: &str) -> bool {
        std::path::Path::new("/sys/class/net").join(name).exists()
    }

    /// Needs root (veths). Deletes by index only while the name still matches.
    #[test]
    fn deletes_the_named_index_only() {
        let a = format!("mlr{}a", std::process::id() % 100_000);
        let b = format!("mlr{}b", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["link", "del", &a]).status();
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        let index = ifindex_of(&a).unwrap();
        let root = tempfile::tempdir().unwrap();
        let pins = PinDir::new(root.path());
        // Stand-ins for set-aside pins (plain files: only their removal is checked).
        std::fs::create_dir_all(pins.doomed_links()).unwrap();
        let marker = pins.doomed_link(index, &a, "from");
        std::fs::write(&marker, b"").unwrap();
        // Same index, other name: the link stays (and so do its pins).
        delete_now(&DoomedLink {
            ifindex: index,
            name: b.clone(),
            pins: pins.clone(),
        });
        assert!(exists(&a));
        assert!(marker.exists());
        assert_eq!(set_aside_links_list(&pins), vec![(index, a.clone())]);
        delete_now(&DoomedLink {
            ifindex: index,
            name: a.clone(),
            pins: pins.clone(),
        });
        assert!(!exists(&a) && !exists(&b), "both ends of the pair go");
        assert!(
            !marker.exists(),
            "set-aside pins dropped once the device is gone"
        );
        // Gone already: nothing to do, no error.
        assert!(delete_link(index).is_ok());
        delete_now(&DoomedLink {
            ifindex: index,
            name: a.clone(),
            pins,
        });
    }

    /// Needs root and bpffs. A tc-attached veth has no link pins; setting it aside leaves a
    /// marker pin by which a restarted moatd (`resume`) still deletes it, filters on until then.
    #[test]
    fn a_doomed_tc_attached_veth_is_deleted_by_a_restarted_daemon() {
        let a = format!("mlt{}a", std::process::id() % 100_000);
        let b = format!("mlt{}b", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["link", "del", &a]).status();
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        let index = ifindex_of(&a).unwrap();
        let root = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/moat-test/links-tc-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let pins = PinDir::new(&root);
        let datapath = moat_datapath::Datapath::load(&pins).unwrap();
        moat_datapath::attach_endpoint_with(&pins, &a, moat_datapath::AttachMode::Tc).unwrap();

        moat_datapath::attach::set_aside_links(&pins, &a, index).unwrap();
        assert_eq!(set_aside_links_list(&pins), vec![(index, a.clone())]);
        assert!(
            moat_datapath::is_attached(&pins, &a),
            "the filters stay on until the device goes"
        );
        // The daemon that set it aside is gone; the next one finishes the job.
        drop(datapath);
        resume(&pins);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while (exists(&a) || !set_aside_links_list(&pins).is_empty())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!exists(&a) && !exists(&b), "doomed veth deleted");
        assert_eq!(set_aside_links_list(&pins), vec![], "marker dropped");
        let _ = std::fs::remove_dir_all(&root);
    }
}
