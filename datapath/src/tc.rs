//! The other attach mechanism: a `clsact` qdisc with one `cls_bpf` filter per direction, in
//! direct-action mode, running the same pinned programs as TCX does.
//!
//! Why it exists: every TCX link creation swaps the device's program array and then waits
//! for a full RCU grace period while holding RTNL (`tcx_entry_sync`). On this project's
//! machines that is 14–16 ms per hook, so attaching a pod's two hooks costs about 27 ms, more
//! than a whole bridge+host-local ADD. Adding the qdisc and both filters costs about 0.2 ms:
//! cls_bpf publishes its filter chain with an expedited grace period at most. moat-cni
//! therefore attaches by tc unless configured for TCX (see `AttachMode`).
//!
//! There is no link object, so nothing is pinned: the filters belong to the device, hold
//! their own reference on the program, and go away with the device. A filter is found again
//! by its fixed place (priority `PRIORITY`, handle `HANDLE`) and recognised as Moat's by its
//! program name. When both TCX programs and these filters sit on one device, TCX runs first
//! and its verdict is final, so a device never judges a packet twice.

use std::{io, mem};

use anyhow::{Context, anyhow};
use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType,
    links::Link,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcFilterBpfOption, TcHandle as NlTcHandle, TcMessage, TcOption},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

use crate::{
    PinDir, Result,
    attach::{HOOKS, pinned_program},
    rtnl,
};

/// Filter priority: the lowest number runs first, so Moat judges before other filters.
pub const PRIORITY: u16 = 1;
/// Filter handle within that priority.
pub const HANDLE: TcHandle = TcHandle::new(0, 1);
/// Program names start with this (the kernel keeps 15 characters of a program's name).
const PROGRAM_PREFIX: &str = "moat_";

/// One of Moat's filters as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoatFilter {
    pub attach_type: Direction,
    pub program_id: Option<u32>,
    pub program_name: String,
}

/// TcAttachType is not comparable; this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    fn of(attach_type: TcAttachType) -> Self {
        match attach_type {
            TcAttachType::Egress => Direction::Egress,
            _ => Direction::Ingress,
        }
    }

    /// The program this direction runs and its attach type (from `attach::HOOKS`).
    fn hook(self) -> (&'static str, TcAttachType) {
        let (_, name, attach_type) = HOOKS
            .into_iter()
            .find(|(_, _, t)| Direction::of(*t) == self)
            .expect("HOOKS has both directions");
        (name, attach_type)
    }

    fn parent_minor(self) -> u16 {
        match self {
            Direction::Ingress => NlTcHandle::MIN_INGRESS,
            Direction::Egress => NlTcHandle::MIN_EGRESS,
        }
    }
}

/// Attaches both programs to `ifname` by tc. Idempotent: filters already in Moat's place are
/// replaced in one step each, so a repeated attach never leaves a hook empty.
pub fn attach(pins: &PinDir, ifname: &str) -> Result<()> {
    match tc::qdisc_add_clsact(ifname) {
        Ok(()) => {}
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => {
            return Err(anyhow!(e)
                .context(format!("adding the clsact qdisc to {ifname}"))
                .into());
        }
    }
    let mut attached = Vec::new();
    for (_, name, attach_type) in HOOKS {
        if let Err(e) = attach_one(pins, ifname, name, attach_type) {
            for done in attached {
                let _ = detach_one(ifname, done);
            }
            return Err(e);
        }
        attached.push(attach_type);
    }
    Ok(())
}

