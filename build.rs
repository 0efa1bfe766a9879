//! Compiles the admin API's protobuf definitions with pure-Rust tools (no `protoc` needed):
//! `protox` parses them into a descriptor set, `tonic-prost-build` generates the code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["phantom_authz/admin/v1/admin.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_transport(false)
        // The request carries a token: its `Debug` is written by hand, redacted.
        .skip_debug(["phantom_authz.admin.v1.EvictTokenRequest"])
        .compile_fds(descriptors)?;
    Ok(())
}
