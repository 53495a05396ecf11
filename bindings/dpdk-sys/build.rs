//! Build script for `dpdk-sys`.
//!
//! 1. Finds DPDK (>= 22.11) through pkg-config and emits its link flags.
//! 2. Runs bindgen over `csrc/wrapper.h`, wrapping DPDK's `static inline`
//!    fast-path functions (`rte_eth_rx_burst`, `rte_pktmbuf_alloc`, ...) into
//!    real C symbols (`wrap_static_fns`).
//! 3. Compiles those generated wrappers plus `csrc/shim.c` with DPDK's cflags.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const MIN_DPDK: &str = "22.11";

fn main() {
    println!("cargo:rerun-if-changed=csrc/wrapper.h");
    println!("cargo:rerun-if-changed=csrc/shim.c");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    let lib = match pkg_config::Config::new()
        .atleast_version(MIN_DPDK)
        .cargo_metadata(true)
        .probe("libdpdk")
    {
        Ok(lib) => lib,
        Err(e) => fail(&format!(
            "DPDK >= {MIN_DPDK} not found through pkg-config (`pkg-config --modversion libdpdk`).\n\
             Install the DPDK development package (Debian: `apt-get install libdpdk-dev`) \
             or point PKG_CONFIG_PATH at a DPDK build's pkgconfig directory.\n\
             pkg-config said: {e}"
        )),
    };
    println!("cargo:version={}", lib.version);
    // `libdpdk.pc` lists the core libraries only; the net_ring PMD (rte_eth_from_rings) and the
    // vdev bus (rte_vdev_uninit) are driver libraries. In Debian's shared build they live in
    // the PMD directory EAL dlopens at init, with symlinks in the library directory, so linking
    // them loads the same file EAL would (no double registration).
    for driver in ["rte_net_ring", "rte_bus_vdev"] {
        println!("cargo:rustc-link-lib=dylib={driver}");
    }

    // The pkg-config crate only keeps -I/-D from --cflags; DPDK also needs
    // `-include rte_config.h` and `-march=...`, so take the raw flags.
    let cflags = raw_cflags();

    let Some(out) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        fail("OUT_DIR not set (build.rs must run under cargo)");
    };
    let static_fns = out.join("static_fns");
    // Absolute path: bindgen's generated static_fns.c `#include`s it verbatim.
    let Some(manifest) = env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from) else {
        fail("CARGO_MANIFEST_DIR not set (build.rs must run under cargo)");
    };
    let wrapper = manifest.join("csrc").join("wrapper.h");

    let bindings = bindgen::Builder::default()
        .header(wrapper.to_string_lossy())
        .clang_args(&cflags)
        .allowlist_function("rte_.*|dpdk_sys_.*")
        .allowlist_type("rte_.*")
        .allowlist_var("rte_.*")
        .allowlist_var(
            "RTE_(ETH|MBUF|PKTMBUF|FLOW|MEMPOOL|MTR|LPM|FIB|MAX|ETHER)_.*|SOCKET_ID_ANY|RTE_PTYPE_.*",
        )
        // The errno values rte_flow / ethdev report (negated) and via rte_errno.
        .allowlist_var("E(NOSYS|NOTSUP|OPNOTSUPP|INVAL|NOSPC|EXIST|NOMEM|BUSY|IO|NODEV|NOENT|AGAIN|PERM|ALREADY)")
        // SSE/AVX copy helpers take vector types bindgen cannot express.
        .blocklist_function("rte_mov.*|rte_memcpy.*|rte_lpm_lookupx4")
        // Packed structs whose layout bindgen gets wrong (packed + aligned
        // members): keep them as opaque byte blobs.
        .opaque_type("rte_l2tpv2_combined_msg_hdr")
        .opaque_type("rte_gtp_psc_generic_hdr")
        // DPDK 24.11 aligns rte_ether_addr (2 bytes), which Rust cannot put in the packed ARP
        // headers; nothing here reads ARP headers through DPDK's structs.
        .opaque_type("rte_arp_ipv4")
        .opaque_type("rte_arp_hdr")
        .prepend_enum_name(false)
        .derive_default(true)
        .derive_debug(true)
        .impl_debug(false)
        .wrap_static_fns(true)
        .wrap_static_fns_path(&static_fns)
        .generate_comments(true)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .unwrap_or_else(|e| fail(&format!("bindgen failed on csrc/wrapper.h: {e}")));
    // DPDK 24.07+ replaced rte_mbuf's zero-length marker fields with anonymous unions, which
    // moves the fast-path fields one or two levels down in the generated struct; `mbuf`
    // accessors in lib.rs pick the right path.
    let text = bindings.to_string();
    println!("cargo::rustc-check-cfg=cfg(dpdk_mbuf_unions)");
    if text.contains("pub rearm_data: [u64; 1usize]") {
        println!("cargo:rustc-cfg=dpdk_mbuf_unions");
    }
    // DPDK 24.11 wraps IPv6 addresses in `struct rte_ipv6_addr`.
    println!("cargo::rustc-check-cfg=cfg(dpdk_ipv6_addr_struct)");
    if text.contains("pub struct rte_ipv6_addr {") {
        println!("cargo:rustc-cfg=dpdk_ipv6_addr_struct");
    }
    if let Err(e) = bindings.write_to_file(out.join("bindings.rs")) {
        fail(&format!("cannot write bindings.rs: {e}"));
    }

    let mut build = cc::Build::new();
    build
        .file(static_fns.with_extension("c"))
        .file(manifest.join("csrc").join("shim.c"))
        .include(manifest.join("csrc"))
        .warnings(false);
    for flag in &cflags {
        build.flag(flag);
    }
    build.compile("dpdk_sys_shim");
}

fn raw_cflags() -> Vec<String> {
    let pkg_config = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_owned());
    let output = Command::new(&pkg_config)
        .args(["--cflags", "libdpdk"])
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run {pkg_config}: {e}")));
    if !output.status.success() {
        fail(&format!(
            "`{pkg_config} --cflags libdpdk` failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // `-include rte_config.h` is two words: keep them as separate args.
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Print a clear error for the person building and stop the build.
fn fail(msg: &str) -> ! {
    eprintln!("dpdk-sys: {msg}");
    println!(
        "cargo:warning=dpdk-sys: {}",
        msg.lines().next().unwrap_or(msg)
    );
    std::process::exit(1);
}
