//! Generates the etcd client code from `proto/etcd.proto` with protox (a .proto compiler
//! in Rust), so no `protoc` is needed on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/etcd.proto");
    let descriptors = protox::compile(["proto/etcd.proto"], ["proto"])?;
    tonic_prost_build::configure().build_server(true).compile_fds(descriptors)?;
    Ok(())
}
