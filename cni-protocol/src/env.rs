//! The `CNI_*` environment: which command runs and on which attachment.
//!
//! Runtimes (libcni) export every variable, empty when it does not apply, so "empty" and
//! "unset" are treated alike; missing variables are all reported at once, as the reference
//! skel does, so an operator fixes them in one go.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::error::{CniError, ErrorCode};

pub const CNI_COMMAND: &str = "CNI_COMMAND";
pub const CNI_CONTAINERID: &str = "CNI_CONTAINERID";
pub const CNI_NETNS: &str = "CNI_NETNS";
pub const CNI_IFNAME: &str = "CNI_IFNAME";
pub const CNI_ARGS: &str = "CNI_ARGS";
pub const CNI_PATH: &str = "CNI_PATH";

/// Longest interface name the kernel accepts (IFNAMSIZ minus the NUL).
pub const MAX_INTERFACE_NAME_BYTES: usize = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }

    /// Variables the command refuses to run without, matching the reference skel: CNI_NETNS is
    /// optional on DEL because the namespace may already be gone.
    pub fn required_variables(self) -> &'static [&'static str] {
        match self {
            Command::Add | Command::Check => &[CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_PATH],
            Command::Del => &[CNI_CONTAINERID, CNI_IFNAME, CNI_PATH],
            Command::Gc | Command::Status => &[CNI_PATH],
            Command::Version => &[],
        }
    }

    /// ADD, DEL and CHECK act on one attachment `(CNI_CONTAINERID, CNI_IFNAME)`.
    pub fn targets_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

