//! moat-ipam as a CNI IPAM plugin: maps each CNI command onto the library calls.
//!
//! The result is the abbreviated delegated-IPAM form (no interfaces, no `ips[].interface`);
//! the calling plugin fills those in.

use moat_cni_protocol::{
    AttachmentRequest, CniError, ErrorCode, IpConfig, NetworkRequest, Plugin, SuccessResult,
};

use crate::config::IpamConfig;

pub struct IpamPlugin;

fn ipam_config(config: &moat_cni_protocol::NetworkConfig) -> Result<IpamConfig, CniError> {
    Ok(IpamConfig::from_network_config(config)?)
}

impl Plugin for IpamPlugin {
    fn add(&self, request: &AttachmentRequest) -> Result<SuccessResult, CniError> {
        let config = ipam_config(&request.config)?;
        let allocations = crate::allocate(
            &request.config.name,
            &request.container_id,
            &request.ifname,
            &config,
        )?;
        let mut result = SuccessResult::new(request.version);
        result.ips = allocations
            .into_iter()
            .map(|a| IpConfig {
                address: a.address,
                gateway: a.gateway,
                interface: None,
            })
            .collect();
        result.routes = config.routes.clone();
        result.dns = config.dns.clone().unwrap_or_default();
        Ok(result)
    }

    fn del(&self, request: &AttachmentRequest) -> Result<(), CniError> {
        let config = ipam_config(&request.config)?;
        Ok(crate::release(
            &request.config.name,
            &request.container_id,
            &request.ifname,
            &config,
        )?)
    }

    fn check(&self, request: &AttachmentRequest) -> Result<(), CniError> {
        let config = ipam_config(&request.config)?;
        let held = crate::check(
            &request.config.name,
            &request.container_id,
            &request.ifname,
            &config,
        )?;
        // When the runtime passes the ADD result, every address we hold must appear in it.
        if let Some(previous) = request.config.prev_result()? {
            for allocation in &held {
                if !previous
                    .ips
                    .iter()
                    .any(|ip| ip.address.ip() == allocation.address.ip())
                {
                    return Err(CniError::new(
                        ErrorCode::Plugin(crate::error::CODE_ALLOCATION_MISSING),
                        "allocated address missing from prevResult",
                    )
                    .with_details(allocation.address.to_string()));
                }
            }
        }
        Ok(())
    }

    fn status(&self, request: &NetworkRequest) -> Result<(), CniError> {
        let config = ipam_config(&request.config)?;
        match crate::exhausted_family(&request.config.name, &config)? {
            Some(family) => Err(CniError::new(
                ErrorCode::PluginNotAvailable,
                "IP address range exhausted",
            )
            .with_details(format!(
                "no free {} address in network {}; release addresses or widen the range",
                family.name(),
                request.config.name
            ))),
            None => Ok(()),
        }
    }

    /// Without a valid-attachments list (e.g. `cnitool gc`) nothing is released: an absent
    /// list says nothing about which attachments are alive, and wiping every address of the
    /// node would be far worse than leaking until the next GC with a list.
    fn gc(&self, request: &NetworkRequest) -> Result<(), CniError> {
        let config = ipam_config(&request.config)?;
        match request.config.valid_attachments() {
            Some(valid) => {
                crate::gc(&request.config.name, valid, &config)?;
            }
            None => eprintln!("moat-ipam: GC without cni.dev/valid-attachments; releasing nothing"),
        }
        Ok(())
    }
}
