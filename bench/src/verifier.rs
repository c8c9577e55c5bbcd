//! `moat-bench verifier`: what loading the datapath costs the kernel's verifier. Every moatd
//! start and every datapath test pays it, and a program near the verifier's budget of
//! 1,000,000 walked instructions is one feature away from failing to load. Section
//! "verifier" of the results file: per program the instructions walked and their share of
//! the budget, and the load's wall time (median of a few loads).

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::Result;
use moat_datapath::{Datapath, PinDir};
use serde_json::{Map, Value, json};

use crate::util::{PinRootGuard, median, round, write_section};

/// The kernel's limit on instructions walked per program (BPF_COMPLEXITY_LIMIT_INSNS).
const VERIFIER_BUDGET: f64 = 1_000_000.0;

#[derive(clap::Args)]
pub struct Args {
    /// The results file.
    #[arg(long, value_name = "FILE", default_value = "bench/results.json")]
    out: PathBuf,
    /// Loads to time (each from an empty pin directory, as a first start).
    #[arg(long, value_name = "N", default_value_t = 3)]
    loads: usize,
}

pub fn main(args: Args) -> ExitCode {
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat-bench verifier: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let mut seconds = Vec::new();
    let mut verified = Vec::new();
    for n in 0..args.loads.max(1) {
        let root = PinRootGuard::new(format!("/sys/fs/bpf/moat-bench-verifier-{n}"));
        let started = Instant::now();
        let dp = Datapath::load(&PinDir::new(&root.root))?;
        seconds.push(started.elapsed().as_secs_f64());
        verified = dp.verified.clone();
    }
    let mut programs = Map::new();
    let mut total = 0u64;
    for (name, insns) in &verified {
        total += u64::from(*insns);
        println!(
            "{name:<22} {insns:>9} instructions walked ({:.1}% of the verifier's budget)",
            f64::from(*insns) / VERIFIER_BUDGET * 100.0
        );
        programs.insert(
            name.to_string(),
            json!({
                "verified_instructions": insns,
                "share_of_budget": round(f64::from(*insns) / VERIFIER_BUDGET, 3),
            }),
        );
    }
    let load = median(&seconds).unwrap_or(0.0);
    println!(
        "{:<22} {total:>9} instructions; load {load:.2} s (median of {})",
        "all programs",
        seconds.len()
    );
    write_section(
        &args.out,
        "verifier",
        Value::Object(Map::from_iter([
            ("programs".to_string(), Value::Object(programs)),
            ("total_verified_instructions".to_string(), json!(total)),
            ("load_seconds_median".to_string(), json!(round(load, 2))),
            ("loads".to_string(), json!(seconds.len())),
        ])),
    )
}
