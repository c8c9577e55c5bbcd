//! shellcheck over every shell script of the repository (scripts/, kind-tests/,
//! manifests/build.sh, bench/run.sh, .ci/run...), following what they source
//! (kind-tests/versions.env). scripts/bootstrap.sh installs shellcheck.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// `*.sh` files and files whose first line is a sh/bash shebang; build output and VCS
/// directories are left out.
fn scripts(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            if !["target", ".git", "node_modules"].contains(&name.as_str())
                && !name.starts_with("target-")
            {
                scripts(&path, out);
            }
            continue;
        }
        let shebang = std::fs::read(&path)
            .map(|bytes| {
                let first = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
                let first = String::from_utf8_lossy(first);
                first.starts_with("#!") && (first.contains("bash") || first.ends_with("/sh"))
            })
            .unwrap_or(false);
        if name.ends_with(".sh") || shebang {
            out.push(path);
        }
    }
}

#[test]
fn shellcheck_passes_on_every_script() {
    let root = repo();
    let mut found = Vec::new();
    scripts(&root, &mut found);
    found.sort();
    let relative: Vec<String> = found
        .iter()
        .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    for expected in [
        "scripts/bootstrap.sh",
        "scripts/demo.sh",
        "manifests/build.sh",
        "bench/run.sh",
        "kind-tests/run.sh",
        "kind-tests/matrix.sh",
        "kind-tests/netpol-smoke.sh",
        "kind-tests/churn-smoke.sh",
        "kind-tests/conformance.sh",
        "kind-tests/cnp-conformance.sh",
        "kind-tests/down.sh",
        ".ci/run",
    ] {
        assert!(
            relative.contains(&expected.to_string()),
            "{expected} not found in {relative:?}"
        );
    }
    let out = Command::new("shellcheck")
        .arg("--external-sources")
        .args(&relative)
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("shellcheck not runnable ({e}): scripts/bootstrap.sh installs it (apt-get install shellcheck)"));
    assert!(
        out.status.success(),
        "shellcheck found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
