//! README's "Conflist: moat-cni's keys" lists exactly the keys moat-cni reads
//! (`moat_cni::config::KEYS`) and the CNI spec's `type` and `ipam`.

use std::collections::BTreeSet;
use std::path::PathBuf;

#[test]
fn conflist_table_lists_exactly_moat_cnis_keys() {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let heading = "\n### Conflist: moat-cni's keys\n";
    let start = readme
        .find(heading)
        .expect("README has the conflist section")
        + heading.len();
    let section = &readme[start..];
    let section = &section[..section.find("\n#").unwrap_or(section.len())];
    let rows: Vec<String> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| l.split('`').nth(1).unwrap().to_string())
        .collect();
    let documented: BTreeSet<String> = rows.iter().cloned().collect();
    assert_eq!(documented.len(), rows.len(), "a key documented twice");
    let code: BTreeSet<String> = moat_cni::config::KEYS
        .iter()
        .chain(&["type", "ipam"])
        .map(|k| k.to_string())
        .collect();
    let missing: Vec<_> = code.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&code).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "README's conflist table: missing {missing:?}, not read by moat-cni {unknown:?}"
    );
}
