//! rsllm-itemvec (to be written).
