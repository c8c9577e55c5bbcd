//! Two link operations by ifindex over a plain blocking rtnetlink socket: setting a link down
//! and deleting it. Used on DEL paths (moat-cni, moatd), where building an async netlink
//! stack for one message would cost more than the message.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// The ifindex the caller's network namespace gives `name` now (sysfs), if any.
pub fn ifindex_of(name: &str) -> Option<u32> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return None;
    }
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// IFF_UP of the link `name` in the caller's namespace (sysfs), None when there is none.
pub fn link_is_up(name: &str) -> Option<bool> {
    ifindex_of(name)?;
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).ok()?;
    let flags = u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()?;
    Some(flags & libc::IFF_UP as u32 != 0)
}

/// Sets the link down: it passes no traffic from the answer on (its veth peer loses carrier,
/// IPv4 routes through it are flushed), at the cost of one expedited RCU sync in the kernel,
/// not the grace periods and barrier a deletion waits for. ENODEV counts as success.
pub fn set_link_down(ifindex: u32) -> io::Result<()> {
    request(libc::RTM_NEWLINK, ifindex, 0, libc::IFF_UP as u32)
}

/// Deletes the link (a veth takes its peer along). ENODEV counts as success.
pub fn delete_link(ifindex: u32) -> io::Result<()> {
    request(libc::RTM_DELLINK, ifindex, 0, 0)
}

/// struct ifinfomsg (linux/rtnetlink.h).
#[repr(C)]
struct IfInfoMsg {
    family: u8,
    pad: u8,
    kind: u16,
    index: i32,
    flags: u32,
    change: u32,
}

#[repr(C)]
struct LinkRequest {
    header: libc::nlmsghdr,
    body: IfInfoMsg,
}

/// One request on a fresh rtnetlink socket, waiting for the kernel's ACK. ENODEV (the link is
/// gone, e.g. with the pod's namespace) counts as success.
fn request(kind: u16, ifindex: u32, flags: u32, change: u32) -> io::Result<()> {
    // SAFETY: plain socket(2); the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a descriptor we own from here on.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let request = LinkRequest {
        header: libc::nlmsghdr {
            nlmsg_len: size_of::<LinkRequest>() as u32,
            nlmsg_type: kind,
            nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        body: IfInfoMsg {
            family: libc::AF_UNSPEC as u8,
            pad: 0,
            kind: 0,
            index: ifindex as i32,
            flags,
            change,
        },
    };
    // SAFETY: a zeroed sockaddr_nl is valid; family set below.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: request and kernel are live, correctly sized C structs.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            (&request as *const LinkRequest).cast(),
            size_of::<LinkRequest>(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut answer = [0u8; 1024];
    // SAFETY: answer is a writable buffer of the given length.
    let got = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            answer.as_mut_ptr().cast(),
            answer.len(),
            0,
        )
    };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    let header_len = size_of::<libc::nlmsghdr>();
    if (got as usize) < header_len + 4 {
        return Err(io::Error::other("short netlink answer"));
    }
    let answer_kind = u16::from_ne_bytes([answer[4], answer[5]]);
    if answer_kind != libc::NLMSG_ERROR as u16 {
        return Err(io::Error::other(format!(
            "unexpected netlink answer type {answer_kind}"
        )));
    }
    let code = i32::from_ne_bytes(
        answer[header_len..header_len + 4]
            .try_into()
            .expect("4 bytes"),
    );
    match -code {
        0 => Ok(()),
        libc::ENODEV => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Needs root (veths).
    #[test]
    fn down_then_delete_by_index() {
        let a = format!("mrt{}a", std::process::id() % 100_000);
        let b = format!("mrt{}b", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["link", "del", &a]).status();
        let ok = Command::new("ip")
            .args(["link", "add", &a, "type", "veth", "peer", "name", &b])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let up = Command::new("ip").args(["link", "set", &a, "up"]).status();
        assert!(up.unwrap().success());
        let index = ifindex_of(&a).unwrap();
        assert_eq!(link_is_up(&a), Some(true));
        set_link_down(index).unwrap();
        assert_eq!(link_is_up(&a), Some(false));
        delete_link(index).unwrap();
        assert!(ifindex_of(&a).is_none() && ifindex_of(&b).is_none());
        assert_eq!(link_is_up(&a), None);
        // Gone: both are no-ops.
        delete_link(index).unwrap();
        set_link_down(index).unwrap();
        assert_eq!(ifindex_of("../x"), None);
    }
}
