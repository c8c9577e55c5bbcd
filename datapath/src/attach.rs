//! Attaching an endpoint: the two pinned programs go onto the pod's host-side veth by TCX
//! (kernel >= 6.6), and each link is pinned so it outlives the process that made it. The CNI
//! plugin calls this on ADD with the programs moatd already loaded and verified, so a pod
//! start costs two link creations and no program load.

use std::{fs, io, path::Path};

use anyhow::Context;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, links::FdLink, tc::TcAttachOptions};
use moat_common::program_name;

use crate::{Error, PinDir, Result};

pub const HOOK_FROM_CONTAINER: &str = "from";
pub const HOOK_TO_CONTAINER: &str = "to";

/// (link pin suffix, program, TCX direction) for both hooks of an endpoint.
pub(crate) const HOOKS: [(&str, &str, TcAttachType); 2] = [
    (
        HOOK_FROM_CONTAINER,
        program_name::FROM_CONTAINER,
        TcAttachType::Ingress,
    ),
    (
        HOOK_TO_CONTAINER,
        program_name::TO_CONTAINER,
        TcAttachType::Egress,
    ),
];

/// How the programs go onto a veth. Both run the same pinned programs against the same maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// clsact qdisc + cls_bpf filters (`crate::tc`): about 0.2 ms per endpoint, nothing
    /// pinned, gone with the device. What moat-cni uses unless told otherwise.
    #[default]
    Tc,
    /// TCX links, pinned under the pin directory: the kernel's newer multi-program hook, at
    /// the price of an RCU grace period per hook on attach and on explicit detach.
    Tcx,
}

/// Attaches both programs to `ifname` with the chosen mechanism. Idempotent.
pub fn attach_endpoint_with(pins: &PinDir, ifname: &str, mode: AttachMode) -> Result<()> {
    match mode {
        AttachMode::Tc => crate::tc::attach(pins, ifname),
        AttachMode::Tcx => attach_endpoint(pins, ifname),
    }
}

/// Attaches both programs to `ifname` (a host-side veth in the caller's network namespace)
/// by TCX, pinning the links. Idempotent: links left over from an earlier attach of the same
/// name are replaced.
pub fn attach_endpoint(pins: &PinDir, ifname: &str) -> Result<()> {
    fs::create_dir_all(pins.links()).context("creating link pin directory")?;
    let mut attached: Vec<String> = Vec::new();
    for (hook, name, attach_type) in HOOKS {
        let result = attach_one(pins, ifname, hook, name, attach_type);
        if let Err(e) = result {
            // Undo the half that succeeded: never leave an endpoint with one hook.
            for done in &attached {
                let _ = remove_pin(Path::new(done));
            }
            return Err(e);
        }
        attached.push(pins.link(ifname, hook).display().to_string());
    }
    Ok(())
}

/// Opens one of the programs moatd pinned, for either attach mechanism. A failure is
/// [`Error::ProgramNotPinned`], whatever the kernel's reason: the programs are moatd's to
/// load, so without them the fix is moatd, not this caller.
pub(crate) fn pinned_program(pins: &PinDir, name: &str) -> Result<SchedClassifier> {
    SchedClassifier::from_pin(pins.program(name)).map_err(|source| Error::ProgramNotPinned {
        name: name.to_string(),
        source,
    })
}

fn attach_one(
    pins: &PinDir,
    ifname: &str,
    hook: &str,
    name: &str,
    attach_type: TcAttachType,
) -> Result<()> {
    let pin_path = pins.link(ifname, hook);
    // A stale pin (the veth was re-created under the same name) would keep a dead link.
    remove_pin(&pin_path)?;
    let mut program = pinned_program(pins, name)?;
    let id = program
        .attach_with_options(
            ifname,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching {name} to {ifname}"))?;
    let link = program.take_link(id).context("taking link")?;
    let fd_link = FdLink::try_from(link).context("TCX link expected")?;
    fd_link
        .pin(&pin_path)
        .with_context(|| format!("pinning link at {}", pin_path.display()))?;
    Ok(())
}

/// Detaches both hooks, whichever mechanism put them there. Idempotent: a missing pin or
/// filter, or a vanished veth, is not an error.
pub fn detach_endpoint(pins: &PinDir, ifname: &str) -> Result<()> {
    detach_links(pins, ifname)?;
    crate::tc::detach(ifname)
}

/// Detaches only what is pinned in `pins` (TCX links), leaving tc filters, which belong to
/// the device: moatd uses this when it forgets an endpoint whose device may be on its way
/// out, where taking the filters off would let the veth pass traffic unjudged until then.
pub fn detach_links(pins: &PinDir, ifname: &str) -> Result<()> {
    for (hook, _, _) in HOOKS {
        remove_pin(&pins.link(ifname, hook))?;
    }
    Ok(())
}

/// Removes both link pins without detaching first, for a device that is being deleted: the
/// kernel detaches TCX programs when it unregisters the device, and an explicit detach would
/// make the caller wait for an RCU grace period per hook. Idempotent.
pub fn unpin_endpoint(pins: &PinDir, ifname: &str) -> Result<()> {
    for (hook, _, _) in HOOKS {
        let path = pins.link(ifname, hook);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(anyhow::Error::from(e)
                    .context(format!("removing link pin {}", path.display()))
                    .into());
            }
        }
    }
    Ok(())
}

/// Marker "hook" of a tc-attached device set aside for deletion (see `set_aside_links`).
const TC_MARKER: &str = "tc";

