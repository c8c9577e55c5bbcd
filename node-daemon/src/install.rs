//! Installing the CNI on a Kubernetes node: moat-cni and moat-ipam copied into the runtime's
//! plugin directory, and a conflist. Standalone: Moat's own network, IPAM ranges from the
//! node's pod CIDRs. Chained: the cluster's existing conflist (e.g. kindnet's) with moat-cni
//! inserted after its interface plugin, written under a name that sorts first so the runtime
//! uses it. Every file is written to a temporary name and renamed, so the runtime never sees
//! half a binary or config.

use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::Context;
use ipnetwork::IpNetwork;

pub const CONFLIST_NAME: &str = "10-moat.conflist";
/// Chained mode: sorts before the usual `10-<cni>.conflist`, so the runtime picks it.
pub const CHAINED_CONFLIST_NAME: &str = "00-moat-chained.conflist";

/// How moat-cni is installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CniMode {
    /// Moat is the cluster's CNI: veth, routes, moat-ipam.
    Standalone,
    /// After the cluster's existing CNI (kindnet, bridge, ptp...): Moat only enforces.
    Chained,
}

/// The moat-cni entry of a conflist.
pub fn moat_plugin(
    mode: CniMode,
    socket: &Path,
    pin_root: &Path,
    mtu: Option<u32>,
) -> serde_json::Value {
    let mut plugin = serde_json::json!({
        "type": "moat-cni",
        "mode": match mode {
            CniMode::Standalone => "standalone",
            CniMode::Chained => "chained",
        },
        "socket": socket,
        "pinRoot": pin_root,
    });
    if let Some(mtu) = mtu {
        plugin["mtu"] = mtu.into();
    }
    plugin
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().context("path without a directory")?;
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.moat-tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).with_context(|| format!("installing {}", path.display()))?;
    Ok(())
}

/// Copies the plugin binaries from `from` into `bin_dir`.
pub fn install_binaries(from: &Path, bin_dir: &Path) -> anyhow::Result<()> {
    for name in ["moat-cni", "moat-ipam"] {
        let source = from.join(name);
        let bytes = fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
        write_atomically(&bin_dir.join(name), &bytes, 0o755)?;
    }
    Ok(())
}

/// The node's conflist: Moat standalone with moat-ipam over the pod CIDRs, then portmap.
pub fn conflist(pod_cidrs: &[IpNetwork], socket: &Path, pin_root: &Path) -> serde_json::Value {
    standalone_conflist(pod_cidrs, socket, pin_root, None)
}

/// [`conflist`] with an explicit MTU for the pods' interfaces.
pub fn standalone_conflist(
    pod_cidrs: &[IpNetwork],
    socket: &Path,
    pin_root: &Path,
    mtu: Option<u32>,
) -> serde_json::Value {
    let ranges: Vec<serde_json::Value> = pod_cidrs
        .iter()
        .map(|c| serde_json::json!([{ "subnet": c.to_string() }]))
        .collect();
    let mut moat = moat_plugin(CniMode::Standalone, socket, pin_root, mtu);
    moat["ipam"] = serde_json::json!({
        "type": "moat-ipam",
        "ranges": ranges,
        "dataDir": "/var/lib/moat/ipam"
    });
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "moat",
        "plugins": [
            moat,
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    })
}

/// The cluster's conflist with moat-cni chained right after its first plugin (the one that
/// creates the interface), so that later plugins (portmap, bandwidth...) see the same result.
/// A legacy single-plugin `.conf` becomes a list. Already chained: unchanged.
pub fn chained_conflist(
    base: &serde_json::Value,
    moat: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let mut list = base.clone();
    if list.get("plugins").is_none() {
        // A single-plugin config: its network keys move to the list.
        let object = list
            .as_object()
            .context("CNI config is not a JSON object")?;
        let mut plugin = object.clone();
        let mut top = serde_json::Map::new();
        for key in ["cniVersion", "name"] {
            if let Some(v) = plugin.remove(key) {
                top.insert(key.into(), v);
            }
        }
        top.insert("plugins".into(), serde_json::json!([plugin]));
        list = serde_json::Value::Object(top);
    }
    let plugins = list["plugins"]
        .as_array_mut()
        .context("CNI config: plugins is not a list")?;
    anyhow::ensure!(!plugins.is_empty(), "CNI config has no plugins");
    plugins.retain(|p| p["type"] != "moat-cni");
    plugins.insert(1, moat);
    Ok(list)
}

