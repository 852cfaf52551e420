//! How much memory a device has free and in use: the per-device batch cap and the per-device
//! memory metrics come from it.
//!
//! - CUDA: the driver's `cuMemGetInfo` (free and total bytes of the device, whoever holds the
//!   rest), asked in the device's primary context, the one the CUDA runtime of burn/cubecl
//!   (cudarc) works in: it is retained, made current on the calling thread for the call, then
//!   popped and released, so the query neither creates a second context nor leaves one current.
//!   The driver is loaded with `dlopen` as in [`crate::device`] (no link-time CUDA dependency).
//! - Other GPU runtimes (wgpu): burn reports what its allocator holds on the device
//!   ([`burn::tensor::Device::memory_pool_usage`]), but no runtime reports the device's total or
//!   free memory, so the budget there is `--memory-budget` (or, without it, the host's).
//! - The CPU: the process's resident memory; the budget is the host's (see
//!   [`crate::serve::admission`]).

use std::ffi::{CStr, c_int, c_uint, c_void};
use std::sync::OnceLock;

use libloading::Library;

use crate::device::DeviceSpec;

/// What a device reports about its memory now; `None` where it reports nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// Bytes in use: on CUDA the device's used memory (total less free, every process), on the
    /// CPU the resident memory of this process, elsewhere what burn's allocator reserved.
    pub in_use: Option<u64>,
    /// Bytes free on the device (CUDA only).
    pub free: Option<u64>,
    /// The device's memory (CUDA only).
    pub total: Option<u64>,
}

/// Asks `device` (opened from `spec`) for its memory; never fails (what it cannot learn stays
/// `None`).
pub fn report(spec: &DeviceSpec, device: &burn::tensor::Device) -> MemoryReport {
    if let DeviceSpec::Cuda(index) = spec {
        match cuda_mem_info(*index) {
            Ok((free, total)) => MemoryReport { in_use: Some(total.saturating_sub(free)), free: Some(free), total: Some(total) },
            Err(e) => {
                tracing::debug!(device = %spec, error = %e, "cuMemGetInfo failed");
                MemoryReport::default()
            }
        }
    } else if *spec == DeviceSpec::Cpu {
        MemoryReport { in_use: crate::serve::admission::process_rss(), ..Default::default() }
    } else {
        MemoryReport { in_use: device.memory_pool_usage().map(|u| u.bytes_reserved), ..Default::default() }
    }
}

type CuInit = unsafe extern "C" fn(flags: c_uint) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(device: *mut c_int, ordinal: c_int) -> c_int;
type CuPrimaryCtxRetain = unsafe extern "C" fn(ctx: *mut *mut c_void, device: c_int) -> c_int;
type CuPrimaryCtxRelease = unsafe extern "C" fn(device: c_int) -> c_int;
type CuCtxPushCurrent = unsafe extern "C" fn(ctx: *mut c_void) -> c_int;
type CuCtxPopCurrent = unsafe extern "C" fn(ctx: *mut *mut c_void) -> c_int;
type CuMemGetInfo = unsafe extern "C" fn(free: *mut usize, total: *mut usize) -> c_int;

/// The driver library, loaded once (never unloaded).
fn driver() -> Result<&'static Library, String> {
    static LIB: OnceLock<Result<Library, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let mut last = String::from("no candidate");
        for name in ["libcuda.so.1", "libcuda.so", "nvcuda.dll"] {
            // SAFETY: loading the NVIDIA driver library runs its initialisers, which have no
            // preconditions.
            match unsafe { Library::new(name) } {
                Ok(lib) => {
                    // SAFETY: `cuInit` has this signature (cuda.h) and may be called again.
                    let code = unsafe { sym::<CuInit>(&lib, c"cuInit")?(0) };
                    return if code == 0 { Ok(lib) } else { Err(format!("cuInit failed: CUresult {code}")) };
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("no CUDA driver: {last}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// # Safety
/// `T` must be the function's real signature.
unsafe fn sym<T: Copy>(lib: &Library, name: &CStr) -> Result<T, String> {
    // SAFETY: forwarded to the caller.
    unsafe { lib.get::<T>(name) }.map(|s| *s).map_err(|e| format!("the CUDA driver has no {}: {e}", name.to_string_lossy()))
}

fn checked(call: &str, code: c_int) -> Result<(), String> {
    if code == 0 { Ok(()) } else { Err(format!("{call} failed: CUresult {code}")) }
}

/// `(free, total)` bytes of CUDA device `index`, from `cuMemGetInfo` in its primary context.
pub fn cuda_mem_info(index: usize) -> Result<(u64, u64), String> {
    let lib = driver()?;
    let ordinal = c_int::try_from(index).map_err(|_| format!("CUDA device index {index} is out of range"))?;
    // SAFETY: signatures from cuda.h (the `_v2` entry points are the current ABI); `cuInit`
    // succeeded when the library was loaded. The primary context is retained before it is made
    // current and released after it is popped, so its reference count is unchanged afterwards.
    unsafe {
        let device_get = sym::<CuDeviceGet>(lib, c"cuDeviceGet")?;
        let retain = sym::<CuPrimaryCtxRetain>(lib, c"cuDevicePrimaryCtxRetain")?;
        let release = sym::<CuPrimaryCtxRelease>(lib, c"cuDevicePrimaryCtxRelease_v2")?;
        let push = sym::<CuCtxPushCurrent>(lib, c"cuCtxPushCurrent_v2")?;
        let pop = sym::<CuCtxPopCurrent>(lib, c"cuCtxPopCurrent_v2")?;
        let mem_get_info = sym::<CuMemGetInfo>(lib, c"cuMemGetInfo_v2")?;
        let mut device: c_int = 0;
        checked("cuDeviceGet", device_get(&mut device, ordinal))?;
        let mut ctx: *mut c_void = std::ptr::null_mut();
        checked("cuDevicePrimaryCtxRetain", retain(&mut ctx, device))?;
        let result = (|| {
            checked("cuCtxPushCurrent", push(ctx))?;
            let (mut free, mut total) = (0usize, 0usize);
            let info = checked("cuMemGetInfo", mem_get_info(&mut free, &mut total));
            let mut popped: *mut c_void = std::ptr::null_mut();
            let popped_ok = checked("cuCtxPopCurrent", pop(&mut popped));
            info?;
            popped_ok?;
            Ok((free as u64, total as u64))
        })();
        let _ = release(device);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_memory_is_an_answer_or_an_error_never_a_panic() {
        match cuda_mem_info(0) {
            Ok((free, total)) => assert!(total > 0 && free <= total, "free {free} of {total}"),
            Err(e) => assert!(!e.is_empty()),
        }
        assert!(cuda_mem_info(usize::MAX).is_err());
    }

    #[cfg(feature = "cpu")]
    #[test]
    fn the_cpu_reports_the_resident_memory() {
        let r = report(&DeviceSpec::Cpu, &burn::tensor::Device::flex());
        assert!(r.in_use.is_some_and(|b| b > 0), "{r:?}");
        assert_eq!((r.free, r.total), (None, None));
    }
}
