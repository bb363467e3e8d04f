//! Generates the gRPC code from `proto/` (this crate's) with protox (pure Rust), so no `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds =
        protox::compile(["shardfarm/v1/agent.proto", "shardfarm/v1/coordinator.proto"], ["proto"])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
