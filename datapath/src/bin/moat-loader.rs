//! Loads (or re-adopts and upgrades) the datapath into a pin directory and optionally
//! attaches interfaces, then exits or holds. moatd does the same at start; this binary exists
//! for operators and for the tests that kill the loading process mid-flight.
//!
//! usage: moat-loader [--pin-root DIR] [--attach-mode tc|tcx] [--attach IFNAME]... [--hold]
use std::time::Duration;

use anyhow::{Context, Result};
use moat_datapath::{AttachMode, Datapath, PinDir, attach_endpoint_with};

fn main() -> Result<()> {
    let mut root: Option<String> = None;
    let mut attach = Vec::new();
    let mut hold = false;
    let mut mode = AttachMode::Tcx;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--pin-root" => root = Some(args.next().context("--pin-root needs a directory")?),
            "--attach" => attach.push(args.next().context("--attach needs an interface")?),
            "--hold" => hold = true,
            "--attach-mode" => {
                mode = match args.next().as_deref() {
                    Some("tc") => AttachMode::Tc,
                    Some("tcx") => AttachMode::Tcx,
                    other => anyhow::bail!("--attach-mode takes tc or tcx, not {other:?}"),
                }
            }
            "-h" | "--help" => {
                println!(
                    "usage: moat-loader [--pin-root DIR] [--attach-mode tc|tcx] [--attach IFNAME]... [--hold]"
                );
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?} (see --help)"),
        }
    }
    let pins = root.map(PinDir::new).unwrap_or_else(PinDir::from_env);
    let datapath = Datapath::load(&pins).map_err(anyhow::Error::from)?;
    for ifname in &attach {
        attach_endpoint_with(&pins, ifname, mode).map_err(anyhow::Error::from)?;
    }
    println!(
        "{{\"pin_dir\":\"{}\",\"adopted\":{},\"links_updated\":{},\"attached\":{}}}",
        pins.base().display(),
        datapath.adopted,
        datapath.links_updated,
        attach.len()
    );
    if hold {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    Ok(())
}
