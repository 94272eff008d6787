//! Compiles the `.proto` files with `protox` (pure Rust), so building needs no
//! system `protoc`. The balancer's service code is generated too; the crate
//! compiles it only with the `grpc` feature.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dataplane = "proto/gpupool/v1/dataplane.proto";
    let balancer = "proto/gpupool/balancer/v1/balancer.proto";
    for f in [dataplane, balancer] {
        println!("cargo:rerun-if-changed={f}");
    }
    prost_build::Config::new()
        .bytes(["."])
        // A call's name (`<&str>::from(&op)`), for logs and call statistics.
        .type_attribute(".gpupool.v1.Call.op", "#[derive(strum::IntoStaticStr)]")
        .compile_fds(protox::compile([dataplane], ["proto"])?)?;
    tonic_prost_build::configure().compile_fds(protox::compile([balancer], ["proto"])?)?;
    Ok(())
}
