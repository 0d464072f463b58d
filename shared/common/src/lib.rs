//! rsllm-common (to be written).
