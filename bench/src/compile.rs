//! `moat-bench policy`: the policy engine's compile cost on a synthetic cluster (pure, no
//! kernel), written to the "policy" section of bench/results.json.
//!
//!   moat-bench policy [--out FILE] [--pods N] [--policies N] [--namespaces N] [--samples N]
//!
//! Defaults: 10,000 pods, 1,000 NetworkPolicies, 500 namespaces, 200 samples per kind of
//! incremental update. Incremental kinds:
//! - pod_existing_identity: a new replica of an existing app (its label set has an identity);
//! - pod_new_identity: a pod with a label set no pod has yet;
//! - policy_change: an existing NetworkPolicy replaced by one of another style; a new
//!   NetworkPolicy added, then deleted.
//!
//! Pod samples are undone afterwards (the undo is timed as well); at the end the engine's
//! state is checked against a from-scratch compile. Figures are the engine's alone; the
//! end-to-end figures (engine + maps + durable registry) are the "churn" section's.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Result;
use moat_policy::{Delta, Engine, NetworkPolicy, compile};
use moat_testkit::synthetic::{Rng, apps_per_namespace, namespace_name, pod, policy, synthetic};
use serde_json::{Value, json};

/// `moat-bench policy`'s flags.
#[derive(clap::Args)]
pub struct Args {
    /// The results file.
    #[arg(long, value_name = "FILE", default_value = "bench/results.json")]
    out: PathBuf,
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pods: usize,
    #[arg(long, value_name = "N", default_value_t = 1_000)]
    policies: usize,
    #[arg(long, value_name = "N", default_value_t = 500)]
    namespaces: usize,
    /// Samples per kind of incremental update.
    #[arg(long, value_name = "N", default_value_t = 200)]
    samples: usize,
}

pub fn main(args: Args) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat-bench policy: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> Result<()> {
    let Args {
        out,
        pods,
        policies,
        namespaces,
        samples,
    } = args;
    let section = measure(pods, policies, namespaces, samples.max(1));
    println!("{}", serde_json::to_string_pretty(&section)?);
    crate::util::write_section(&out, "policy", section)?;
    println!("\nwritten: {} (section \"policy\")", out.display());
    Ok(())
}

fn percentiles(mut samples: Vec<Duration>) -> serde_json::Value {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1e6
    };
    json!({
        "samples": samples.len(),
        "p50_us": (at(0.50) * 10.0).round() / 10.0,
        "p99_us": (at(0.99) * 10.0).round() / 10.0,
        "max_us": (at(1.0) * 10.0).round() / 10.0,
    })
}

fn size(d: &Delta) -> usize {
    d.policy.upserts.len()
        + d.policy.deletes.len()
        + d.port_ranges.upserts.len()
        + d.port_ranges.deletes.len()
        + d.cidr_v4.upserts.len()
        + d.cidr_v4.deletes.len()
        + d.cidr_v6.upserts.len()
        + d.cidr_v6.deletes.len()
}