/// Moves both link pins of `ifname` aside, keyed by the device's `ifindex`, for a veth about
/// to be deleted: the programs stay attached (the pins keep the links alive) until the kernel
/// detaches them with the device, while the interface name is free of pins at once, so
/// nothing detaches them explicitly (a detach on a live device waits for an RCU grace
/// period). A missing pin is fine.
///
/// A tc-attached device has no link pins, yet a restarted moatd must still find it to finish
/// the deletion; bpffs holds nothing but pinned objects, so the program is pinned once more
/// under the device's doomed name as that durable marker.
pub fn set_aside_links(pins: &PinDir, ifname: &str, ifindex: u32) -> Result<()> {
    fs::create_dir_all(pins.doomed_links()).context("creating the doomed link directory")?;
    if crate::tc::filters(ifindex).is_ok_and(|f| !f.is_empty()) {
        let marker = pins.doomed_link(ifindex, ifname, TC_MARKER);
        if !marker.exists() {
            let mut program = SchedClassifier::from_pin(pins.program(program_name::FROM_CONTAINER))
                .context("opening the pinned program for a doomed-device marker")?;
            program
                .pin(&marker)
                .with_context(|| format!("pinning the marker {}", marker.display()))?;
        }
    }
    for (hook, _, _) in HOOKS {
        match fs::rename(
            pins.link(ifname, hook),
            pins.doomed_link(ifindex, ifname, hook),
        ) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(anyhow::Error::from(e)
                    .context(format!("setting aside the link pins of {ifname}"))
                    .into());
            }
        }
    }
    Ok(())
}

/// Removes the set-aside pins of device `ifindex` (once it is gone). Idempotent.
pub fn drop_set_aside_links(pins: &PinDir, ifindex: u32, ifname: &str) -> Result<()> {
    let hooks = HOOKS.iter().map(|(hook, _, _)| *hook);
    for hook in hooks.chain([TC_MARKER]) {
        match fs::remove_file(pins.doomed_link(ifindex, ifname, hook)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(anyhow::Error::from(e)
                    .context(format!("removing set-aside link pins of #{ifindex}"))
                    .into());
            }
        }
    }
    Ok(())
}

/// Devices (ifindex, interface name) with set-aside link pins.
pub fn set_aside_links_list(pins: &PinDir) -> Vec<(u32, String)> {
    let mut out = std::collections::BTreeSet::new();
    if let Ok(entries) = fs::read_dir(pins.doomed_links()) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let mut parts = name.to_str().unwrap_or_default().splitn(3, '-');
            let (_, index, ifname) = (parts.next(), parts.next(), parts.next());
            if let (Some(index), Some(ifname)) = (index.and_then(|i| i.parse().ok()), ifname) {
                out.insert((index, ifname.to_string()));
            }
        }
    }
    out.into_iter().collect()
}

/// Both hooks carry this installation's programs: both TCX link pins exist for this
/// interface name, or both of its tc filters run this pin directory's programs.
pub fn is_attached(pins: &PinDir, ifname: &str) -> bool {
    HOOKS
        .iter()
        .all(|(hook, _, _)| pins.link(ifname, hook).exists())
        || crate::tc::is_attached(pins, ifname)
}

/// Names of all interfaces with pinned links (for reconcile and GC).
pub fn attached_interfaces(pins: &PinDir) -> Result<Vec<String>> {
    let mut names = std::collections::BTreeSet::new();
    let entries = match fs::read_dir(pins.links()) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow::Error::from(e).context("reading link pins").into()),
    };
    for entry in entries {
        let entry = entry.context("reading link pins")?;
        if let Some((_, ifname)) = entry.file_name().to_str().and_then(PinDir::parse_link_name) {
            names.insert(ifname.to_string());
        }
    }
    Ok(names.into_iter().collect())
}

/// Detaches the link pinned at `path` at once, then removes the pin. Unpinning alone is not
/// enough: bpffs drops its reference after an RCU grace period, and until then the program
/// still sits on the hook (attaching it again would fail with EEXIST).
fn remove_pin(path: &Path) -> Result<()> {
    if path.exists() {
        detach_now(path);
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::Error::from(e)
            .context(format!("removing link pin {}", path.display()))
            .into()),
    }
}

/// BPF_OBJ_GET the pinned link and BPF_LINK_DETACH it. Best effort: a link whose device is
/// already gone is detached by the kernel anyway.
fn detach_now(path: &Path) {
    use std::{ffi::CString, os::unix::ffi::OsStrExt};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    // union bpf_attr, obj_get member: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64;
    // SAFETY: attr is a zeroed bpf_attr-sized buffer holding a valid pathname pointer.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            size_of_val(&attr),
        )
    };
    if fd < 0 {
        return;
    }
    let mut detach = [0u64; 16];
    detach[0] = fd as u64; // link_detach.link_fd (u32, little-endian low half)
    // SAFETY: as above; the fd is ours and closed right after.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            detach.as_mut_ptr(),
            size_of_val(&detach),
        );
        libc::close(fd as i32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pin root moatd never loaded into: attaching fails with the variant callers act on
    /// (moat-cni maps it to "try again later"), not a generic error. TCX mode opens the
    /// programs before it touches the interface, so no device is needed.
    #[test]
    fn attaching_without_pinned_programs_is_program_not_pinned() {
        let root = std::env::temp_dir().join(format!("moat-attach-test-{}", std::process::id()));
        let error =
            attach_endpoint_with(&PinDir::new(&root), "moat-none0", AttachMode::Tcx).unwrap_err();
        let _ = fs::remove_dir_all(&root);
        match error {
            Error::ProgramNotPinned { name, .. } => {
                assert_eq!(name, program_name::FROM_CONTAINER);
            }
            other => panic!("expected ProgramNotPinned, got {other:?}"),
        }
    }
}
