//! README's "Configuration reference" against the code: the moatd flags table lists exactly
//! the long flags `moatd --help` prints, and the ConfigMap table lists exactly the keys of
//! manifests/configmap.yaml, each with the flag the DaemonSet feeds it into.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The rows of the first table under the heading `### {heading}`, as cells.
fn table(readme: &str, heading: &str) -> Vec<Vec<String>> {
    let start = readme
        .find(&format!("\n### {heading}\n"))
        .unwrap_or_else(|| panic!("README has no section {heading}"));
    let rest = &readme[start + 1..];
    let end = rest[4..].find("\n#").map_or(rest.len(), |i| i + 4);
    rest[..end]
        .lines()
        .filter(|l| l.starts_with("| "))
        .skip(1) // header
        .map(|l| {
            l.trim_matches('|')
                .replace("\\|", "\u{0}")
                .split('|')
                .map(|c| c.trim().replace('\u{0}', "|"))
                .collect()
        })
        .collect()
}

/// The `--long-flag` names in backticks in a cell: "`--a x|y`, `--b`" gives --a and --b.
fn flags_in(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("--"))
        .map(|s| {
            s.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect()
        })
        .collect()
}

fn in_backticks(cell: &str) -> &str {
    cell.split('`').nth(1).unwrap_or(cell)
}

fn moatd_help_flags() -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_moatd"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| {
            l.split([' ', ',', '='])
                .filter(|w| w.starts_with("--"))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|f| f != "--help" && f != "--version")
        .collect()
}

#[test]
fn moatd_flags_table_lists_exactly_moatds_flags() {
    let readme = read("README.md");
    let mut documented = BTreeSet::new();
    for row in table(&readme, "moatd flags") {
        let flags = flags_in(&row[0]);
        assert!(!flags.is_empty(), "row without a flag: {row:?}");
        for flag in flags {
            assert!(documented.insert(flag.clone()), "{flag} documented twice");
        }
    }
    let help = moatd_help_flags();
    assert!(help.len() > 20, "moatd --help parsed to {help:?}");
    let missing: Vec<_> = help.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&help).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "README's moatd flags table: missing {missing:?}, not flags of moatd {unknown:?}"
    );
}

#[test]
fn configmap_table_lists_exactly_the_configmaps_keys_with_the_daemonsets_flags() {
    let readme = read("README.md");
    let configmap = read("manifests/configmap.yaml");
    let daemonset = read("manifests/daemonset.yaml");
    let help = moatd_help_flags();

    // Keys of `data:` (two-space indented `key: value` lines; comments skipped).
    let data = &configmap[configmap.find("\ndata:\n").expect("configmap data") + 7..];
    let keys: BTreeSet<String> = data
        .lines()
        .take_while(|l| l.starts_with("  ") || l.is_empty())
        .filter(|l| !l.trim_start().starts_with('#') && l.contains(':'))
        .map(|l| l.trim().split(':').next().unwrap().to_string())
        .collect();
    assert!(keys.len() > 5, "configmap parsed to {keys:?}");

    let rows = table(&readme, "ConfigMap `kube-system/moat-config`");
    let documented: BTreeSet<String> = rows.iter().map(|r| in_backticks(&r[0]).into()).collect();
    assert_eq!(documented.len(), rows.len(), "a key documented twice");
    let missing: Vec<_> = keys.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&keys).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "README's ConfigMap table: missing {missing:?}, not in manifests/configmap.yaml {unknown:?}"
    );

    for row in &rows {
        let key = in_backticks(&row[0]);
        // The env variable the DaemonSet fills from this key.
        let lines: Vec<&str> = daemonset.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.contains(&format!("key: {key}}}")))
            .unwrap_or_else(|| panic!("the DaemonSet does not read {key}"));
        let env = lines[at - 1]
            .trim()
            .strip_prefix("- name: ")
            .unwrap_or_else(|| panic!("no env name above {key}"));
        let target = in_backticks(&row[1]);
        if let Some(flag) = target.strip_prefix("--") {
            let flag = format!("--{flag}");
            assert!(help.contains(&flag), "{key}: moatd has no {flag}");
            assert!(
                daemonset.contains(&format!("- {flag}=$({env})")),
                "{key}: the DaemonSet does not pass $({env}) as {flag}"
            );
        } else {
            assert_eq!(
                target, env,
                "{key}: README says {target}, DaemonSet sets {env}"
            );
        }
    }
}
