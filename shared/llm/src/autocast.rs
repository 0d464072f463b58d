//! bf16 automatic mixed precision on CUDA: f32 weights, matrix products in bf16.
//!
//! tch wraps libtorch's autocast switch (`tch::autocast`) but not its dtype, and libtorch's
//! CUDA autocast defaults to f16, which needs loss scaling to train; tch's wrapper also goes
//! through libtorch's deprecated `set_enabled`, which prints a warning on every call. bf16 has
//! f32's exponent range and needs no scaling, so we drive autocast through libtorch's own C++
//! entry points in `at::autocast` (exported by libtorch_cpu, which every tch binary links):
//! device type and scalar type are `int8_t`-backed enums, passed as integers.

#![allow(unsafe_code)]

use tch::Kind;

// Values of c10::DeviceType and c10::ScalarType (c10/core/DeviceType.h, ScalarType.h).
const DEVICE_TYPE_CUDA: i8 = 1;
const SCALAR_TYPE_HALF: i8 = 5;
const SCALAR_TYPE_FLOAT: i8 = 6;
const SCALAR_TYPE_BFLOAT16: i8 = 15;

unsafe extern "C" {
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_autocast_set_autocast_dtype(device_type: i8, scalar_type: i8);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn at_autocast_get_autocast_dtype(device_type: i8) -> i8;
    #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
    fn at_autocast_set_autocast_enabled(device_type: i8, enabled: bool);
    #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
    fn at_autocast_is_autocast_enabled(device_type: i8) -> bool;
    #[link_name = "_ZN2at8autocast17increment_nestingEv"]
    fn at_autocast_increment_nesting() -> i32;
    #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
    fn at_autocast_decrement_nesting() -> i32;
    #[link_name = "_ZN2at8autocast11clear_cacheEv"]
    fn at_autocast_clear_cache();
}

/// The dtype CUDA autocast computes its lower-precision operations in, on this thread.
pub fn cuda_autocast_kind() -> Option<Kind> {
    // SAFETY: reads libtorch's thread-local autocast state; no pointers are involved.
    match unsafe { at_autocast_get_autocast_dtype(DEVICE_TYPE_CUDA) } {
        SCALAR_TYPE_BFLOAT16 => Some(Kind::BFloat16),
        SCALAR_TYPE_HALF => Some(Kind::Half),
        SCALAR_TYPE_FLOAT => Some(Kind::Float),
        _ => None,
    }
}

/// Whether CUDA autocast is on, on this thread.
pub fn cuda_autocast_enabled() -> bool {
    // SAFETY: reads libtorch's thread-local autocast state.
    unsafe { at_autocast_is_autocast_enabled(DEVICE_TYPE_CUDA) }
}

/// CUDA autocast in bf16 on this thread while it lives; dropping it (also when unwinding)
/// restores the earlier switch and dtype, and the outermost one frees the cached bf16 copies
/// of the weights, as `torch.autocast`'s `__exit__` does.
struct CudaBf16Autocast {
    was_enabled: bool,
    was_dtype: i8,
}

impl CudaBf16Autocast {
    fn enter() -> CudaBf16Autocast {
        // SAFETY: reads and writes libtorch's thread-local autocast state with valid enumerators.
        unsafe {
            let guard = CudaBf16Autocast {
                was_enabled: at_autocast_is_autocast_enabled(DEVICE_TYPE_CUDA),
                was_dtype: at_autocast_get_autocast_dtype(DEVICE_TYPE_CUDA),
            };
            at_autocast_set_autocast_dtype(DEVICE_TYPE_CUDA, SCALAR_TYPE_BFLOAT16);
            at_autocast_set_autocast_enabled(DEVICE_TYPE_CUDA, true);
            at_autocast_increment_nesting();
            guard
        }
    }
}

impl Drop for CudaBf16Autocast {
    fn drop(&mut self) {
        // SAFETY: as in `enter`; the values restored are the ones read there.
        unsafe {
            if at_autocast_decrement_nesting() == 0 {
                at_autocast_clear_cache();
            }
            at_autocast_set_autocast_enabled(DEVICE_TYPE_CUDA, self.was_enabled);
            at_autocast_set_autocast_dtype(DEVICE_TYPE_CUDA, self.was_dtype);
        }
    }
}

/// Runs `f` under CUDA autocast in bf16 when `enabled` and CUDA is present (matrix products,
/// attention and the projector's layers in bf16; norms, softmax and losses in f32, as
/// PyTorch's `torch.autocast("cuda", torch.bfloat16)`); otherwise runs `f` as it is. Call the
/// backward pass outside, as PyTorch advises: autograd replays the recorded casts.
pub fn bf16_autocast<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    if !enabled || !tch::Cuda::is_available() {
        return f();
    }
    let _autocast = CudaBf16Autocast::enter();
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_switches_cuda_autocast_to_bf16_and_restores_it() {
        // On a fresh thread: the state is thread-local and starts off, in libtorch's f16.
        // (The flags exist without a GPU; they only act on CUDA tensors.)
        std::thread::spawn(|| {
            assert!(!cuda_autocast_enabled());
            assert_eq!(cuda_autocast_kind(), Some(Kind::Half));
            {
                let _outer = CudaBf16Autocast::enter();
                assert!(cuda_autocast_enabled());
                assert_eq!(cuda_autocast_kind(), Some(Kind::BFloat16));
                {
                    let _inner = CudaBf16Autocast::enter();
                    assert!(cuda_autocast_enabled());
                }
                assert!(
                    cuda_autocast_enabled(),
                    "the inner guard restores the outer's state"
                );
            }
            assert!(!cuda_autocast_enabled());
            assert_eq!(cuda_autocast_kind(), Some(Kind::Half));
        })
        .join()
        .expect("autocast thread");
    }

    #[test]
    fn without_cuda_the_closure_runs_unchanged() {
        let x = tch::Tensor::ones([2, 2], (Kind::Float, tch::Device::Cpu));
        let y = bf16_autocast(true, || x.matmul(&x));
        assert_eq!(y.kind(), Kind::Float);
        assert_eq!(y.double_value(&[0, 0]), 2.0);
    }
}
