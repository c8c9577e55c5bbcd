//! Loads the datapath into a scratch pin directory and prints the verifier's complaint, if
//! any, in full. `cargo run -p moat-datapath --example load -- /sys/fs/bpf/moat-scratch`
fn main() {
    let root = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/sys/fs/bpf/moat-scratch".into());
    let pins = moat_datapath::PinDir::new(&root);
    let started = std::time::Instant::now();
    match moat_datapath::Datapath::load(&pins) {
        Ok(dp) => println!("loaded in {:?}, adopted={}", started.elapsed(), dp.adopted),
        Err(e) => {
            eprintln!("{:?}", anyhow::Error::from(e));
            std::process::exit(1);
        }
    }
}
