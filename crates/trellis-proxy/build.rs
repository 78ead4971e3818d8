//! Link-time settings of the sidecar binary.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if linux_gnu {
        // Relative relocations packed (DT_RELR; glibc 2.36+, as in the Debian 12 runtime
        // images): the position-independent binary's ~400 KB relocation table, read at
        // every start and resident from then on, shrinks to a few KB. ASLR stays.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
