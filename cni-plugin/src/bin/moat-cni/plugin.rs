//! The Moat plugin: chained (enforcement on an interface an earlier plugin made) and
//! standalone (Moat builds the veth, IPAM delegated). Enforcement never fails open: ADD
//! succeeds only once moatd has registered the endpoint and both programs are attached, and
//! everything done before a failure is undone.

use std::{net::IpAddr, path::Path};

use ipnetwork::IpNetwork;
use moat_api::{
    self as api, ClientError, EndpointSpec, EndpointStatus, HostRequest, Request, Response,
};
use moat_cni_protocol::{
    AttachmentRequest, CniError, ErrorCode, Interface, IpConfig, NetworkRequest, Plugin, Route,
    SuccessResult, args::CniArgs,
};
use moat_datapath::{
    PinDir,
    attach::{attached_interfaces, unpin_endpoint},
    attach_endpoint_with, detach_endpoint, rtnl,
};

use moat_cni::config::{MoatConfig, Mode};

use crate::{
    delegate::Delegate,
    netlink::{self, GATEWAY_V4, GATEWAY_V6, LinkInfo, mac_string},
    test_hook::abort_point,
};

/// moatd answered but refused the request.
pub const CODE_MOATD_REFUSED: u32 = 110;
/// CHECK found the attachment not as ADD left it.
pub const CODE_CHECK_FAILED: u32 = 111;
/// Creating or inspecting interfaces failed.
pub const CODE_NETLINK: u32 = 112;
/// The programs could not be attached for a reason other than moatd not being ready.
pub const CODE_ATTACH: u32 = 113;

pub struct MoatPlugin;

fn moatd_error(error: ClientError, code_when_down: ErrorCode) -> CniError {
    match error {
        ClientError::Unreachable { .. } | ClientError::Io { .. } => {
            CniError::new(code_when_down, "moatd is not reachable").with_details(format!(
                "{error}; enforcement cannot be guaranteed, so the pod is not started"
            ))
        }
        ClientError::Protocol(_) | ClientError::Refused(_) => CniError::new(
            ErrorCode::Plugin(CODE_MOATD_REFUSED),
            "moatd refused the request",
        )
        .with_details(error.to_string()),
    }
}

fn netlink_error(msg: &str, error: anyhow::Error) -> CniError {
    CniError::new(ErrorCode::Plugin(CODE_NETLINK), msg).with_details(format!("{error:#}"))
}

/// The code comes from the datapath's error variant: programs not pinned means moatd has not
/// loaded them (not running, or starting), which the runtime should retry (11); anything else
/// is an attach failure of this plugin.
fn attach_error(host_ifname: &str, error: &moat_datapath::Error) -> CniError {
    let code = match error {
        moat_datapath::Error::ProgramNotPinned { .. } => ErrorCode::TryAgainLater,
        _ => ErrorCode::Plugin(CODE_ATTACH),
    };
    CniError::new(
        code,
        format!("attaching Moat programs to {host_ifname} failed"),
    )
    .with_details(format!("{error:#}"))
}

fn check_failed(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::Plugin(CODE_CHECK_FAILED), msg)
}

struct Ctx<'a> {
    request: &'a AttachmentRequest,
    config: MoatConfig,
    pins: PinDir,
}

