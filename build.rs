//! Compiles protobuf definitions with pure-Rust tools (no `protoc` needed):
//! - the admin API: `protox` parses it into a descriptor set, `tonic-prost-build` generates code;
//! - Envoy's ext_authz API, for gRPC server reflection only: the `.proto` files ship inside the
//!   `envoy-types` crate, found through `cargo metadata`, and are encoded as a descriptor set.

use std::path::{Path, PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=Cargo.lock");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let admin = protox::compile(["phantom_authz/admin/v1/admin.proto"], ["proto"])?;
    std::fs::write(out_dir.join("admin_descriptor.bin"), admin.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_transport(false)
        // The request carries a token: its `Debug` is written by hand, redacted.
        .skip_debug(["phantom_authz.admin.v1.EvictTokenRequest"])
        .compile_fds(admin)?;

    // Reflection is a convenience: without the Envoy protos the service still builds, and
    // reflection then describes health alone.
    let ext_authz = match envoy_ext_authz_descriptors() {
        Ok(descriptors) => descriptors,
        Err(error) => {
            println!("cargo:warning=gRPC reflection will not describe ext_authz: {error}");
            Vec::new()
        }
    };
    std::fs::write(out_dir.join("envoy_ext_authz_descriptor.bin"), ext_authz)?;
    Ok(())
}

fn envoy_ext_authz_descriptors() -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let envoy = envoy_proto_root()?;
    let includes: Vec<PathBuf> = std::fs::read_dir(&envoy)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_dir())
        .collect();
    let descriptors = protox::compile(["envoy/service/auth/v3/external_auth.proto"], includes)?;
    Ok(descriptors.encode_to_vec())
}

/// The `proto/` directory of the `envoy-types` package this build uses.
fn envoy_proto_root() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(&std::env::var("CARGO_MANIFEST_DIR")?).join("Cargo.toml");
    // Only this target's packages. They are usually downloaded already; a plain `cargo build`
    // has not fetched dev-dependencies, so without --offline cargo may fetch those.
    let target = std::env::var("TARGET")?;
    let metadata = |offline: bool| {
        let mut command = std::process::Command::new(&cargo);
        command.args(["metadata", "--format-version", "1"]);
        if offline {
            command.arg("--offline");
        }
        command
            .args(["--filter-platform", &target, "--manifest-path"])
            .arg(&manifest)
            .output()
    };
    let mut output = metadata(true)?;
    if !output.status.success() {
        output = metadata(false)?;
    }
    if !output.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let manifest_path = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|package| package["name"] == "envoy-types")
        .and_then(|package| package["manifest_path"].as_str())
        .ok_or("envoy-types is not among the dependencies")?;
    let root = Path::new(manifest_path)
        .parent()
        .ok_or("envoy-types has no directory")?
        .join("proto");
    if !root.join("data-plane-api").is_dir() {
        return Err(format!("no Envoy protos under {}", root.display()).into());
    }
    Ok(root)
}