/// The configuration the runtime would use if Moat's were absent: the first `*.conflist`,
/// `*.conf` or `*.json` of the directory in name order, other than Moat's own files.
pub fn find_base_config(conf_dir: &Path) -> anyhow::Result<Option<(PathBuf, serde_json::Value)>> {
    let mut names: Vec<PathBuf> = match fs::read_dir(conf_dir) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", conf_dir.display())),
    };
    names.sort();
    for path in names {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let is_config = [".conflist", ".conf", ".json"]
            .iter()
            .any(|s| name.ends_with(s));
        if !is_config
            || name.starts_with('.')
            || name == CHAINED_CONFLIST_NAME
            || name == CONFLIST_NAME
        {
            continue;
        }
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let value = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        return Ok(Some((path, value)));
    }
    Ok(None)
}

/// Chained mode, one pass: (re)writes Moat's chained conflist from the current base config.
/// Returns the base's path, or `None` while the directory has no other CNI config yet.
pub fn sync_chained(conf_dir: &Path, moat: &serde_json::Value) -> anyhow::Result<Option<PathBuf>> {
    let Some((base_path, base)) = find_base_config(conf_dir)? else {
        return Ok(None);
    };
    write_chained(conf_dir, &base, moat)?;
    Ok(Some(base_path))
}

/// Writes `00-moat-chained.conflist` from `base` unless it already holds exactly that.
fn write_chained(
    conf_dir: &Path,
    base: &serde_json::Value,
    moat: &serde_json::Value,
) -> anyhow::Result<()> {
    let list = chained_conflist(base, moat.clone())?;
    let target = conf_dir.join(CHAINED_CONFLIST_NAME);
    let current: Option<serde_json::Value> = fs::read(&target)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if current.as_ref() != Some(&list) {
        write_atomically(&target, &serde_json::to_vec_pretty(&list)?, 0o644)?;
    }
    Ok(())
}

/// Chained mode, one pass, with the primary CNI checked first. When the directory's base
/// config is kindnet's, `check` tells whether kindnet enforces NetworkPolicy itself (it reads
/// kindnet's DaemonSet; see [`kindnet_policy`]); it is not called for any other base.
/// - kindnet enforces: Moat refuses to chain. Its conflist is not written, and one written
///   before is removed, so the runtime uses kindnet's own config: two enforcers would judge
///   every packet and kindnet would drop what Moat's audit and learn modes only report.
/// - `check` cannot tell (the DaemonSet cannot be read): nothing is written or removed.
/// - otherwise as [`sync_chained`].
pub fn sync_chained_checked(
    conf_dir: &Path,
    moat: &serde_json::Value,
    check: impl FnOnce() -> Result<KindnetPolicy, String>,
) -> anyhow::Result<ChainState> {
    let Some((base_path, base)) = find_base_config(conf_dir)? else {
        return Ok(ChainState::Waiting);
    };
    if is_kindnet_config(&base_path, &base) {
        match check() {
            Ok(KindnetPolicy::NotEnforcing(_)) => {}
            Ok(KindnetPolicy::Enforcing(why)) => {
                let target = conf_dir.join(CHAINED_CONFLIST_NAME);
                match fs::remove_file(&target) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("removing {}", target.display()));
                    }
                }
                return Ok(ChainState::Refused {
                    base: base_path,
                    reason: kindnet_refusal(&why),
                });
            }
            Err(error) => {
                return Ok(ChainState::Undecided {
                    base: base_path,
                    reason: format!(
                        "cannot tell whether kindnet enforces NetworkPolicy itself, so Moat \
                         does not chain onto it yet: {error}"
                    ),
                });
            }
        }
    }
    write_chained(conf_dir, &base, moat)?;
    Ok(ChainState::Chained(base_path))
}

/// What one pass of chained mode found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainState {
    /// The directory has no other CNI config yet.
    Waiting,
    /// `00-moat-chained.conflist` is this base config with moat-cni inserted.
    Chained(PathBuf),
    /// The base's plugin enforces NetworkPolicy itself: Moat's conflist is absent. `reason`
    /// says so and what to do, for logs and `moatctl status`.
    Refused { base: PathBuf, reason: String },
    /// Whether the base's plugin enforces NetworkPolicy could not be read yet; nothing was
    /// written or removed.
    Undecided { base: PathBuf, reason: String },
}

impl ChainState {
    /// Why moatd is not ready in this state (`None`: this state does not hold it back).
    pub fn not_ready_reason(&self) -> Option<&str> {
        match self {
            ChainState::Refused { reason, .. } | ChainState::Undecided { reason, .. } => {
                Some(reason)
            }
            ChainState::Waiting | ChainState::Chained(_) => None,
        }
    }
}

