//! Generates the gRPC code from `proto/novacron.proto` with protox (a .proto compiler in
//! Rust), so no `protoc` is needed on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/novacron.proto");
    let descriptors = protox::compile(["proto/novacron.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // `--output json` prints the messages as they are.
        .type_attribute(".novacron.v1", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)?;
    Ok(())
}
