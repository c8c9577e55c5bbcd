//! The build toolchain is pinned in one place, toolchain.env: the nightly that builds the eBPF
//! programs, the bpf-linker version and its LLVM major, the static target of the CNI binaries.
//! scripts/bootstrap.sh (dev machines and `make test`), the Dockerfile (image builds),
//! scripts/build-static.sh and datapath/build.rs all read it, none of them names the moving
//! `nightly` channel, and no file in the repository repeats a pinned value.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn read(path: &str) -> String {
    fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn pins() -> BTreeMap<String, String> {
    read("toolchain.env")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("toolchain.env: not KEY=VALUE: {l}"));
            // build.rs reads the file without a shell: plain values only.
            assert!(
                !v.is_empty() && !v.contains(['"', '\'', '$', ' ', '`']),
                "toolchain.env: {k} must be a plain value, not {v:?}"
            );
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn toolchain_env_names_every_pin() {
    let pins = pins();
    let keys: Vec<&str> = pins.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "BPF_LINKER_LLVM_MAJOR",
            "BPF_LINKER_VERSION",
            "MOAT_NIGHTLY",
            "MOAT_STATIC_TARGET"
        ]
    );
    let nightly = &pins["MOAT_NIGHTLY"];
    let date = nightly
        .strip_prefix("nightly-")
        .expect("MOAT_NIGHTLY is a dated nightly");
    let parts: Vec<&str> = date.split('-').collect();
    assert!(
        parts.len() == 3
            && [4, 2, 2]
                .iter()
                .zip(&parts)
                .all(|(n, p)| p.len() == *n && p.bytes().all(|b| b.is_ascii_digit())),
        "MOAT_NIGHTLY is not nightly-YYYY-MM-DD: {nightly}"
    );
    assert_eq!(pins["BPF_LINKER_VERSION"].split('.').count(), 3);
    pins["BPF_LINKER_LLVM_MAJOR"].parse::<u32>().unwrap();
    assert!(pins["MOAT_STATIC_TARGET"].ends_with("-linux-musl"));
}

/// Ways of naming the unpinned nightly as a toolchain.
const BARE_NIGHTLY: [&str; 5] = [
    "+nightly ",
    "+nightly\"",
    "toolchain install nightly ",
    "--toolchain nightly",
    "run nightly ",
];

fn assert_no_bare_nightly(path: &str, text: &str) {
    for (n, line) in text.lines().enumerate() {
        for bare in BARE_NIGHTLY {
            assert!(
                !line.contains(bare),
                "{path}:{}: names the unpinned nightly ({bare:?}): {line}",
                n + 1
            );
        }
    }
}