/// The refusal moatd reports (log and not-ready reason) when kindnet enforces NetworkPolicy.
pub fn kindnet_refusal(why: &str) -> String {
    format!(
        "kindnet enforces NetworkPolicy itself ({why}); chained after it, two enforcers would \
         judge every packet and kindnet would drop what Moat's audit and learn modes only \
         report, so Moat does not chain onto it. Use cni-mode standalone (on kind: \
         networking.disableDefaultCNI: true), or a kindnet started with \
         --network-policy=false (kubernetes-sigs/kindnet; kind's own kindnetd has no such \
         setting)"
    )
}

/// Namespace and name of kindnet's DaemonSet, in kind's manifest and in
/// kubernetes-sigs/kindnet's `install-kindnet.yaml` alike.
pub const KINDNET_DAEMONSET: (&str, &str) = ("kube-system", "kindnet");

/// Whether a CNI config is kindnet's: kind's kindnetd and kubernetes-sigs/kindnet both write
/// `/etc/cni/net.d/10-kindnet.conflist` with `"name": "kindnet"`.
pub fn is_kindnet_config(path: &Path, config: &serde_json::Value) -> bool {
    config["name"] == "kindnet"
        || path.file_name().and_then(|n| n.to_str()) == Some("10-kindnet.conflist")
}

/// Whether kindnet enforces NetworkPolicy, and how that was read from its DaemonSet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KindnetPolicy {
    Enforcing(String),
    NotEnforcing(String),
}

/// The first kind kindnetd image with kube-network-policies embedded: the tag's date
/// (`kindest/kindnetd:v20240719-e7903573`, kind commit e7903573 "implement network
/// policies"). kind v0.23.0's node images carry `v20240513-cd2ac642` (none), kind v0.24.0's
/// `v20240813-c6f155d6` (enforcing, no flag or variable turns it off), and every later kind
/// release's node images enforce as well.
pub const KIND_KINDNETD_POLICY_SINCE: u32 = 20240719;

/// What kindnet's DaemonSet (kube-system/kindnet) says about its NetworkPolicy enforcement.
///
/// - kind's own kindnetd (`kindest/kindnetd`, the image kind's node images apply at cluster
///   creation unless `networking.disableDefaultCNI`) has no setting at all: it enforces from
///   the tag dated [`KIND_KINDNETD_POLICY_SINCE`] (kind >= v0.24.0) and not before. A
///   `--network-policy` argument is not a flag it defines (Go's flag package makes it exit),
///   so it changes nothing here.
/// - kubernetes-sigs/kindnet (`registry.k8s.io/networking/kindnet`, formerly
///   `ghcr.io/aojea/kindnetd`) reads `--network-policy=<bool>` (default true since its
///   v1.5.0, false in v1.4.x, absent and always on in v1.3.x, no enforcement before v1.3.0).
///   The last occurrence in the container's command and args wins, as with Go's flags.
/// - anything else: an explicit `--network-policy=<bool>` decides; without one it cannot be
///   told, which counts as enforcing (the safe side).
///
/// Neither reads an environment variable for this.
pub fn kindnet_policy(ds: &k8s_openapi::api::apps::v1::DaemonSet) -> KindnetPolicy {
    let containers = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| p.containers.as_slice())
        .unwrap_or_default();
    let by_image = containers.iter().find(|c| {
        c.image
            .as_deref()
            .is_some_and(|i| KindnetImage::parse(i).flavour != Flavour::Other)
    });
    let Some(container) = by_image.or_else(|| containers.iter().find(|c| c.name == "kindnet-cni"))
    else {
        return KindnetPolicy::Enforcing(
            "its DaemonSet has no kindnetd container (image kindest/kindnetd, \
             registry.k8s.io/networking/kindnet or aojea/kindnetd, or a container named \
             kindnet-cni) to tell from"
                .into(),
        );
    };
    let image_ref = container.image.clone().unwrap_or_default();
    let image = KindnetImage::parse(&image_ref);
    let argv: Vec<&str> = container
        .command
        .iter()
        .chain(container.args.iter())
        .flatten()
        .map(String::as_str)
        .collect();
    let flag = network_policy_flag(&argv);
    let c = &container.name;
    match (image.flavour, flag) {
        (Flavour::Kind, flag) => {
            let note = if flag.is_some() {
                " (its --network-policy argument is not a flag kind's kindnetd defines)"
            } else {
                ""
            };
            match image.tag_date() {
                Some(date) if date >= KIND_KINDNETD_POLICY_SINCE => {
                    KindnetPolicy::Enforcing(format!(
                        "container {c} runs kind's kindnetd {image_ref}, which embeds \
                         kube-network-policies (kind >= v0.24.0) with no setting to turn it \
                         off{note}"
                    ))
                }
                Some(_) => KindnetPolicy::NotEnforcing(format!(
                    "container {c} runs kind's kindnetd {image_ref}, older than NetworkPolicy \
                     enforcement (kind <= v0.23)"
                )),
                None => KindnetPolicy::Enforcing(format!(
                    "container {c} runs kind's kindnetd {image_ref}, whose tag is not \
                     vYYYYMMDD-<commit>: its version cannot be told{note}"
                )),
            }
        }
        (_, Some(Ok(true))) => KindnetPolicy::Enforcing(format!(
            "container {c} ({image_ref}) runs with --network-policy=true"
        )),
        (_, Some(Ok(false))) => KindnetPolicy::NotEnforcing(format!(
            "container {c} ({image_ref}) runs with --network-policy=false"
        )),
        (_, Some(Err(value))) => KindnetPolicy::Enforcing(format!(
            "container {c} ({image_ref}) has --network-policy={value}, not a boolean"
        )),
        (Flavour::Upstream, None) => match image.semver() {
            // aojea/kindnetd's own numbering; registry.k8s.io's started again at v1.0.0,
            // enforcing by default.
            Some((1, minor)) if image.aojea && minor < 3 => KindnetPolicy::NotEnforcing(format!(
                "container {c} runs kindnet {image_ref}, older than NetworkPolicy enforcement \
                 (v1.3.0)"
            )),
            Some((1, 4)) if image.aojea => KindnetPolicy::NotEnforcing(format!(
                "container {c} runs kindnet {image_ref}, whose --network-policy defaults to \
                 false"
            )),
            _ => KindnetPolicy::Enforcing(format!(
                "container {c} runs kindnet {image_ref} without --network-policy=false \
                 (the flag defaults to true)"
            )),
        },
        (Flavour::Other, None) => KindnetPolicy::Enforcing(format!(
            "container {c} runs {image_ref}, not an image Moat knows, without \
             --network-policy=false"
        )),
    }
}