impl FromStr for Command {
    type Err = CniError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ADD" => Ok(Command::Add),
            "DEL" => Ok(Command::Del),
            "CHECK" => Ok(Command::Check),
            "GC" => Ok(Command::Gc),
            "STATUS" => Ok(Command::Status),
            "VERSION" => Ok(Command::Version),
            other => Err(CniError::invalid_environment(format!(
                "unknown CNI_COMMAND: {other}"
            ))),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The validated `CNI_*` variables of one invocation. Fields a command does not use are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnvironment {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    /// Raw `CNI_ARGS`; parse with [`super::args::CniArgs::parse`].
    pub args: Option<String>,
    /// `CNI_PATH` split on `:`, empty entries dropped.
    pub path: Vec<PathBuf>,
}

/// Reads a variable, treating an empty value as unset.
fn non_empty(lookup: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    lookup(name).filter(|v| !v.is_empty())
}

/// The command named by `CNI_COMMAND`, or `None` when it is empty or unset (the reference skel
/// then prints an "about" line and exits 0).
pub fn read_command(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Option<Command>, CniError> {
    non_empty(lookup, CNI_COMMAND)
        .map(|value| value.parse())
        .transpose()
}

impl CniEnvironment {
    /// Reads and validates the variables `command` needs. Missing ones are reported together
    /// (code 4); a bad container ID or interface name is refused per the spec.
    pub fn from_lookup(
        command: Command,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<CniEnvironment, CniError> {
        let missing: Vec<&str> = command
            .required_variables()
            .iter()
            .copied()
            .filter(|name| non_empty(lookup, name).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(CniError::invalid_environment(format!(
                "required env variables [{}] missing",
                missing.join(",")
            )));
        }

        let attachment_var = |name: &str| {
            if command.targets_attachment() {
                non_empty(lookup, name)
            } else {
                None
            }
        };
        let container_id = attachment_var(CNI_CONTAINERID);
        let ifname = attachment_var(CNI_IFNAME);
        if let Some(id) = &container_id {
            validate_container_id(id)?;
        }
        if let Some(name) = &ifname {
            validate_interface_name(name)?;
        }

        let path = if command == Command::Version {
            Vec::new()
        } else {
            non_empty(lookup, CNI_PATH)
                .map(|p| split_cni_path(&p))
                .unwrap_or_default()
        };

        Ok(CniEnvironment {
            command,
            container_id,
            netns: attachment_var(CNI_NETNS).map(PathBuf::from),
            ifname,
            args: attachment_var(CNI_ARGS),
            path,
        })
    }
}

/// Splits `CNI_PATH` on `:` (the Linux list separator), dropping empty entries.
pub fn split_cni_path(value: &str) -> Vec<PathBuf> {
    value
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// True for the identifier alphabet shared by container IDs and network names:
/// `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
fn is_valid_identifier(value: &str) -> bool {
    let mut chars = value.chars();
    match chars.next() {
        Some(first) if first.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Container IDs: empty is code 3 ("missing containerID"), bad characters code 4, as in the
/// reference `ValidateContainerID`.
pub fn validate_container_id(container_id: &str) -> Result<(), CniError> {
    if container_id.is_empty() {
        return Err(CniError::new(
            ErrorCode::UnknownContainer,
            "missing containerID",
        ));
    }
    if !is_valid_identifier(container_id) {
        return Err(
            CniError::invalid_environment("invalid characters in containerID")
                .with_details(container_id.to_string()),
        );
    }
    Ok(())
}

/// Interface names the kernel can take: non-empty, at most 15 bytes, not `.`/`..`, and no
/// `/`, `:` or whitespace. Failures are code 4 naming CNI_IFNAME.
pub fn validate_interface_name(ifname: &str) -> Result<(), CniError> {
    let problem = if ifname.is_empty() {
        Some("interface name is empty".to_string())
    } else if ifname.len() > MAX_INTERFACE_NAME_BYTES {
        Some(format!(
            "interface name is too long: must be at most {MAX_INTERFACE_NAME_BYTES} bytes"
        ))
    } else if ifname == "." || ifname == ".." {
        Some("interface name is . or ..".to_string())
    } else if ifname
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("interface name contains / or : or whitespace characters".to_string())
    } else {
        None
    };
    match problem {
        Some(msg) => {
            Err(CniError::invalid_environment(msg).with_details(format!("CNI_IFNAME={ifname:?}")))
        }
        None => Ok(()),
    }
}

/// Network names become directory names (IPAM state, pinned maps), so they use the container
/// ID alphabet; failures are code 7 like the reference skel.
pub fn validate_network_name(name: &str) -> Result<(), CniError> {
    if name.is_empty() {
        return Err(CniError::invalid_network_config("missing network name"));
    }
    if !is_valid_identifier(name) {
        return Err(
            CniError::invalid_network_config("invalid characters found in network name")
                .with_details(name.to_string()),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup_from(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn full_add_env() -> Vec<(&'static str, &'static str)> {
        vec![
            (CNI_COMMAND, "ADD"),
            (CNI_CONTAINERID, "abc123"),
            (CNI_NETNS, "/run/netns/x"),
            (CNI_IFNAME, "eth0"),
            (CNI_ARGS, "IgnoreUnknown=1"),
            (CNI_PATH, "/opt/cni/bin::/usr/lib/cni"),
        ]
    }

    #[test]
    fn all_six_commands_parse() {
        for (s, c) in [
            ("ADD", Command::Add),
            ("DEL", Command::Del),
            ("CHECK", Command::Check),
            ("GC", Command::Gc),
            ("STATUS", Command::Status),
            ("VERSION", Command::Version),
        ] {
            assert_eq!(s.parse::<Command>().unwrap(), c);
            assert_eq!(c.as_str(), s);
        }
    }

    #[test]
    fn unknown_command_is_code_4_naming_it() {
        let err = "add".parse::<Command>().unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
        assert_eq!(err.msg, "unknown CNI_COMMAND: add");
    }

    #[test]
    fn empty_command_reads_as_absent() {
        assert_eq!(
            read_command(&lookup_from(&[(CNI_COMMAND, "")])).unwrap(),
            None
        );
        assert_eq!(read_command(&lookup_from(&[])).unwrap(), None);
    }

    #[test]
    fn add_environment_is_read_completely() {
        let env = CniEnvironment::from_lookup(Command::Add, &lookup_from(&full_add_env())).unwrap();
        assert_eq!(env.container_id.as_deref(), Some("abc123"));
        assert_eq!(env.netns, Some(PathBuf::from("/run/netns/x")));
        assert_eq!(env.ifname.as_deref(), Some("eth0"));
        assert_eq!(env.args.as_deref(), Some("IgnoreUnknown=1"));
        assert_eq!(
            env.path,
            vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
    }

    #[test]
    fn missing_variables_are_all_listed_in_one_error() {
        let err = CniEnvironment::from_lookup(
            Command::Add,
            &lookup_from(&[(CNI_COMMAND, "ADD"), (CNI_CONTAINERID, "")]),
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
        assert_eq!(
            err.msg,
            "required env variables [CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH] missing"
        );
    }

    #[test]
    fn del_does_not_require_netns() {
        let env = CniEnvironment::from_lookup(
            Command::Del,
            &lookup_from(&[
                (CNI_CONTAINERID, "abc"),
                (CNI_IFNAME, "eth0"),
                (CNI_PATH, "/opt/cni/bin"),
                (CNI_NETNS, ""),
            ]),
        )
        .unwrap();
        assert_eq!(env.netns, None);
    }

    #[test]
    fn gc_and_status_need_only_cni_path_and_ignore_attachment_variables() {
        for command in [Command::Gc, Command::Status] {
            let err = CniEnvironment::from_lookup(command, &lookup_from(&[])).unwrap_err();
            assert_eq!(err.msg, "required env variables [CNI_PATH] missing");
            let env = CniEnvironment::from_lookup(
                command,
                &lookup_from(&[
                    (CNI_PATH, "/bin"),
                    (CNI_CONTAINERID, "bad id!"),
                    (CNI_IFNAME, ""),
                ]),
            )
            .unwrap();
            assert_eq!(env.container_id, None);
            assert_eq!(env.ifname, None);
        }
    }

    #[test]
    fn version_needs_nothing_but_the_command() {
        let env = CniEnvironment::from_lookup(Command::Version, &lookup_from(&[])).unwrap();
        assert_eq!(env.command, Command::Version);
    }

    #[test]
    fn container_id_accepts_spec_alphabet() {
        for ok in ["a", "0abc", "abc_def.ghi-jkl", "ABC123"] {
            validate_container_id(ok).unwrap();
        }
    }

    #[test]
    fn empty_container_id_is_code_3() {
        assert_eq!(
            validate_container_id("").unwrap_err().code,
            ErrorCode::UnknownContainer
        );
    }

    #[test]
    fn container_id_with_bad_characters_is_code_4() {
        for bad in ["_abc", "-abc", ".abc", "ab c", "ab/c", "ab:c", "ab$c", "é"] {
            let err = validate_container_id(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidEnvironment, "{bad}");
        }
    }

    #[test]
    fn interface_name_rules_match_the_kernel() {
        for ok in ["eth0", "a", "123456789012345", "veth-x_y.z"] {
            validate_interface_name(ok).unwrap();
        }
        for bad in [
            "",
            "1234567890123456",
            ".",
            "..",
            "eth/0",
            "eth:0",
            "eth 0",
            "eth\t0",
            "eth\n",
        ] {
            let err = validate_interface_name(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidEnvironment, "{bad:?}");
        }
    }

    #[test]
    fn interface_name_limit_counts_bytes_not_characters() {
        // 8 two-byte characters = 16 bytes.
        assert!(validate_interface_name("éééééééé").is_err());
    }

    #[test]
    fn bad_ifname_in_environment_is_rejected() {
        let mut pairs = full_add_env();
        pairs[3] = (CNI_IFNAME, "way-too-long-interface");
        let err = CniEnvironment::from_lookup(Command::Add, &lookup_from(&pairs)).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
    }

    #[test]
    fn network_name_must_be_present_and_path_safe() {
        validate_network_name("moat-net.1").unwrap();
        assert_eq!(
            validate_network_name("").unwrap_err().msg,
            "missing network name"
        );
        for bad in ["../x", "a/b", "a b", "-a"] {
            assert_eq!(
                validate_network_name(bad).unwrap_err().code,
                ErrorCode::InvalidNetworkConfig
            );
        }
    }
}