fn attach_one(pins: &PinDir, ifname: &str, name: &str, attach_type: TcAttachType) -> Result<()> {
    let mut program = pinned_program(pins, name)?;
    let options = NlOptions {
        priority: PRIORITY,
        handle: HANDLE,
        classid: None,
    };
    let id =
        match program.attach_with_options(ifname, attach_type, TcAttachOptions::Netlink(options)) {
            Ok(id) => id,
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                // Our place is taken (an earlier attach, or an older program): swap in place.
                let existing =
                    SchedClassifierLink::attached(ifname, attach_type, PRIORITY, HANDLE, None)
                        .with_context(|| format!("finding the tc filter on {ifname}"))?;
                program
                    .attach_to_link(existing)
                    .with_context(|| format!("replacing the tc filter {name} on {ifname}"))?
            }
            Err(e) => {
                return Err(anyhow!(e)
                    .context(format!("attaching {name} to {ifname} by tc"))
                    .into());
            }
        };
    keep_attached(program.take_link(id).context("taking the tc link")?);
    Ok(())
}

/// A netlink "link" is only a (device, priority, handle) record whose drop deletes the
/// filter; the filter must outlive this process, so the record is let go undropped. It owns
/// no file descriptor or memory beyond itself.
fn keep_attached(link: SchedClassifierLink) {
    mem::forget(link);
}

/// The errno inside a tc attach or detach error, when there is one.
fn errno(error: &ProgramError) -> Option<i32> {
    match error {
        ProgramError::TcError(TcError::NetlinkError(e)) | ProgramError::NetlinkError(e) => {
            e.raw_os_error()
        }
        ProgramError::TcError(TcError::IoError(e)) => e.raw_os_error(),
        _ => None,
    }
}

/// Removes Moat's filters from `ifname` (the qdisc stays: other tools may share it).
/// Idempotent: a device or filter that is not there is fine.
pub fn detach(ifname: &str) -> Result<()> {
    let Some(ifindex) = rtnl::ifindex_of(ifname) else {
        return Ok(());
    };
    for filter in filters(ifindex)? {
        detach_one(ifname, filter.attach_type.hook().1)?;
    }
    Ok(())
}

fn detach_one(ifname: &str, attach_type: TcAttachType) -> Result<()> {
    let link = match SchedClassifierLink::attached(ifname, attach_type, PRIORITY, HANDLE, None) {
        Ok(link) => link,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow!(e).context(format!("finding {ifname}")).into()),
    };
    match link.detach() {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), Some(libc::ENOENT) | Some(libc::ENODEV)) => Ok(()),
        Err(e) => Err(anyhow!(e)
            .context(format!("removing the tc filter from {ifname}"))
            .into()),
    }
}

/// Both of Moat's filters are on `ifname`, each running the program pinned in `pins` for
/// its direction (another installation's programs on the device do not count).
pub fn is_attached(pins: &PinDir, ifname: &str) -> bool {
    let Some(ifindex) = rtnl::ifindex_of(ifname) else {
        return false;
    };
    let Ok(found) = filters(ifindex) else {
        return false;
    };
    let pinned = crate::loader::pinned_programs(pins);
    HOOKS.iter().all(|(_, name, attach_type)| {
        let Some(program) = pinned.iter().find(|p| p.name == *name) else {
            return false;
        };
        found.iter().any(|f| {
            f.attach_type == Direction::of(*attach_type) && f.program_id == Some(program.id)
        })
    })
}

/// Moves every tc filter that runs one of `previous` (program ids of the installation's
/// earlier programs) onto the freshly loaded program of its direction, in place. Filters of
/// other installations (other pin directories, as in parallel tests) are left alone.
pub(crate) fn replace_programs(ebpf: &mut aya::Ebpf, previous: &[u32]) -> Result<usize> {
    let mut replaced = 0;
    for (ifname, ours) in devices_running(previous) {
        for filter in ours {
            let (name, attach_type) = filter.attach_type.hook();
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .context("program missing")?
                .try_into()
                .context("program type")?;
            let existing =
                SchedClassifierLink::attached(&ifname, attach_type, PRIORITY, HANDLE, None)
                    .with_context(|| format!("finding the tc filter on {ifname}"))?;
            let id = program
                .attach_to_link(existing)
                .with_context(|| format!("replacing the tc filter {name} on {ifname}"))?;
            keep_attached(program.take_link(id).context("taking the tc link")?);
            replaced += 1;
        }
    }
    Ok(replaced)
}

