//! Prints Moat's CustomResourceDefinitions as YAML (manifests/crds/moatpolicies.moat.io.yaml).
//!
//!   cargo run -p moat-crds --bin moat-crdgen > manifests/crds/moatpolicies.moat.io.yaml

fn main() -> anyhow::Result<()> {
    print!("{}", moat_crds::crd_yaml()?);
    Ok(())
}
