//! `CNI_ARGS` parsing on its own (`CniArgs::parse`). The `config` target reaches the parser
//! too, through the dispatcher, but only sees "error or not"; this one checks what an accepted
//! string means, at a far higher rate.
//!
//! Properties: nothing panics; a refusal is code 4 (invalid environment) with a message that
//! names CNI_ARGS; an accepted string keeps exactly its `K=V` pairs (written back and parsed
//! again it gives the same values); unknown keys survive only under IgnoreUnknown.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_cni_protocol::{
    args::{
        CniArgs, IGNORE_UNKNOWN, K8S_POD_INFRA_CONTAINER_ID, K8S_POD_NAME, K8S_POD_NAMESPACE,
        K8S_POD_UID,
    },
    error::ErrorCode,
};

fn render(args: &CniArgs) -> String {
    let mut pairs = Vec::new();
    if args.ignore_unknown {
        pairs.push(format!("{IGNORE_UNKNOWN}=1"));
    }
    for (key, value) in [
        (K8S_POD_NAMESPACE, &args.pod_namespace),
        (K8S_POD_NAME, &args.pod_name),
        (K8S_POD_UID, &args.pod_uid),
        (K8S_POD_INFRA_CONTAINER_ID, &args.pod_infra_container_id),
    ] {
        if let Some(value) = value {
            pairs.push(format!("{key}={value}"));
        }
    }
    for (key, value) in &args.unknown {
        pairs.push(format!("{key}={value}"));
    }
    pairs.join(";")
}

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    match CniArgs::parse(raw) {
        Err(e) => {
            assert_eq!(e.code, ErrorCode::InvalidEnvironment, "{e}");
            assert!(e.msg.starts_with("CNI_ARGS: "), "{e}");
        }
        Ok(args) => {
            assert!(args.ignore_unknown || args.unknown.is_empty());
            for (key, value) in &args.unknown {
                assert!(!key.is_empty() && !key.contains(['=', ';']), "{key:?}");
                assert!(!value.contains(['=', ';']), "{value:?}");
            }
            for value in [
                &args.pod_namespace,
                &args.pod_name,
                &args.pod_uid,
                &args.pod_infra_container_id,
            ]
            .into_iter()
            .flatten()
            {
                assert!(!value.contains(['=', ';']), "{value:?}");
                assert!(raw.contains(value.as_str()));
            }
            let again = CniArgs::parse(&render(&args)).expect("a rendered CNI_ARGS parses");
            assert_eq!(again, args);
        }
    }
});