#[test]
fn bootstrap_dockerfile_and_build_rs_take_the_toolchain_from_toolchain_env() {
    // bootstrap: sources the file and installs exactly what it names.
    let bootstrap = read("scripts/bootstrap.sh");
    assert!(bootstrap.contains(". \"$repo/toolchain.env\""));
    for used in [
        "rustup toolchain install \"$MOAT_NIGHTLY\"",
        "rustc +\"$MOAT_NIGHTLY\"",
        "cargo install bpf-linker --version \"$BPF_LINKER_VERSION\"",
        "\"$BPF_LINKER_LLVM_MAJOR\"",
        "rustup target add \"$MOAT_STATIC_TARGET\"",
    ] {
        assert!(bootstrap.contains(used), "bootstrap.sh lacks {used}");
    }
    assert_no_bare_nightly("scripts/bootstrap.sh", &bootstrap);

    // Dockerfile: copies the file, and every RUN that names a pin sources it first.
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("COPY toolchain.env /etc/moat/toolchain.env"));
    assert!(
        !dockerfile.contains("ARG BPF_LINKER") && !dockerfile.contains("ARG MOAT_"),
        "Dockerfile: a build ARG would be a second place for a pin"
    );
    let runs: Vec<String> = dockerfile
        .split("\nRUN ")
        .skip(1)
        .map(|r| {
            // The instruction runs to its first line without a continuation backslash.
            let mut run = String::new();
            for line in r.lines() {
                run.push_str(line);
                run.push('\n');
                if !line.trim_end().ends_with('\\') {
                    break;
                }
            }
            run
        })
        .collect();
    let mut pinned_runs = 0;
    for run in &runs {
        if run.contains("$MOAT_")
            || run.contains("$BPF_LINKER")
            || run.contains("${BPF_LINKER")
            || run.contains("build-static.sh")
        {
            pinned_runs += 1;
            assert!(
                run.contains(". /etc/moat/toolchain.env") || run.contains("build-static.sh"),
                "Dockerfile RUN uses a pin without sourcing toolchain.env: {run}"
            );
        }
    }
    // The nightly, bpf-linker and the workspace build (static CNI binaries).
    assert!(pinned_runs >= 3, "{pinned_runs} RUN steps use the pins");
    for used in [
        "rustup toolchain install \"$MOAT_NIGHTLY\"",
        "rustc +\"$MOAT_NIGHTLY\"",
        "rustup target add \"$MOAT_STATIC_TARGET\"",
        "cargo install bpf-linker --version \"${BPF_LINKER_VERSION}\"",
        "\"$BPF_LINKER_LLVM_MAJOR\"",
        "scripts/build-static.sh",
    ] {
        assert!(dockerfile.contains(used), "Dockerfile lacks {used}");
    }
    assert_no_bare_nightly("Dockerfile", &dockerfile);

    // The static build script reads the target from the file.
    let build_static = read("scripts/build-static.sh");
    assert!(build_static.contains(". \"$repo/toolchain.env\""));
    assert!(build_static.contains("--target \"$MOAT_STATIC_TARGET\""));

    // datapath/build.rs: `rustup run <MOAT_NIGHTLY>`, read from the file, rebuilt when it
    // changes.
    let build_rs = read("datapath/build.rs");
    for used in [
        "join(\"../toolchain.env\")",
        "\"MOAT_NIGHTLY\"",
        "cargo:rerun-if-changed={}\", toolchain_env",
        "[\"run\", &nightly,",
    ] {
        assert!(build_rs.contains(used), "datapath/build.rs lacks {used}");
    }
    assert!(
        !build_rs.contains("\"nightly\""),
        "datapath/build.rs names the unpinned nightly"
    );
}

fn text_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if entry.file_type().unwrap().is_dir() {
            // Build output and VCS data are not sources.
            if !matches!(name.as_ref(), "target" | ".git" | "node_modules") {
                text_files(&path, out);
            }
        } else if entry.file_type().unwrap().is_file() && name != "Cargo.lock" {
            out.push(path);
        }
    }
}

#[test]
fn no_other_file_repeats_a_pinned_version() {
    let pins = pins();
    let nightly = &pins["MOAT_NIGHTLY"];
    let date = nightly.trim_start_matches("nightly-");
    let linker = &pins["BPF_LINKER_VERSION"];
    let llvm_feature = format!("llvm-{}", pins["BPF_LINKER_LLVM_MAJOR"]);
    let mut files = Vec::new();
    text_files(&repo(), &mut files);
    let mut offenders = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(repo()).unwrap().display().to_string();
        if rel == "toolchain.env" {
            continue;
        }
        let Ok(text) = fs::read_to_string(file) else {
            continue; // not text
        };
        for (n, line) in text.lines().enumerate() {
            let lower = line.to_ascii_lowercase();
            let repeats = line.contains(nightly.as_str())
                || (line.contains(date) && lower.contains("nightly"))
                || (line.contains(linker.as_str()) && lower.contains("bpf-linker"))
                || line.contains(&llvm_feature);
            if repeats {
                offenders.push(format!("{rel}:{}: {line}", n + 1));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "pinned versions belong in toolchain.env only:\n{}",
        offenders.join("\n")
    );
}
