//! Linker arguments that every crate producing tch binaries (bins, tests, benches) needs.
//!
//! Call [`emit`] from the crate's `build.rs`. `cargo:rustc-link-arg` only reaches the targets of
//! the package whose build script prints it, which is why each such crate has its own three-line
//! `build.rs` instead of one in `torch-sys`.
//!
//! Two things are emitted:
//! - an rpath to `$LIBTORCH/lib`, so binaries run from a fresh shell without `LD_LIBRARY_PATH`;
//! - `--no-as-needed -ltorch_cuda` when the libtorch has CUDA. Nothing in our code references a
//!   symbol of `libtorch_cuda.so`, so with the default `--as-needed` the linker would drop it and
//!   `tch::Cuda::is_available()` would silently say false on a GPU machine. The PyPI CUDA build
//!   still runs on a CPU-only machine: the CUDA libraries load, find no device, and tch uses CPU.
//!
//! `LIBTORCH` comes from `.cargo/config.toml`, written by `scripts/setup.sh`.

use std::path::PathBuf;

/// Prints the `cargo:` lines; a missing `LIBTORCH` only warns, since `torch-sys` fails first
/// with its own, clearer message.
pub fn emit() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        println!(
            "cargo:warning=LIBTORCH is not set: run scripts/setup.sh once (it writes .cargo/config.toml)"
        );
        return;
    };
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
