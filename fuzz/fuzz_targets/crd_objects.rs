//! Kubernetes objects as the kubernetes datastore receives them from the API server: any JSON
//! deserialized as a Pod, Namespace, NetworkPolicy, Node (k8s-openapi) and MoatPolicy (the CRD
//! type), then converted into Moat's model by `moatd::kube::convert`. The API server validates
//! objects, but not against everything Moat assumes (ports, modes, CIDRs, MoatPolicy rules
//! beyond its schema), and a watch must survive whatever it is sent.
//!
//! Properties: nothing panics; a converted pod keeps its key, has no port 0 and only a known
//! mode; an accepted policy normalizes; a refused MoatPolicy names the object; a node's
//! addresses are distinct and its CIDRs are no more than it listed.

#![no_main]

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod},
    networking::v1::NetworkPolicy,
};
use libfuzzer_sys::fuzz_target;
use moatd::kube::convert;

fn pod(pod: &Pod) {
    let item = convert::pod_item(pod);
    assert_eq!(item.key, convert::pod_key(pod));
    if let Some(meta) = &item.meta {
        assert!(meta.ports.iter().all(|p| p.port != 0));
        // Only a known mode: `meta.mode` is an enum, so an unknown annotation can only be
        // left out, and then it is reported.
        if meta.mode.is_none()
            && let Some(written) = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(moatd::local::MODE_ANNOTATION))
        {
            assert!(
                item.warning
                    .as_deref()
                    .is_some_and(|w| w.contains(&format!("{written:?}")))
            );
        }
    } else {
        assert!(item.warning.is_none());
    }
}

fn network_policy(policy: &NetworkPolicy) {
    let _ = convert::policy_key(policy);
    match convert::network_policy(policy) {
        Ok(p) => {
            p.normalize().expect("an accepted NetworkPolicy normalizes");
        }
        Err(e) => assert!(!e.is_empty()),
    }
}

fn moat_policy(policy: &moat_crds::MoatPolicy) {
    let (ns, name) = convert::moat_policy_key(policy);
    match convert::moat_policy(policy) {
        Ok(p) => {
            p.normalize().expect("an accepted MoatPolicy normalizes");
        }
        Err(e) => assert!(e.contains(&format!("{ns}/{name}")), "{e}"),
    }
}

fn node(node: &Node) {
    let _ = convert::node_key(node);
    let info = convert::node_info(node);
    for (i, a) in info.addresses.iter().enumerate() {
        assert!(!info.addresses[..i].contains(a));
    }
    let listed = node.spec.as_ref().map_or(0, |s| {
        s.pod_cidrs
            .as_ref()
            .map_or(0, Vec::len)
            .max(usize::from(s.pod_cidr.is_some()))
    });
    assert!(info.pod_cidrs.len() <= listed);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(ns) = serde_json::from_slice::<Namespace>(data) {
        let _ = (convert::namespace_key(&ns), convert::namespace_labels(&ns));
    }
    if let Ok(p) = serde_json::from_slice::<Pod>(data) {
        pod(&p);
    }
    if let Ok(p) = serde_json::from_slice::<NetworkPolicy>(data) {
        network_policy(&p);
    }
    if let Ok(p) = serde_json::from_slice::<moat_crds::MoatPolicy>(data) {
        moat_policy(&p);
    }
    if let Ok(n) = serde_json::from_slice::<Node>(data) {
        node(&n);
    }
});