impl<'a> Ctx<'a> {
    fn new(request: &'a AttachmentRequest) -> Result<Ctx<'a>, CniError> {
        let config = MoatConfig::from_network(&request.config)?;
        let pins = PinDir::new(&config.pin_root);
        Ok(Ctx {
            request,
            config,
            pins,
        })
    }

    fn netns(&self) -> Result<&Path, CniError> {
        self.request.netns.as_deref().ok_or_else(|| {
            CniError::invalid_environment("required env variables [CNI_NETNS] missing")
        })
    }

    fn netns_string(&self) -> String {
        self.request
            .netns
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    fn call(&self, request: &Request) -> Result<Response, ClientError> {
        api::call(&self.config.socket, request, self.config.timeout)
    }

    fn delegate(&self) -> Delegate<'_> {
        Delegate {
            plugin_type: self
                .request
                .config
                .ipam
                .as_ref()
                .map(|i| i.plugin_type.as_str())
                .unwrap_or(""),
            cni_path: &self.request.cni_path,
            raw_config: &self.request.raw_config,
            version: self.request.version,
        }
    }

    /// The pod interface's MTU: the configured `mtu`; else the node uplink's (the default
    /// route's device: no overlay, so nothing to subtract), so that pods neither fragment
    /// nor black-hole on a smaller network nor waste a jumbo one; else the 1500 default.
    fn pod_mtu(&self) -> u32 {
        if self.config.mtu_explicit {
            return self.config.mtu;
        }
        match netlink::uplink_mtu(None) {
            Ok(Some(mtu)) if (68..=65535).contains(&mtu) => mtu,
            _ => self.config.mtu,
        }
    }

    /// Fails fast, before anything is created, when moatd cannot register endpoints.
    fn require_moatd_ready(&self) -> Result<(), CniError> {
        match moatd_ready(&self.config) {
            Ok(Ready::Yes) => Ok(()),
            // TryAgainLater: the runtime retries the sandbox; the reason says what moatd
            // waits for (the first sync, the Node's podCIDR).
            Ok(Ready::No(reason)) => Err(CniError::new(
                ErrorCode::TryAgainLater,
                match reason {
                    Some(reason) => format!("moatd is not ready to register endpoints: {reason}"),
                    None => "moatd is not ready to register endpoints".to_string(),
                },
            )),
            Err(ReadyError::Unexpected(answer)) => Err(CniError::new(
                ErrorCode::Plugin(CODE_MOATD_REFUSED),
                "unexpected answer from moatd",
            )
            .with_details(answer)),
            Err(ReadyError::Client(e)) => Err(moatd_error(e, ErrorCode::TryAgainLater)),
        }
    }

    fn endpoint_spec(&self, host: &LinkInfo, ips: Vec<IpAddr>) -> EndpointSpec {
        let args: &CniArgs = &self.request.args;
        EndpointSpec {
            container_id: self.request.container_id.clone(),
            ifname: self.request.ifname.clone(),
            netns: self.netns_string(),
            host_ifname: host.name.clone(),
            host_ifindex: host.index,
            ips,
            pod_namespace: args
                .pod_namespace
                .clone()
                .unwrap_or_else(|| "default".to_string()),
            pod_name: args
                .pod_name
                .clone()
                .unwrap_or_else(|| self.request.container_id.clone()),
            pod_uid: args.pod_uid.clone(),
        }
    }

    fn register(&self, spec: EndpointSpec) -> Result<(), CniError> {
        match self.call(&Request::Register { endpoint: spec }) {
            Ok(Response::Registered(_)) => Ok(()),
            Ok(other) => Err(CniError::new(
                ErrorCode::Plugin(CODE_MOATD_REFUSED),
                "unexpected answer from moatd to register",
            )
            .with_details(format!("{other:?}"))),
            Err(e) => Err(moatd_error(e, ErrorCode::TryAgainLater)),
        }
    }

    fn unregister_best_effort(&self) {
        let _ = self.call(&Request::Unregister {
            container_id: self.request.container_id.clone(),
            ifname: self.request.ifname.clone(),
        });
    }

    fn attach(&self, host_ifname: &str) -> Result<(), CniError> {
        attach_endpoint_with(&self.pins, host_ifname, self.config.attach)
            .map_err(|e| attach_error(host_ifname, &e))
    }

    /// Attaches both programs to `host` on a scoped thread while `meanwhile` runs, and
    /// returns once both are done. A TCX attachment (`"attach": "tcx"`) costs the kernel an
    /// RCU grace period under RTNL, the bulk of such an ADD; IPAM and the registration with
    /// moatd need neither, so they run in that time. The first error wins; undoing is the
    /// caller's.
    fn attach_while<T>(
        &self,
        host: &str,
        meanwhile: impl FnOnce() -> Result<T, CniError>,
    ) -> Result<T, CniError> {
        std::thread::scope(|scope| {
            let attaching = scope.spawn(|| self.attach(host));
            let done = meanwhile();
            let attached = attaching.join().unwrap_or_else(|_| {
                Err(CniError::new(
                    ErrorCode::Plugin(CODE_ATTACH),
                    "the attaching thread panicked",
                ))
            });
            let value = done?;
            attached?;
            Ok(value)
        })
    }

    /// Chained: register and attach; on failure undo both. Returns only when enforcement is
    /// live (programs attached, endpoint in the maps).
    fn enforce(&self, host: &LinkInfo, ips: Vec<IpAddr>) -> Result<(), CniError> {
        let spec = self.endpoint_spec(host, ips);
        self.attach_while(&host.name, || self.register(spec))
            .inspect_err(|_| {
                self.unregister_best_effort();
                let _ = detach_endpoint(&self.pins, &host.name);
            })
    }

    fn endpoints(&self) -> Result<Vec<EndpointStatus>, ClientError> {
        match self.call(&Request::ListEndpoints)? {
            Response::Endpoints { endpoints } => Ok(endpoints),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    fn own_endpoint(endpoints: &[EndpointStatus], cid: &str, ifname: &str) -> Option<EndpointSpec> {
        endpoints
            .iter()
            .find(|e| e.spec.container_id == cid && e.spec.ifname == ifname)
            .map(|e| e.spec.clone())
    }

    // ---- ADD ----

    fn add_chained(&self) -> Result<SuccessResult, CniError> {
        let prev = self.request.config.prev_result()?.ok_or_else(|| {
            CniError::invalid_network_config("moat-cni in chained mode requires a prevResult")
                .with_details("put moat-cni after an interface plugin (bridge, ptp, ...) in the conflist, or set \"mode\": \"standalone\"")
        })?;
        let netns = self.netns()?;
        let ips = container_ips(&prev, &self.request.ifname, &self.netns_string());
        if ips.is_empty() {
            return Err(CniError::invalid_network_config(
                "prevResult has no address for the container interface",
            )
            .with_details(format!(
                "no ips for {} in {}",
                self.request.ifname,
                netns.display()
            )));
        }
        self.require_moatd_ready()?;
        let host = netlink::host_peer_of(netns, &self.request.ifname).map_err(|e| {
            netlink_error("cannot find the host side of the container interface", e)
        })?;
        self.enforce(&host, ips)?;
        Ok(prev)
    }

    fn add_standalone(&self) -> Result<SuccessResult, CniError> {
        let netns = self.netns()?;
        let ifname = self.request.ifname.clone();
        let host_ifname = self
            .config
            .host_veth_name(&self.request.container_id, &ifname);
        // A host veth under this attachment's deterministic name comes from an earlier ADD
        // of the same attachment. Up with both programs attached (its last step), that ADD
        // got through: this is a repeated ADD, refused below as "interface exists" (spec),
        // and the runtime's DEL removes it. Otherwise it died midway (kill -9, node crash) or
        // is a DEL's veth moatd has not deleted yet: remove it, its pod end with it, so this
        // ADD starts clean. Registration and address need nothing here: re-registering
        // replaces the record, and IPAM hands the same attachment the same addresses.
        let complete = rtnl::link_is_up(&host_ifname) == Some(true)
            && moat_datapath::is_attached(&self.pins, &host_ifname);
        if rtnl::ifindex_of(&host_ifname).is_some() && !complete {
            let _ = detach_endpoint(&self.pins, &host_ifname);
            netlink::delete_host_link(&host_ifname).map_err(|e| {
                netlink_error("cannot remove the veth an interrupted ADD left behind", e)
            })?;
        }
        match netlink::container_link(netns, &ifname) {
            Ok(None) => {}
            Ok(Some(_)) => {
                return Err(CniError::new(
                    ErrorCode::Plugin(CODE_NETLINK),
                    format!("interface {ifname} already exists in the container"),
                )
                .with_details(netns.display().to_string()));
            }
            Err(e) => return Err(netlink_error("cannot inspect the container namespace", e)),
        }
        self.require_moatd_ready()?;

        // The pair first, both ends down; then the programs go on while IPAM allocates and
        // moatd registers; then the pod side is configured and the host end comes up. Nothing
        // passes before the programs are attached and the endpoint is known.
        let plan = netlink::VethPlan {
            host_ifname: host_ifname.clone(),
            host_alias: netlink::veth_alias(
                &self.request.config.name,
                &self.request.container_id,
                &ifname,
            ),
            container_ifname: ifname.clone(),
            mtu: self.pod_mtu(),
        };
        let delegate = self.delegate();
        let rollback = |error: CniError| -> CniError {
            self.unregister_best_effort();
            let _ = detach_endpoint(&self.pins, &host_ifname);
            let _ = netlink::delete_host_link(&host_ifname);
            let _ = delegate.run("DEL");
            error
        };
        let host = netlink::create_pair(netns, &plan).map_err(|e| {
            let _ = netlink::delete_host_link(&host_ifname);
            netlink_error("cannot create the pod veth", e)
        })?;
        let host_mac = host
            .mac
            .clone()
            .ok_or_else(|| rollback(netlink_error("no MAC", anyhow::anyhow!("host veth"))))?;
        let (ipam, addresses) = self
            .attach_while(&host.name, || {
                let ipam = delegate.add()?;
                abort_point("ipam-allocated");
                let addresses: Vec<IpAddr> = ipam.ips.iter().map(|ip| ip.address.ip()).collect();
                if addresses.is_empty() {
                    return Err(CniError::new(
                        ErrorCode::Plugin(CODE_NETLINK),
                        "the IPAM plugin returned no address",
                    ));
                }
                self.register(self.endpoint_spec(&host, addresses.clone()))?;
                abort_point("registered");
                Ok((ipam, addresses))
            })
            .map_err(rollback)?;
        abort_point("attached");
        // Only now are the pod's address families known: forwarding is turned on for those
        // alone (before the host end comes up, so the first packet is forwarded).
        netlink::ensure_forwarding(Path::new(netlink::PROC_SYS), &addresses)
            .map_err(|e| rollback(netlink_error("cannot enable forwarding", e)))?;
        let container = netlink::configure_pod(netns, &plan, &host_mac, &addresses)
            .map_err(|e| rollback(netlink_error("cannot configure the pod interface", e)))?;
        netlink::activate_host(&plan, host.index, &addresses)
            .map_err(|e| rollback(netlink_error("cannot bring the host veth up", e)))?;
        abort_point("veth-configured");

        let mut result = SuccessResult::new(self.request.version);
        result.interfaces.push(Interface {
            name: host.name.clone(),
            mac: Some(mac_string(&host_mac)),
            mtu: host.mtu,
            ..Interface::default()
        });
        result.interfaces.push(Interface {
            name: ifname,
            mac: container.mac.as_deref().map(mac_string),
            mtu: container.mtu,
            sandbox: Some(self.netns_string()),
            ..Interface::default()
        });
        for address in &addresses {
            let (net, gateway) = match address {
                IpAddr::V4(_) => (IpNetwork::new(*address, 32), IpAddr::V4(GATEWAY_V4)),
                IpAddr::V6(_) => (IpNetwork::new(*address, 128), IpAddr::V6(GATEWAY_V6)),
            };
            result.ips.push(IpConfig {
                address: net.expect("host prefix is valid"),
                gateway: Some(gateway),
                interface: Some(1),
            });
        }
        if addresses.iter().any(IpAddr::is_ipv4) {
            result.routes.push(Route::new(
                "0.0.0.0/0".parse().expect("valid"),
                Some(IpAddr::V4(GATEWAY_V4)),
            ));
        }
        if addresses.iter().any(IpAddr::is_ipv6) {
            result.routes.push(Route::new(
                "::/0".parse().expect("valid"),
                Some(IpAddr::V6(GATEWAY_V6)),
            ));
        }
        result.dns = ipam.dns;
        Ok(result)
    }

    // ---- DEL ----

    fn del(&self) -> Result<(), CniError> {
        match self.config.mode {
            Mode::Standalone => self.del_standalone(),
            Mode::Chained => self.del_chained(),
        }
    }

    /// Standalone DEL. moatd takes the veth over: it sets the link pins aside (the programs
    /// stay on), forgets the endpoint (from then on the programs drop everything on the veth)
    /// and answers; it deletes the veth in the background. A veth with TCX programs takes the
    /// kernel tens of milliseconds to delete (an RCU grace period per hook under RTNL, then an
    /// RCU barrier), which DEL does not wait for, and DEL itself needs no RTNL at all. When
    /// moatd is down (or too old for the request) the veth is deleted here first, then the
    /// unregister is queued. The address goes back to IPAM last: a new pod that gets it
    /// replaces the host route to the old veth, whose programs drop everything meanwhile.
    fn del_standalone(&self) -> Result<(), CniError> {
        let cid = self.request.container_id.clone();
        let ifname = self.request.ifname.clone();
        let host = self.config.host_veth_name(&cid, &ifname);
        let mut errors: Vec<CniError> = Vec::new();
        match rtnl::ifindex_of(&host) {
            Some(index) => self.hand_over_veth(&cid, &ifname, &host, index, &mut errors)?,
            None => {
                // No device: leftover pins hold defunct links, dropping them detaches nothing.
                self.unpin(&host, &mut errors);
                self.unregister_or_queue(&cid, &ifname, &mut errors);
            }
        }
        if let Err(e) = self.delegate().run("DEL") {
            errors.push(e);
        }
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// moatd forgets the endpoint and deletes the veth; if moatd cannot take that request,
    /// the veth is deleted here (if that fails, DEL stops with everything still enforced and
    /// the runtime retries), its pins dropped, and the unregister sent or queued.
    fn hand_over_veth(
        &self,
        cid: &str,
        ifname: &str,
        host: &str,
        index: u32,
        errors: &mut Vec<CniError>,
    ) -> Result<(), CniError> {
        let request = HostRequest::UnregisterAndDeleteLink {
            container_id: cid.to_string(),
            ifname: ifname.to_string(),
            host_ifname: host.to_string(),
            host_ifindex: index,
        };
        match api::call(&self.config.socket, &request, self.config.timeout) {
            Ok(_) => return Ok(()),
            // Unreachable, or a moatd that does not know the request (it refuses with "bad
            // request"): the old way.
            Err(
                ClientError::Unreachable { .. }
                | ClientError::Io { .. }
                | ClientError::Refused(_)
                | ClientError::Protocol(_),
            ) => {}
        }
        rtnl::delete_link(index)
            .map_err(|e| netlink_error("deleting the host veth failed", anyhow::Error::from(e)))?;
        self.unpin(host, errors);
        self.unregister_or_queue(cid, ifname, errors);
        Ok(())
    }

    fn unpin(&self, host: &str, errors: &mut Vec<CniError>) {
        if let Err(e) = unpin_endpoint(&self.pins, host) {
            errors.push(
                CniError::new(
                    ErrorCode::Plugin(CODE_ATTACH),
                    format!("removing the link pins of {host} failed"),
                )
                .with_details(format!("{e:#}")),
            );
        }
    }

    /// Chained DEL: the interface belongs to an earlier plugin (deleted after us, in reverse
    /// order); find its host side, forget the endpoint, detach.
    fn del_chained(&self) -> Result<(), CniError> {
        let cid = self.request.container_id.clone();
        let ifname = self.request.ifname.clone();
        let host_ifname = self
            .endpoints()
            .ok()
            .and_then(|list| Self::own_endpoint(&list, &cid, &ifname))
            .map(|spec| spec.host_ifname)
            .or_else(|| {
                let netns = self.request.netns.as_deref()?;
                netlink::host_peer_of(netns, &ifname).ok().map(|l| l.name)
            });
        let mut errors: Vec<CniError> = Vec::new();
        self.unregister_or_queue(&cid, &ifname, &mut errors);
        if let Some(host) = &host_ifname {
            self.detach(host, &mut errors);
        }
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Tells moatd to forget the endpoint; when moatd is not reachable the DEL is queued for
    /// it (moatd replays the queue when it starts).
    fn unregister_or_queue(&self, cid: &str, ifname: &str, errors: &mut Vec<CniError>) {
        match self.call(&Request::Unregister {
            container_id: cid.to_string(),
            ifname: ifname.to_string(),
        }) {
            Ok(_) => {}
            Err(ClientError::Unreachable { .. } | ClientError::Io { .. }) => {
                if let Err(e) = self.queue(cid, ifname) {
                    errors.push(e);
                }
            }
            Err(e) => errors.push(moatd_error(e, ErrorCode::TryAgainLater)),
        }
    }

    fn detach(&self, host: &str, errors: &mut Vec<CniError>) {
        if let Err(e) = detach_endpoint(&self.pins, host) {
            errors.push(
                CniError::new(
                    ErrorCode::Plugin(CODE_ATTACH),
                    format!("detaching Moat programs from {host} failed"),
                )
                .with_details(format!("{e:#}")),
            );
        }
    }

    fn queue(&self, cid: &str, ifname: &str) -> Result<(), CniError> {
        api::queue_pending_unregister(&self.config.pending_dir, cid, ifname).map_err(|e| {
            CniError::new(
                ErrorCode::IoFailure,
                "moatd is down and the DEL could not be queued",
            )
            .with_details(format!("{}: {e}", self.config.pending_dir.display()))
        })
    }

    // ---- CHECK ----

    fn check(&self) -> Result<(), CniError> {
        let prev = self
            .request
            .config
            .prev_result()?
            .ok_or_else(|| CniError::invalid_network_config("CHECK requires a prevResult"))?;
        let netns = self.netns()?;
        let ifname = &self.request.ifname;
        let present = netlink::container_addresses(netns, ifname)
            .map_err(|e| netlink_error("cannot inspect the container interface", e))?
            .ok_or_else(|| {
                check_failed(format!(
                    "interface {ifname} not found in {}",
                    netns.display()
                ))
            })?;
        let expected = container_ips(&prev, ifname, &self.netns_string());
        for ip in &expected {
            if !present.iter().any(|net| net.ip() == *ip) {
                return Err(check_failed(format!("address {ip} missing on {ifname}"))
                    .with_details(format!("present: {present:?}")));
            }
        }
        let host = netlink::host_peer_of(netns, ifname).map_err(|e| {
            check_failed("host side of the container interface not found")
                .with_details(format!("{e:#}"))
        })?;
        if self.config.mode == Mode::Standalone {
            let wanted = self
                .config
                .host_veth_name(&self.request.container_id, ifname);
            if host.name != wanted {
                return Err(check_failed("host veth is not the one Moat created")
                    .with_details(format!("found {}, expected {wanted}", host.name)));
            }
            let (v4, v6) = netlink::container_default_routes(netns, ifname)
                .map_err(|e| netlink_error("cannot read container routes", e))?;
            if expected.iter().any(IpAddr::is_ipv4) && !v4 {
                return Err(check_failed("IPv4 default route missing in the container"));
            }
            if expected.iter().any(IpAddr::is_ipv6) && !v6 {
                return Err(check_failed("IPv6 default route missing in the container"));
            }
        }
        if !moat_datapath::is_attached(&self.pins, &host.name) {
            return Err(check_failed(format!(
                "Moat programs are not attached to {}",
                host.name
            )));
        }
        let endpoints = self
            .endpoints()
            .map_err(|e| moatd_error(e, ErrorCode::TryAgainLater))?;
        match Self::own_endpoint(&endpoints, &self.request.container_id, ifname) {
            Some(spec) if spec.host_ifname == host.name => {}
            Some(spec) => {
                return Err(
                    check_failed("moatd knows the endpoint on another interface")
                        .with_details(format!("{} vs {}", spec.host_ifname, host.name)),
                );
            }
            None => return Err(check_failed("moatd does not know this endpoint")),
        }
        if self.config.mode == Mode::Standalone {
            self.delegate().run("CHECK")?;
        }
        Ok(())
    }
}

/// Why moatd's readiness could not be read.
enum ReadyError {
    Client(ClientError),
    Unexpected(String),
}

/// moatd's answer to `Request::Ready`.
enum Ready {
    Yes,
    /// Not ready, with moatd's reason when it gives one.
    No(Option<String>),
}

/// moatd's readiness (`Request::Ready`: no map is read, unlike `Status`).
fn moatd_ready(config: &MoatConfig) -> Result<Ready, ReadyError> {
    match api::call(&config.socket, &Request::Ready, config.timeout) {
        Ok(Response::Ready { ready: true, .. }) => Ok(Ready::Yes),
        Ok(Response::Ready {
            ready: false,
            reason,
        }) => Ok(Ready::No(reason)),
        Ok(other) => Err(ReadyError::Unexpected(format!("{other:?}"))),
        Err(e) => Err(ReadyError::Client(e)),
    }
}

/// Addresses of the container interface in a result: those whose `interface` points at the
/// entry for (`ifname`, `netns`); when no interface matches, every address.
fn container_ips(result: &SuccessResult, ifname: &str, netns: &str) -> Vec<IpAddr> {
    let index = result
        .interfaces
        .iter()
        .position(|i| i.name == ifname && i.sandbox.as_deref() == Some(netns))
        .or_else(|| {
            result.interfaces.iter().position(|i| {
                i.name == ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty())
            })
        });
    let matched: Vec<IpAddr> = result
        .ips
        .iter()
        .filter(|ip| index.is_some() && ip.interface == index)
        .map(|ip| ip.address.ip())
        .collect();
    if !matched.is_empty() {
        return matched;
    }
    result
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none() || index.is_none())
        .map(|ip| ip.address.ip())
        .collect()
}

impl Plugin for MoatPlugin {
    fn add(&self, request: &AttachmentRequest) -> Result<SuccessResult, CniError> {
        let ctx = Ctx::new(request)?;
        match ctx.config.mode {
            Mode::Chained => ctx.add_chained(),
            Mode::Standalone => ctx.add_standalone(),
        }
    }

    fn del(&self, request: &AttachmentRequest) -> Result<(), CniError> {
        Ctx::new(request)?.del()
    }

    fn check(&self, request: &AttachmentRequest) -> Result<(), CniError> {
        Ctx::new(request)?.check()
    }

    fn status(&self, request: &NetworkRequest) -> Result<(), CniError> {
        let config = MoatConfig::from_network(&request.config)?;
        match moatd_ready(&config) {
            Ok(Ready::Yes) => {}
            Ok(Ready::No(reason)) => {
                let error = CniError::new(ErrorCode::PluginNotAvailable, "moatd is not ready");
                return Err(match reason {
                    Some(reason) => error.with_details(reason),
                    None => error,
                });
            }
            Err(ReadyError::Unexpected(answer)) => {
                return Err(CniError::new(
                    ErrorCode::PluginNotAvailable,
                    "unexpected answer from moatd",
                )
                .with_details(answer));
            }
            Err(ReadyError::Client(e)) => {
                return Err(
                    CniError::new(ErrorCode::PluginNotAvailable, "moatd is not reachable")
                        .with_details(e.to_string()),
                );
            }
        }
        if config.mode == Mode::Standalone {
            network_delegate(request).run("STATUS")?;
        }
        Ok(())
    }

    fn gc(&self, request: &NetworkRequest) -> Result<(), CniError> {
        let config = MoatConfig::from_network(&request.config)?;
        let pins = PinDir::new(&config.pin_root);
        let mut errors: Vec<CniError> = Vec::new();
        // Without any attachment list the runtime did not say what is live: remove nothing.
        if let Some(valid) = request.config.valid_attachments() {
            match api::call(&config.socket, &Request::ListEndpoints, config.timeout) {
                Ok(Response::Endpoints { endpoints }) => {
                    for endpoint in &endpoints {
                        let spec = &endpoint.spec;
                        let live = valid.iter().any(|a| {
                            a.container_id == spec.container_id && a.ifname == spec.ifname
                        });
                        if live {
                            continue;
                        }
                        if let Err(e) = api::call(
                            &config.socket,
                            &Request::Unregister {
                                container_id: spec.container_id.clone(),
                                ifname: spec.ifname.clone(),
                            },
                            config.timeout,
                        ) {
                            errors.push(moatd_error(e, ErrorCode::TryAgainLater));
                        }
                        let _ = detach_endpoint(&pins, &spec.host_ifname);
                        if config.mode == Mode::Standalone
                            && spec.host_ifname
                                == config.host_veth_name(&spec.container_id, &spec.ifname)
                            && let Err(e) = netlink::delete_host_link(&spec.host_ifname)
                        {
                            errors.push(netlink_error("deleting a stale host veth failed", e));
                        }
                    }
                    if config.mode == Mode::Standalone {
                        let live: Vec<String> = valid
                            .iter()
                            .map(|a| config.host_veth_name(&a.container_id, &a.ifname))
                            .collect();
                        sweep_orphan_veths(
                            &config,
                            &request.config.name,
                            &live,
                            &pins,
                            &mut errors,
                        );
                    }
                    // Pins for interfaces that are gone and that no endpoint owns.
                    let owned: Vec<&str> = endpoints
                        .iter()
                        .map(|e| e.spec.host_ifname.as_str())
                        .collect();
                    if let Ok(names) = attached_interfaces(&pins) {
                        for name in names {
                            let exists = Path::new("/sys/class/net").join(&name).exists();
                            if !owned.contains(&name.as_str()) && !exists {
                                let _ = detach_endpoint(&pins, &name);
                            }
                        }
                    }
                }
                Ok(other) => errors.push(
                    CniError::new(
                        ErrorCode::Plugin(CODE_MOATD_REFUSED),
                        "unexpected answer from moatd",
                    )
                    .with_details(format!("{other:?}")),
                ),
                Err(e) => errors.push(moatd_error(e, ErrorCode::TryAgainLater)),
            }
        }
        if config.mode == Mode::Standalone
            && let Err(e) = network_delegate(request).run("GC")
        {
            errors.push(e);
        }
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Standalone GC of host veths moatd does not know: an ADD killed between creating the veth
/// and registering it leaves one. A veth is this network's when its alias names the network,
/// or when it has no alias and is down: ADD sets the alias in the same message that sets the
/// veth up, so a down veth without alias is an ADD that never got that far (GC never runs
/// concurrently with ADD on the same runtime, spec). Veths of valid attachments stay.
fn sweep_orphan_veths(
    config: &MoatConfig,
    network: &str,
    live: &[String],
    pins: &PinDir,
    errors: &mut Vec<CniError>,
) {
    let veths = match netlink::host_veths_with_prefix(&config.host_veth_prefix) {
        Ok(veths) => veths,
        Err(e) => {
            errors.push(netlink_error("listing host veths failed", e));
            return;
        }
    };
    for veth in veths {
        let ours = match veth.alias.as_deref() {
            Some(alias) if !alias.is_empty() => netlink::alias_network(alias) == Some(network),
            _ => !veth.up,
        };
        if !ours || live.contains(&veth.name) {
            continue;
        }
        let _ = detach_endpoint(pins, &veth.name);
        if let Err(e) = netlink::delete_host_link(&veth.name) {
            errors.push(netlink_error("deleting a stale host veth failed", e));
        }
    }
}

fn network_delegate(request: &NetworkRequest) -> Delegate<'_> {
    Delegate {
        plugin_type: request
            .config
            .ipam
            .as_ref()
            .map(|i| i.plugin_type.as_str())
            .unwrap_or(""),
        cni_path: &request.cni_path,
        raw_config: &request.raw_config,
        version: request.version,
    }
}

#[cfg(test)]
mod tests {
    use moat_datapath::AttachMode;

    use super::*;

    /// moatd not running (nothing pinned under the pin root) is "try again later", decided by
    /// the datapath's error type; the details still say what to look at.
    #[test]
    fn attach_without_pinned_programs_is_try_again_later() {
        let root = tempfile::tempdir().unwrap();
        let error = attach_endpoint_with(&PinDir::new(root.path()), "moat-none0", AttachMode::Tcx)
            .unwrap_err();
        let cni = attach_error("moat-none0", &error);
        assert_eq!(cni.code, ErrorCode::TryAgainLater, "{cni}");
        assert!(cni.details.unwrap().contains("is moatd running?"));
    }

    /// Any other attach failure is this plugin's own code, whatever its text says.
    #[test]
    fn other_attach_failures_are_plugin_code_113() {
        let error = moat_datapath::Error::Other(anyhow::anyhow!("is moatd running? no: EPERM"));
        let cni = attach_error("moat-x", &error);
        assert_eq!(cni.code, ErrorCode::Plugin(CODE_ATTACH));
        assert_eq!(cni.code.as_u32(), 113);
    }
}
