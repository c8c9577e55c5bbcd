//! Workload names for grouping flows: a pod's controller-generated suffixes are dropped so
//! that the replicas of one Deployment, ReplicaSet or StatefulSet read as one workload
//! (`shop/web-7d9f8b6c5-x2k4q` and `shop/web-7d9f8b6c5-q8zzt` are both `shop/web`). The
//! journal records pod names, not owners, so the name is the only evidence there is.

use crate::api::{Direction, FlowRecord};

/// The alphabet Kubernetes uses for generated name suffixes (no vowels, no 0/1/3).
fn is_generated(segment: &str, lengths: std::ops::RangeInclusive<usize>) -> bool {
    lengths.contains(&segment.len())
        && segment
            .bytes()
            .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b))
}

/// `namespace/name` with the name's generated suffixes removed: a 5-character pod suffix,
/// then a 6–10-character pod-template hash, or a StatefulSet ordinal. Anything else (a
/// reserved peer such as `world`, an address) is returned as it is.
pub fn workload_of(pod: &str) -> String {
    let Some((namespace, name)) = pod.split_once('/') else {
        return pod.to_string();
    };
    let mut base = name;
    if let Some((head, last)) = base.rsplit_once('-') {
        if is_generated(last, 5..=5) {
            base = head;
            if let Some((head, hash)) = base.rsplit_once('-')
                && is_generated(hash, 6..=10)
            {
                base = head;
            }
        } else if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
            base = head;
        }
    }
    format!("{namespace}/{base}")
}

/// The workloads a record's flow went from and to: the recording endpoint and its peer,
/// ordered by the flow's direction. An unnamed side is its address.
pub fn flow_ends(r: &FlowRecord) -> (String, String) {
    let endpoint = r.endpoint.as_deref().map(workload_of);
    let peer = r.peer.as_deref().map(workload_of);
    match r.direction {
        Direction::Ingress => (
            peer.unwrap_or_else(|| r.source.clone()),
            endpoint.unwrap_or_else(|| r.destination.clone()),
        ),
        Direction::Egress => (
            endpoint.unwrap_or_else(|| r.source.clone()),
            peer.unwrap_or_else(|| r.destination.clone()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_share_a_workload_and_other_names_stay() {
        assert_eq!(workload_of("shop/web-7d9f8b6c5-x2k4q"), "shop/web");
        assert_eq!(workload_of("shop/web-x2k4q"), "shop/web");
        assert_eq!(workload_of("shop/db-0"), "shop/db");
        assert_eq!(workload_of("shop/api"), "shop/api");
        // A hand-written name that happens to end in a word is kept.
        assert_eq!(workload_of("shop/front-end"), "shop/front-end");
        assert_eq!(workload_of("world"), "world");
    }
}
