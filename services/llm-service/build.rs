fn main() {
    rsllm_torch_link::emit();
}
