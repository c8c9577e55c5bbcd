mod support;

#[test]
fn programs_pass_the_verifier_and_pin() {
    let dp = support::LoadedDatapath::new("smoke");
    assert!(
        dp.pins
            .program(moat_common::program_name::FROM_CONTAINER)
            .exists()
    );
    assert!(
        dp.pins
            .program(moat_common::program_name::TO_CONTAINER)
            .exists()
    );
}