/// The last `--network-policy[=<bool>]` (or single-dash) argument: `None` when absent,
/// `Err(value)` when its value is not one Go's `strconv.ParseBool` takes.
fn network_policy_flag(argv: &[&str]) -> Option<Result<bool, String>> {
    let mut found = None;
    for arg in argv {
        let Some(rest) = arg
            .strip_prefix("--network-policy")
            .or_else(|| arg.strip_prefix("-network-policy"))
        else {
            continue;
        };
        let value = match rest.strip_prefix('=') {
            None if rest.is_empty() => Ok(true),
            None => continue, // another flag (--network-policy-something)
            Some(v) => match v {
                "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
                "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
                other => Err(other.to_string()),
            },
        };
        found = Some(value);
    }
    found
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavour {
    /// kind's own kindnetd (`kindest/kindnetd`).
    Kind,
    /// kubernetes-sigs/kindnet (`registry.k8s.io/networking/kindnet`, `aojea/kindnetd`).
    Upstream,
    Other,
}

/// A container image reference, as far as telling kindnet's flavour and version goes.
struct KindnetImage<'a> {
    flavour: Flavour,
    /// `ghcr.io/aojea/kindnetd` or `aojea/kindnetd` (kubernetes-sigs/kindnet before its move).
    aojea: bool,
    tag: Option<&'a str>,
}

impl<'a> KindnetImage<'a> {
    fn parse(reference: &'a str) -> Self {
        let name = reference.split('@').next().unwrap_or_default();
        let (repository, tag) = match name.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
            _ => (name, None),
        };
        let is = |suffix: &str| repository == suffix || repository.ends_with(&format!("/{suffix}"));
        let aojea = is("aojea/kindnetd");
        let flavour = if is("kindest/kindnetd") {
            Flavour::Kind
        } else if aojea || is("networking/kindnet") {
            Flavour::Upstream
        } else {
            Flavour::Other
        };
        Self {
            flavour,
            aojea,
            tag,
        }
    }

    /// `v20240813-c6f155d6` -> 20240813.
    fn tag_date(&self) -> Option<u32> {
        let digits = self.tag?.strip_prefix('v')?.get(..8)?;
        digits
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| digits.parse().ok())
            .flatten()
    }

    /// `v1.7.0` -> (1, 7).
    fn semver(&self) -> Option<(u32, u32)> {
        let mut parts = self.tag?.strip_prefix('v')?.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some((major, minor))
    }
}