/// Moat's filters on device `ifindex` (those in Moat's place running a Moat program). A
/// device without a clsact qdisc has none.
pub fn filters(ifindex: u32) -> Result<Vec<MoatFilter>> {
    let mut out = Vec::new();
    for direction in [Direction::Ingress, Direction::Egress] {
        for message in dump_filters(ifindex, direction)? {
            if let Some(filter) = moat_filter(&message, direction) {
                out.push(filter);
            }
        }
    }
    Ok(out)
}

fn moat_filter(message: &TcMessage, direction: Direction) -> Option<MoatFilter> {
    let priority = (message.header.info >> 16) as u16;
    let handle =
        u32::from(message.header.handle.major) << 16 | u32::from(message.header.handle.minor);
    if priority != PRIORITY || handle != u32::from(HANDLE) {
        return None;
    }
    let mut is_bpf = false;
    let (mut program_id, mut program_name) = (None, String::new());
    for attribute in &message.attributes {
        match attribute {
            TcAttribute::Kind(kind) => is_bpf = kind == "bpf",
            TcAttribute::Options(options) => {
                for option in options {
                    match option {
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => program_id = Some(*id),
                        TcOption::Bpf(TcFilterBpfOption::ProgName(name)) => {
                            program_name = name.clone();
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (is_bpf && program_name.starts_with(PROGRAM_PREFIX)).then_some(MoatFilter {
        attach_type: direction,
        program_id,
        program_name,
    })
}

/// RTM_GETTFILTER dump of one direction of the device's clsact qdisc. No qdisc (EINVAL) or no
/// device (ENODEV) reads as no filters.
fn dump_filters(ifindex: u32, direction: Direction) -> Result<Vec<TcMessage>> {
    let mut request = TcMessage::with_index(ifindex as i32);
    request.header.parent = NlTcHandle {
        major: NlTcHandle::CLSACT.major,
        minor: direction.parent_minor(),
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetTrafficFilter(request)),
    );
    message.finalize();
    let mut buffer = vec![0u8; message.buffer_len()];
    message.serialize(&mut buffer);

    let mut socket = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
    socket.bind_auto().context("binding the rtnetlink socket")?;
    socket
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .context("connecting")?;
    socket
        .send(&buffer, 0)
        .context("sending the filter dump request")?;

    let mut found = Vec::new();
    let mut receive = vec![0u8; 64 * 1024];
    loop {
        let size = socket
            .recv(&mut &mut receive[..], 0)
            .context("reading the filter dump")?;
        let mut offset = 0;
        while offset < size {
            let message =
                NetlinkMessage::<RouteNetlinkMessage>::deserialize(&receive[offset..size])
                    .map_err(|e| anyhow!("decoding a filter dump message: {e}"))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(error) => {
                    return match error.code.map(|c| -c.get()) {
                        Some(libc::EINVAL) | Some(libc::ENODEV) | Some(libc::ENOENT) => Ok(found),
                        other => {
                            Err(anyhow!("filter dump on #{ifindex} failed: errno {other:?}").into())
                        }
                    };
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(filter)) => {
                    found.push(filter);
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length.next_multiple_of(4);
        }
    }
}

/// Devices in the caller's namespace whose Moat filters run one of `program_ids`, by name,
/// each with those filters (one filter dump per device).
pub fn devices_running(program_ids: &[u32]) -> Vec<(String, Vec<MoatFilter>)> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Some(ifindex) = rtnl::ifindex_of(&name) else {
            continue;
        };
        let ours: Vec<MoatFilter> = filters(ifindex)
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f.program_id.is_some_and(|id| program_ids.contains(&id)))
            .collect();
        if !ours.is_empty() {
            out.push((name, ours));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
