//! bf16 automatic mixed precision: f32 weights, matrix products in bf16, on CUDA and on CPUs
//! that multiply bf16 natively.
//!
//! tch wraps libtorch's autocast switch (`tch::autocast`) but not its dtype, and libtorch's
//! CUDA autocast defaults to f16, which needs loss scaling to train; tch's wrapper also goes
//! through libtorch's deprecated `set_enabled`, which prints a warning on every call. bf16 has
//! f32's exponent range and needs no scaling, so we drive autocast through libtorch's own C++
//! entry points in `at::autocast` (exported by libtorch_cpu, which every tch binary links):
//! device type and scalar type are `int8_t`-backed enums, passed as integers.
//!
//! On a CPU, bf16 pays only where the hardware has bf16 arithmetic (AVX-512 BF16; AMX on
//! Intel Sapphire Rapids and later): there the pipeline's LoRA step runs 1.4x faster than in
//! f32, where a CPU with AVX2 only runs bf16 products 6-7x slower than f32 (docs/results.md).
//! [`native_bf16`] says which.

#![allow(unsafe_code)]

use tch::{Device, Kind};

// Values of c10::DeviceType and c10::ScalarType (c10/core/DeviceType.h, ScalarType.h).
const DEVICE_TYPE_CPU: i8 = 0;
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

fn device_type(device: Device) -> i8 {
    if device.is_cuda() {
        DEVICE_TYPE_CUDA
    } else {
        DEVICE_TYPE_CPU
    }
}

/// Whether `device` computes bf16 matrix products natively: any CUDA device, or a CPU with
/// AVX-512 BF16 (which every CPU with AMX has). Elsewhere bf16 autocast would slow training.
pub fn native_bf16(device: Device) -> bool {
    if device.is_cuda() {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The dtype autocast computes its lower-precision operations in for `device`'s type, on this
/// thread.
pub fn autocast_kind(device: Device) -> Option<Kind> {
    // SAFETY: reads libtorch's thread-local autocast state; no pointers are involved.
    match unsafe { at_autocast_get_autocast_dtype(device_type(device)) } {
        SCALAR_TYPE_BFLOAT16 => Some(Kind::BFloat16),
        SCALAR_TYPE_HALF => Some(Kind::Half),
        SCALAR_TYPE_FLOAT => Some(Kind::Float),
        _ => None,
    }
}

/// Whether autocast is on for `device`'s type, on this thread.
pub fn autocast_enabled(device: Device) -> bool {
    // SAFETY: reads libtorch's thread-local autocast state.
    unsafe { at_autocast_is_autocast_enabled(device_type(device)) }
}

/// Autocast in bf16 for one device type on this thread while it lives; dropping it (also
/// when unwinding) restores the earlier switch and dtype, and the outermost one frees the
/// cached bf16 copies of the weights, as `torch.autocast`'s `__exit__` does.
struct Bf16Autocast {
    device_type: i8,
    was_enabled: bool,
    was_dtype: i8,
}

impl Bf16Autocast {
    fn enter(device: Device) -> Bf16Autocast {
        let device_type = device_type(device);
        // SAFETY: reads and writes libtorch's thread-local autocast state with valid enumerators.
        unsafe {
            let guard = Bf16Autocast {
                device_type,
                was_enabled: at_autocast_is_autocast_enabled(device_type),
                was_dtype: at_autocast_get_autocast_dtype(device_type),
            };
            at_autocast_set_autocast_dtype(device_type, SCALAR_TYPE_BFLOAT16);
            at_autocast_set_autocast_enabled(device_type, true);
            at_autocast_increment_nesting();
            guard
        }
    }
}

impl Drop for Bf16Autocast {
    fn drop(&mut self) {
        // SAFETY: as in `enter`; the values restored are the ones read there.
        unsafe {
            if at_autocast_decrement_nesting() == 0 {
                at_autocast_clear_cache();
            }
            at_autocast_set_autocast_enabled(self.device_type, self.was_enabled);
            at_autocast_set_autocast_dtype(self.device_type, self.was_dtype);
        }
    }
}

/// Whether [`bf16_autocast`] turns autocast on for `device` when asked (`enabled`): the device
/// computes bf16 natively ([`native_bf16`]) and, for CUDA, a GPU is present.
pub fn bf16_autocast_applies(device: Device, enabled: bool) -> bool {
    enabled && native_bf16(device) && (!device.is_cuda() || tch::Cuda::is_available())
}

/// Runs `f` under bf16 autocast for `device` where [`bf16_autocast_applies`]: matrix products,
/// attention and the projector's layers in bf16; norms, softmax and losses in f32, as
/// PyTorch's `torch.autocast(device, torch.bfloat16)`. Otherwise runs `f` as it is. Call the
/// backward pass outside, as PyTorch advises: autograd replays the recorded casts.
pub fn bf16_autocast<T>(device: Device, enabled: bool, f: impl FnOnce() -> T) -> T {
    if !bf16_autocast_applies(device, enabled) {
        return f();
    }
    let _autocast = Bf16Autocast::enter(device);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_switches_autocast_to_bf16_and_restores_it() {
        // On a fresh thread: the state is thread-local and starts off, in libtorch's f16 on
        // CUDA and bf16 on the CPU. (The CUDA flags exist without a GPU; they only act on
        // CUDA tensors.)
        std::thread::spawn(|| {
            for (device, default) in [(Device::Cuda(0), Kind::Half), (Device::Cpu, Kind::BFloat16)]
            {
                let other = if device.is_cuda() {
                    Device::Cpu
                } else {
                    Device::Cuda(0)
                };
                assert!(!autocast_enabled(device));
                assert_eq!(autocast_kind(device), Some(default));
                {
                    let _outer = Bf16Autocast::enter(device);
                    assert!(autocast_enabled(device));
                    assert!(!autocast_enabled(other), "one device type only");
                    assert_eq!(autocast_kind(device), Some(Kind::BFloat16));
                    {
                        let _inner = Bf16Autocast::enter(device);
                        assert!(autocast_enabled(device));
                    }
                    assert!(
                        autocast_enabled(device),
                        "the inner guard restores the outer's state"
                    );
                }
                assert!(!autocast_enabled(device));
                assert_eq!(autocast_kind(device), Some(default));
            }
        })
        .join()
        .expect("autocast thread");
    }

    #[test]
    fn on_the_cpu_products_run_in_bf16_exactly_where_it_is_native() {
        std::thread::spawn(|| {
            let x = tch::Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
            let y = bf16_autocast(Device::Cpu, true, || x.matmul(&x));
            let expected = if native_bf16(Device::Cpu) {
                Kind::BFloat16
            } else {
                Kind::Float
            };
            assert_eq!(y.kind(), expected);
            assert_eq!(y.double_value(&[0, 0]), 2.0);
            let off = bf16_autocast(Device::Cpu, false, || x.matmul(&x));
            assert_eq!(off.kind(), Kind::Float);
            assert!(!autocast_enabled(Device::Cpu), "restored after the closure");
        })
        .join()
        .expect("autocast thread");
    }
}
