//! Generates the gRPC code of the management API from the committed `.proto` files, with a
//! file descriptor set for the reflection service.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/dpucp/v1/common.proto",
        "proto/dpucp/v1/vpc.proto",
        "proto/dpucp/v1/route.proto",
        "proto/dpucp/v1/nat.proto",
        "proto/dpucp/v1/meter.proto",
        "proto/dpucp/v1/status.proto",
        "proto/dpucp/v1/dpu.proto",
        "proto/dpucp/v1/node.proto",
        "proto/dpucp/v1/image.proto",
    ];
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("dpucp_v1_descriptor.bin"))
        // dpuctl --json prints the API's own messages.
        .type_attribute(".dpucp.v1", "#[derive(serde::Serialize)]")
        .type_attribute(".dpucp.v1", "#[serde(rename_all = \"snake_case\")]")
        .compile_protos(&protos, &["proto"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