pub fn write_conflist(conf_dir: &Path, list: &serde_json::Value) -> anyhow::Result<()> {
    write_atomically(
        &conf_dir.join(CONFLIST_NAME),
        &serde_json::to_vec_pretty(list)?,
        0o644,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_uses_every_pod_cidr_as_a_range() {
        let cidrs: Vec<IpNetwork> = vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        ];
        let list = conflist(
            &cidrs,
            Path::new("/run/moat/moatd.sock"),
            Path::new("/sys/fs/bpf/moat"),
        );
        let ranges = &list["plugins"][0]["ipam"]["ranges"];
        assert_eq!(ranges[0][0]["subnet"], "10.244.1.0/24");
        assert_eq!(ranges[1][0]["subnet"], "fd00:10:244:1::/64");
        let dir = tempfile::tempdir().unwrap();
        write_conflist(dir.path(), &list).unwrap();
        let back: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(CONFLIST_NAME)).unwrap()).unwrap();
        assert_eq!(back, list);
    }

    fn kindnet() -> serde_json::Value {
        serde_json::json!({
            "cniVersion": "0.3.1", "name": "kindnet",
            "plugins": [
                {"type": "ptp", "ipMasq": false,
                 "ipam": {"type": "host-local", "dataDir": "/run/cni-ipam-state",
                          "routes": [{"dst": "0.0.0.0/0"}],
                          "ranges": [[{"subnet": "10.244.1.0/24"}]]},
                 "mtu": 1500},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    }

    fn moat() -> serde_json::Value {
        moat_plugin(
            CniMode::Chained,
            Path::new("/run/moat/moatd.sock"),
            Path::new("/sys/fs/bpf/moat"),
            None,
        )
    }

    #[test]
    fn chained_conflist_puts_moat_after_the_interface_plugin() {
        let list = chained_conflist(&kindnet(), moat()).unwrap();
        let types: Vec<&str> = list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, vec!["ptp", "moat-cni", "portmap"]);
        assert_eq!(list["name"], "kindnet");
        assert_eq!(list["cniVersion"], "0.3.1");
        assert_eq!(list["plugins"][1]["mode"], "chained");
        assert!(list["plugins"][1].get("ipam").is_none());
        // Idempotent: chaining the chained list changes nothing.
        assert_eq!(chained_conflist(&list, moat()).unwrap(), list);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list() {
        let conf = serde_json::json!({"cniVersion": "0.4.0", "name": "br", "type": "bridge",
                                      "bridge": "cni0", "ipam": {"type": "host-local"}});
        let list = chained_conflist(&conf, moat()).unwrap();
        assert_eq!(list["name"], "br");
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["plugins"][0]["type"], "bridge");
        assert!(list["plugins"][0].get("name").is_none());
        assert_eq!(list["plugins"][1]["type"], "moat-cni");
    }

    #[test]
    fn sync_chained_follows_the_base_config_and_ignores_its_own_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(sync_chained(dir.path(), &moat()).unwrap(), None);
        // Moat's own standalone file is not a base.
        write_conflist(
            dir.path(),
            &serde_json::json!({"name": "moat", "plugins": []}),
        )
        .unwrap();
        assert_eq!(sync_chained(dir.path(), &moat()).unwrap(), None);
        let base = dir.path().join("10-kindnet.conflist");
        fs::write(&base, serde_json::to_vec(&kindnet()).unwrap()).unwrap();
        assert_eq!(
            sync_chained(dir.path(), &moat()).unwrap(),
            Some(base.clone())
        );
        let read = || -> serde_json::Value {
            serde_json::from_slice(&fs::read(dir.path().join(CHAINED_CONFLIST_NAME)).unwrap())
                .unwrap()
        };
        assert_eq!(read(), chained_conflist(&kindnet(), moat()).unwrap());
        // The cluster's CNI rewrites its file: the chained copy follows.
        let mut changed = kindnet();
        changed["plugins"][0]["mtu"] = 1400.into();
        fs::write(&base, serde_json::to_vec(&changed).unwrap()).unwrap();
        sync_chained(dir.path(), &moat()).unwrap();
        assert_eq!(read()["plugins"][0]["mtu"], 1400);
        assert_eq!(read()["plugins"][1]["type"], "moat-cni");
    }

    /// kind's kindnet DaemonSet as kind's node images apply it (pkg/build/nodeimage/
    /// const_cni.go, v0.23.0 to v0.32.0: the same container, env and no args), with `image`.
    fn kind_kindnet(image: &str) -> k8s_openapi::api::apps::v1::DaemonSet {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "kindnet", "namespace": "kube-system",
                         "labels": {"app": "kindnet", "k8s-app": "kindnet", "tier": "node"}},
            "spec": {
                "selector": {"matchLabels": {"app": "kindnet"}},
                "template": {
                    "metadata": {"labels": {"app": "kindnet", "k8s-app": "kindnet"}},
                    "spec": {
                        "hostNetwork": true,
                        "serviceAccountName": "kindnet",
                        "containers": [{
                            "name": "kindnet-cni",
                            "image": image,
                            "env": [
                                {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                                {"name": "POD_SUBNET", "value": "10.244.0.0/16"}
                            ]
                        }]
                    }
                }
            }
        }))
        .unwrap()
    }

    /// kubernetes-sigs/kindnet's install-kindnet.yaml: an init container copying its CNI
    /// binary, then kindnet-cni with `args`.
    fn upstream_kindnet(image: &str, args: &[&str]) -> k8s_openapi::api::apps::v1::DaemonSet {
        let mut ds = kind_kindnet(image);
        first_container(&mut ds).args = Some(args.iter().map(|a| a.to_string()).collect());
        let pod = ds.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
        pod.init_containers = Some(vec![k8s_openapi::api::core::v1::Container {
            name: "install-cni-bin".into(),
            image: Some(image.into()),
            ..Default::default()
        }]);
        ds
    }

    /// The DaemonSet's first container (kindnetd in every fixture), to edit.
    fn first_container(
        ds: &mut k8s_openapi::api::apps::v1::DaemonSet,
    ) -> &mut k8s_openapi::api::core::v1::Container {
        &mut ds
            .spec
            .as_mut()
            .unwrap()
            .template
            .spec
            .as_mut()
            .unwrap()
            .containers[0]
    }

    fn enforcing(policy: &KindnetPolicy) -> bool {
        matches!(policy, KindnetPolicy::Enforcing(_))
    }

    #[test]
    fn kind_kindnetd_enforces_from_kind_v0_24_on_and_cannot_be_told_otherwise() {
        // The kindnetd image of each kind release's node images (const_cni.go at each tag).
        for (kind, image, enforces) in [
            (
                "v0.22.0",
                "docker.io/kindest/kindnetd:v20240202-8f1494ea",
                false,
            ),
            (
                "v0.23.0",
                "docker.io/kindest/kindnetd:v20240513-cd2ac642",
                false,
            ),
            (
                "v0.24.0",
                "docker.io/kindest/kindnetd:v20240813-c6f155d6",
                true,
            ),
            (
                "v0.25.0",
                "docker.io/kindest/kindnetd:v20241108-5c6d2daf",
                true,
            ),
            (
                "v0.27.0",
                "docker.io/kindest/kindnetd:v20250214-acbabc1a",
                true,
            ),
            (
                "v0.30.0",
                "docker.io/kindest/kindnetd:v20250512-df8de77b",
                true,
            ),
            ("v0.31.0", "docker.io/kindest/kindnetd:v20251212-v0", true),
            (
                "v0.32.0",
                "docker.io/kindest/kindnetd:v20260528-9350166c",
                true,
            ),
            // The first build with kube-network-policies (never in a release), and a mirror.
            ("e7903573", "kindest/kindnetd:v20240719-e7903573", true),
            (
                "mirror",
                "mirror.example:5000/kindest/kindnetd:v20240513-cd2ac642@sha256:00",
                false,
            ),
        ] {
            let policy = kindnet_policy(&kind_kindnet(image));
            assert_eq!(enforcing(&policy), enforces, "kind {kind}: {policy:?}");
        }
        let KindnetPolicy::Enforcing(why) = kindnet_policy(&kind_kindnet(
            "docker.io/kindest/kindnetd:v20240813-c6f155d6",
        )) else {
            unreachable!()
        };
        assert!(
            why.contains("kindnet-cni") && why.contains("v20240813-c6f155d6"),
            "{why}"
        );
        assert!(why.contains("no setting to turn it off"), "{why}");
        // kind's kindnetd defines no --network-policy flag: passing one changes nothing.
        let mut patched = kind_kindnet("docker.io/kindest/kindnetd:v20240813-c6f155d6");
        first_container(&mut patched).args = Some(vec!["--network-policy=false".into()]);
        let KindnetPolicy::Enforcing(why) = kindnet_policy(&patched) else {
            panic!("kind's kindnetd with --network-policy=false counted as not enforcing");
        };
        assert!(why.contains("not a flag kind's kindnetd defines"), "{why}");
        // No tag to date: cannot tell, so enforcing.
        for image in [
            "docker.io/kindest/kindnetd@sha256:e59a687ca28ae274a2fc92f1e2f5f1c739f353178a43a23aafc71adb802ed166",
            "kindest/kindnetd:latest",
            "kindest/kindnetd",
        ] {
            assert!(enforcing(&kindnet_policy(&kind_kindnet(image))), "{image}");
        }
    }

    #[test]
    fn upstream_kindnet_follows_its_network_policy_flag() {
        let image = "registry.k8s.io/networking/kindnet:v1.0.0";
        let install = [
            "--hostname-override=$(NODE_NAME)",
            "--network-policy=true",
            "--masquerading=true",
            "--v=2",
        ];
        assert!(enforcing(&kindnet_policy(&upstream_kindnet(
            image, &install
        ))));
        let off: Vec<&str> = install
            .iter()
            .map(|a| {
                if a.starts_with("--network-policy") {
                    "--network-policy=false"
                } else {
                    a
                }
            })
            .collect();
        assert_eq!(
            kindnet_policy(&upstream_kindnet(image, &off)),
            KindnetPolicy::NotEnforcing(format!(
                "container kindnet-cni ({image}) runs with --network-policy=false"
            ))
        );
        for (args, enforces) in [
            (&["-network-policy=0"][..], false),
            (&["--network-policy=F"], false),
            (&["--network-policy=FALSE", "--v=2"], false),
            // Go's flags: the last occurrence wins.
            (&["--network-policy=false", "--network-policy=true"], true),
            (&["--network-policy=true", "--network-policy=false"], false),
            // A bare boolean flag is true; the next argument is not its value.
            (&["--network-policy", "false"], true),
            // Not a boolean: kindnetd would refuse to start; Moat cannot tell.
            (&["--network-policy=no"], true),
            // Another flag with the same prefix is not this one.
            (&["--network-policy-mode=off"], true),
            // No flag: the default is true (since kindnet v1.5.0; registry.k8s.io v1.0.0 on).
            (&[], true),
            (&["--v=2"], true),
        ] {
            let policy = kindnet_policy(&upstream_kindnet(image, args));
            assert_eq!(enforcing(&policy), enforces, "{args:?}: {policy:?}");
        }
        // The flag may sit in the command as well (the binary first).
        let mut ds = upstream_kindnet(image, &[]);
        first_container(&mut ds).command = Some(vec![
            "/bin/kindnetd".into(),
            "--network-policy=false".into(),
        ]);
        assert!(!enforcing(&kindnet_policy(&ds)));
    }

    #[test]
    fn aojea_kindnetd_versions_before_the_move() {
        for (image, enforces) in [
            ("ghcr.io/aojea/kindnetd:v1.1.0", false),
            ("ghcr.io/aojea/kindnetd:v1.2.0", false),
            // Always on, no flag yet.
            ("ghcr.io/aojea/kindnetd:v1.3.0", true),
            // --network-policy defaulted to false.
            ("ghcr.io/aojea/kindnetd:v1.4.0", false),
            ("ghcr.io/aojea/kindnetd:v1.5.0", true),
            ("ghcr.io/aojea/kindnetd:v1.7.0", true),
            ("ghcr.io/aojea/kindnetd:stable", true),
            ("aojea/kindnetd:v1.0.1", false),
        ] {
            let policy = kindnet_policy(&upstream_kindnet(image, &["/bin/kindnetd", "--v=2"]));
            assert_eq!(enforcing(&policy), enforces, "{image}: {policy:?}");
        }
        // An explicit flag beats the version's default.
        let ds = upstream_kindnet("ghcr.io/aojea/kindnetd:v1.4.0", &["--network-policy=true"]);
        assert!(enforcing(&kindnet_policy(&ds)));
    }

    #[test]
    fn an_unknown_kindnet_counts_as_enforcing_unless_it_says_otherwise() {
        let image = "example.com/notkindest/kindnetd:v20240513-cd2ac642";
        let KindnetPolicy::Enforcing(why) = kindnet_policy(&upstream_kindnet(image, &[])) else {
            panic!("an unknown image without --network-policy=false counted as not enforcing");
        };
        assert!(why.contains("not an image Moat knows"), "{why}");
        assert!(!enforcing(&kindnet_policy(&upstream_kindnet(
            image,
            &["--network-policy=false"]
        ))));
        // No kindnet container at all.
        let mut ds = kind_kindnet(image);
        first_container(&mut ds).name = "something".into();
        let KindnetPolicy::Enforcing(why) = kindnet_policy(&ds) else {
            panic!("a DaemonSet without a kindnetd container counted as not enforcing");
        };
        assert!(why.contains("no kindnetd container"), "{why}");
    }

    #[test]
    fn kindnet_configs_are_recognised_by_name_or_file() {
        assert!(is_kindnet_config(
            Path::new("/etc/cni/net.d/10-kindnet.conflist"),
            &kindnet()
        ));
        assert!(is_kindnet_config(
            Path::new("/x/99-other.conflist"),
            &kindnet()
        ));
        let bridge = serde_json::json!({"name": "br", "plugins": [{"type": "bridge"}]});
        assert!(is_kindnet_config(
            Path::new("/x/10-kindnet.conflist"),
            &bridge
        ));
        assert!(!is_kindnet_config(
            Path::new("/x/10-bridge.conflist"),
            &bridge
        ));
    }

    #[test]
    fn chaining_onto_an_enforcing_kindnet_is_refused_and_undone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join(CHAINED_CONFLIST_NAME);
        let base = dir.path().join("10-kindnet.conflist");
        fs::write(&base, serde_json::to_vec(&kindnet()).unwrap()).unwrap();

        // kindnet without enforcement (kind v0.23): chained as before.
        let off = || Ok(KindnetPolicy::NotEnforcing("kind v0.23".into()));
        let state = sync_chained_checked(dir.path(), &moat(), off).unwrap();
        assert_eq!(state, ChainState::Chained(base.clone()));
        assert_eq!(state.not_ready_reason(), None);
        assert!(target.exists());

        // Cannot tell (DaemonSet unreadable): the file stays as it is, moatd says why.
        let unknown = || Err("reading DaemonSet kube-system/kindnet: forbidden".to_string());
        let state = sync_chained_checked(dir.path(), &moat(), unknown).unwrap();
        assert!(matches!(&state, ChainState::Undecided { base: b, .. } if *b == base));
        assert!(state.not_ready_reason().unwrap().contains("forbidden"));
        assert!(target.exists());

        // kindnet enforces (kind >= v0.24): refused, and the chained conflist is removed so
        // the runtime falls back to kindnet's own.
        let on = || Ok(KindnetPolicy::Enforcing("kind's kindnetd v20240813".into()));
        let state = sync_chained_checked(dir.path(), &moat(), on).unwrap();
        let ChainState::Refused { base: b, reason } = &state else {
            panic!("{state:?}");
        };
        assert_eq!(*b, base);
        assert!(
            reason.contains("kindnet enforces NetworkPolicy itself (kind's kindnetd v20240813)")
        );
        assert!(reason.contains("standalone") && reason.contains("--network-policy=false"));
        assert_eq!(state.not_ready_reason(), Some(reason.as_str()));
        assert!(!target.exists());
        // Refused again with nothing to remove.
        let state = sync_chained_checked(dir.path(), &moat(), on).unwrap();
        assert!(matches!(state, ChainState::Refused { .. }));
        assert!(!target.exists());
        // Undecided writes nothing either.
        sync_chained_checked(dir.path(), &moat(), unknown).unwrap();
        assert!(!target.exists());
        // Turned off (or replaced): chained again.
        sync_chained_checked(dir.path(), &moat(), off).unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&fs::read(&target).unwrap()).unwrap(),
            chained_conflist(&kindnet(), moat()).unwrap()
        );
    }

    #[test]
    fn other_primary_cnis_are_not_checked() {
        let dir = tempfile::tempdir().unwrap();
        let never = || -> Result<KindnetPolicy, String> { panic!("checked a non-kindnet config") };
        assert_eq!(
            sync_chained_checked(dir.path(), &moat(), never).unwrap(),
            ChainState::Waiting
        );
        let base = dir.path().join("10-bridge.conflist");
        let bridge = serde_json::json!({"cniVersion": "1.0.0", "name": "br",
                                        "plugins": [{"type": "bridge", "bridge": "cni0"}]});
        fs::write(&base, serde_json::to_vec(&bridge).unwrap()).unwrap();
        assert_eq!(
            sync_chained_checked(dir.path(), &moat(), never).unwrap(),
            ChainState::Chained(base)
        );
        assert!(dir.path().join(CHAINED_CONFLIST_NAME).exists());
    }

    #[test]
    fn standalone_mtu_reaches_the_moat_plugin() {
        let cidrs: Vec<IpNetwork> = vec!["10.244.1.0/24".parse().unwrap()];
        let list = standalone_conflist(
            &cidrs,
            Path::new("/run/moat/moatd.sock"),
            Path::new("/sys/fs/bpf/moat"),
            Some(1450),
        );
        assert_eq!(list["plugins"][0]["mtu"], 1450);
        assert_eq!(
            conflist(&cidrs, Path::new("/s"), Path::new("/p"))["plugins"][0].get("mtu"),
            None
        );
    }
}
