//! The one integration-test binary: real processes on loopback (see `src/lib.rs`).
//!
//! Run with `cargo test -p rsllm-integration-tests` (or `cargo test --workspace`); cargo
//! builds the service binary these tests start. Set `RSLLM_IT_EMBEDDING_SERVICE_BIN` to test
//! another build of `embedding-service` (e.g. `target/release/embedding-service`).

mod embedding;
mod fleet;
