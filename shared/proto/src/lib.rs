//! rsllm-proto (to be written).