fn measure(pods: usize, policies: usize, namespaces: usize, samples: usize) -> Value {
    let seed = 42;
    let inputs = synthetic(pods, policies, namespaces, seed);

    let mut scratch = Vec::new();
    let mut state = None;
    for _ in 0..3 {
        let t = Instant::now();
        let s = compile(&inputs).expect("compiles");
        scratch.push(t.elapsed());
        state = Some(s);
    }
    let state = state.unwrap();
    scratch.sort();

    let t = Instant::now();
    let mut engine = Engine::from_inputs(inputs.clone()).expect("compiles");
    let engine_build = t.elapsed();

    let apps = apps_per_namespace(pods, namespaces);
    let mut rng = Rng::new(seed ^ 0xbe4c);
    let mut next_ip = pods + 1000;

    // A new replica of an existing app: same labels up to the volatile hash.
    let (mut up, mut down, mut touched) = (Vec::new(), Vec::new(), 0usize);
    for i in 0..samples {
        let ns = rng.below(namespaces);
        let mut p = pod(ns, rng.below(apps), 1000 + i, next_ip, &mut rng);
        next_ip += 1;
        p.name = format!("extra-{i}");
        let r = p.pod_ref();
        let t = Instant::now();
        let d = engine.upsert_pod(p).expect("ok");
        up.push(t.elapsed());
        touched += size(&d);
        let t = Instant::now();
        engine.delete_pod(&r).expect("ok");
        down.push(t.elapsed());
    }
    let existing = json!({"upsert": percentiles(up), "delete": percentiles(down),
                          "policy_entries_written": touched});

    // A pod with a label set of its own.
    let (mut up, mut down, mut touched) = (Vec::new(), Vec::new(), 0usize);
    for i in 0..samples {
        let ns = rng.below(namespaces);
        let mut p = pod(ns, rng.below(apps), 2000 + i, next_ip, &mut rng);
        next_ip += 1;
        p.name = format!("fresh-{i}");
        p.labels.insert("canary", format!("c{i}"));
        let r = p.pod_ref();
        let t = Instant::now();
        let d = engine.upsert_pod(p).expect("ok");
        up.push(t.elapsed());
        touched += size(&d);
        let t = Instant::now();
        engine.delete_pod(&r).expect("ok");
        down.push(t.elapsed());
    }
    let new_identity = json!({"upsert": percentiles(up), "delete": percentiles(down),
                              "avg_policy_entries_written": touched / samples.max(1)});

    assert_eq!(engine.state(), &state, "every sample was undone");

    // A policy replaced by one of another style (kept: the cluster drifts), then a policy
    // added and deleted.
    let names: Vec<(String, String)> = engine.inputs().policies.keys().cloned().collect();
    let (mut change, mut touched) = (Vec::new(), 0usize);
    for _ in 0..samples {
        let (ns, name) = &names[rng.below(names.len())];
        let replacement = policy(ns, name, rng.below(8), apps, &mut rng);
        let t = Instant::now();
        let d = engine.upsert_policy(&replacement).expect("ok");
        change.push(t.elapsed());
        touched += size(&d);
    }
    let (mut add, mut delete) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let ns = namespace_name(rng.below(namespaces));
        let name = format!("extra-{i}");
        let p: NetworkPolicy = policy(&ns, &name, rng.below(8), apps, &mut rng);
        let t = Instant::now();
        engine.upsert_policy(&p).expect("ok");
        add.push(t.elapsed());
        let t = Instant::now();
        engine.delete_policy(&ns, &name).expect("ok");
        delete.push(t.elapsed());
    }
    let policy_change = json!({"update": percentiles(change), "add": percentiles(add),
                               "delete": percentiles(delete),
                               "avg_policy_entries_written": touched / samples.max(1)});

    let t = Instant::now();
    let fresh = compile(engine.inputs()).expect("compiles");
    let recompile = t.elapsed();
    assert_eq!(
        engine.state(),
        &fresh,
        "incremental result equals from scratch"
    );

    let p99_ms = |v: &Value| v["p99_us"].as_f64().map(|us| (us / 10.0).round() / 100.0);
    let summary = json!({
        "compile_from_scratch_ms": (scratch[1].as_secs_f64() * 1e4).round() / 10.0,
        "pod_existing_identity_p99_ms": p99_ms(&existing["upsert"]),
        "pod_new_identity_p99_ms": p99_ms(&new_identity["upsert"]),
        "policy_update_p99_ms": p99_ms(&policy_change["update"]),
    });
    json!({
            "cluster": {
                "pods": pods, "policies": policies, "namespaces": namespaces, "seed": seed,
                "identities": state.identities.len(),
                "policy_entries": state.policy.len(),
                "port_range_entries": state.port_ranges.len(),
                "cidr_entries": state.cidr_v4.len() + state.cidr_v6.len(),
                "rules": state.rules.len(),
            },
            "from_scratch_ms": {
                "min": scratch[0].as_secs_f64() * 1e3,
                "median": scratch[1].as_secs_f64() * 1e3,
                "engine_from_inputs": engine_build.as_secs_f64() * 1e3,
                "after_policy_changes": recompile.as_secs_f64() * 1e3,
            },
            "incremental": {
                "pod_existing_identity": existing,
                "pod_new_identity": new_identity,
                "policy_change": policy_change,
            },
            "incremental_equals_from_scratch": true,
            "summary": summary,
    })
}
