//! Choosing the compute device.
//!
//! burn 0.22 has one device type, [`burn::tensor::Device`]; the backend is picked at run time
//! from the value: [`Device::flex()`](burn::tensor::Device) for the CPU backend (burn-flex,
//! feature `cpu`) and `Device::cuda(index)` for CUDA (feature `cuda`). Which constructors exist
//! depends on the features this crate was built with, so [`open`] reports a missing feature as an
//! error instead of failing to compile.
//!
//! `Device::wgpu(..)` (feature `wgpu`) runs on whatever graphics API wgpu settles on: Vulkan, Metal
//! or DX12, and OpenGL where none of those has an adapter. The OpenGL path cannot run f16 and is
//! not a supported target, so [`open`] refuses it (see [`WgpuApi`]): on Linux without a GPU, Mesa's
//! software Vulkan driver (lavapipe, Debian package `mesa-vulkan-drivers`) is a Vulkan device.
//!
//! A CUDA device cannot be probed through burn: without an NVIDIA driver, the first operation on
//! a CUDA device panics. [`cuda_device_count`] therefore asks the driver directly (`dlopen` of
//! `libcuda.so.1`, `cuInit`, `cuDeviceGetCount`) and turns every failure into a
//! [`DeviceError`]. It is compiled on every build, with or without the `cuda` feature, so a
//! server can always report what it sees.
//!
//! # Run-time libraries for CUDA
//!
//! A `cuda` build links no CUDA library; it loads them when first used:
//!
//! - the driver, `libcuda.so.1` (installed with the NVIDIA driver, normally in the system library
//!   path);
//! - NVRTC, which compiles the generated CUDA C++ kernels (this crate builds cubecl-cuda with its
//!   `cpp` feature; the LLVM/PTX path is not built in, see `crates/cubecl-llvm`). See [`open`] for
//!   where it is looked for.

use std::ffi::{CStr, c_char, c_int, c_uint};
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use libloading::Library;

/// Why a device could not be parsed, found or opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// A device spec that is not one of the accepted forms.
    #[error(
        "invalid device {input:?}: expected `cpu`, `cuda` (the first CUDA device), `cuda:N` \
         (CUDA device index N, e.g. `cuda:1`), `wgpu` (the default wgpu adapter: Vulkan, Metal or \
         DX12) or `wgpu:N` (wgpu adapter index N)"
    )]
    InvalidSpec {
        /// What was given.
        input: String,
    },

    /// This binary was built without the backend the spec asks for.
    #[error(
        "device {spec} is not available: this binary was built without the `{feature}` feature \
         (rebuild with `--features {feature}`)"
    )]
    FeatureMissing {
        /// The requested device, as written by [`DeviceSpec`]'s `Display`.
        spec: String,
        /// The cargo feature that enables it.
        feature: &'static str,
    },

    /// The CUDA driver library could not be loaded.
    #[error(
        "no CUDA driver: could not load {tried}: {reason}. Install the NVIDIA driver (it provides \
         libcuda.so.1); do not put a CUDA toolkit `stubs/` folder on LD_LIBRARY_PATH"
    )]
    NoDriver {
        /// The library names that were tried.
        tried: String,
        /// The loader's error for the last one.
        reason: String,
    },

    /// A CUDA driver call failed.
    #[error("CUDA driver call {call} failed: {name} ({code}): {message}{hint}")]
    Driver {
        /// The driver function that failed.
        call: &'static str,
        /// Its `CUresult`.
        code: i32,
        /// `cuGetErrorName` of the code, when available.
        name: String,
        /// `cuGetErrorString` of the code, when available.
        message: String,
        /// Advice for the common causes, possibly empty.
        hint: &'static str,
    },

    /// The driver loaded but reports no CUDA device.
    #[error("the CUDA driver reports no CUDA device")]
    NoDevice,

    /// wgpu found no adapter on Vulkan, Metal or DX12 (only OpenGL, or nothing).
    #[error(
        "wgpu found no Vulkan, Metal or DX12 adapter for {spec} (it settled on {api}; OpenGL \
         cannot run this service's kernels in f16). Install a Vulkan driver: the GPU vendor's, or \
         on Linux without a GPU Mesa's software driver lavapipe (Debian/Ubuntu package \
         `mesa-vulkan-drivers`)"
    )]
    WgpuNoVulkan {
        /// The requested device.
        spec: String,
        /// The graphics API wgpu settled on.
        api: String,
    },

    /// The requested wgpu adapter index is past the last adapter.
    #[error("wgpu adapter {index} does not exist: wgpu lists {count} adapter(s)")]
    NoSuchWgpuAdapter {
        /// The requested index.
        index: usize,
        /// How many adapters wgpu lists.
        count: usize,
    },

    /// The requested index is past the last device.
    #[error("CUDA device {index} does not exist: the driver reports {count} device(s) (cuda:0 .. cuda:{last})", last = count.saturating_sub(1))]
    NoSuchDevice {
        /// The requested index.
        index: usize,
        /// How many devices there are.
        count: usize,
    },

    /// The NVRTC library, which compiles the CUDA kernels, could not be loaded.
    #[error(
        "CUDA NVRTC library not found (needed to compile the CUDA C++ kernels): tried {tried}. \
         Find it with `find /usr /opt -name 'libnvrtc.so*' -not -path '*/stubs/*'` and add its \
         folder to LD_LIBRARY_PATH (never a `stubs/` folder)"
    )]
    NoNvrtc {
        /// The library names that were tried.
        tried: String,
    },
}

/// Which device to run on, as given on the command line or in a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU backend (burn-flex).
    Cpu,
    /// The CUDA device with this index.
    Cuda(usize),
    /// A wgpu adapter: `None` for the default one (`wgpu`), `Some(n)` for the n-th one wgpu
    /// lists (`wgpu:N`).
    Wgpu(Option<usize>),
}

impl DeviceSpec {
    /// Whether this is a GPU (anything but the CPU backend).
    pub fn is_gpu(&self) -> bool {
        !matches!(self, DeviceSpec::Cpu)
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    /// Accepts `cpu`, `cuda` (same as `cuda:0`), `cuda:N`, `wgpu` and `wgpu:N`, ignoring case and
    /// surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || DeviceError::InvalidSpec { input: s.to_string() };
        let lower = s.trim().to_ascii_lowercase();
        let index = |digits: &str| -> Result<usize, DeviceError> {
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            digits.parse().map_err(|_| invalid())
        };
        match lower.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            "wgpu" => Ok(DeviceSpec::Wgpu(None)),
            other => {
                if let Some(digits) = other.strip_prefix("cuda:") {
                    index(digits).map(DeviceSpec::Cuda)
                } else if let Some(digits) = other.strip_prefix("wgpu:") {
                    index(digits).map(|i| DeviceSpec::Wgpu(Some(i)))
                } else {
                    Err(invalid())
                }
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(index) => write!(f, "cuda:{index}"),
            DeviceSpec::Wgpu(None) => f.write_str("wgpu"),
            DeviceSpec::Wgpu(Some(index)) => write!(f, "wgpu:{index}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA driver probe
// ---------------------------------------------------------------------------------------------

/// Names tried for the driver library, in order.
#[cfg(windows)]
const DRIVER_LIBRARIES: &[&str] = &["nvcuda.dll"];
#[cfg(not(windows))]
const DRIVER_LIBRARIES: &[&str] = &["libcuda.so.1", "libcuda.so"];

const CUDA_SUCCESS: c_int = 0;
const CUDA_ERROR_STUB_LIBRARY: c_int = 34;
const CUDA_ERROR_INSUFFICIENT_DRIVER: c_int = 35;
const CUDA_ERROR_NO_DEVICE: c_int = 100;

type CuInit = unsafe extern "C" fn(flags: c_uint) -> c_int;
type CuDeviceGetCount = unsafe extern "C" fn(count: *mut c_int) -> c_int;
type CuDriverGetVersion = unsafe extern "C" fn(version: *mut c_int) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(device: *mut c_int, ordinal: c_int) -> c_int;
type CuDeviceGetName = unsafe extern "C" fn(name: *mut c_char, len: c_int, device: c_int) -> c_int;
type CuGetErrorText = unsafe extern "C" fn(code: c_int, text: *mut *const c_char) -> c_int;

/// The driver, loaded and initialised once for the life of the process (never unloaded: the
/// CUDA runtime keeps using it).
struct Driver {
    lib: Library,
    device_count: usize,
    /// `cuDriverGetVersion`: the newest CUDA version the driver supports, e.g. 12080 for 12.8.
    version: Option<i32>,
}

fn driver() -> Result<&'static Driver, DeviceError> {
    static DRIVER: OnceLock<Result<Driver, DeviceError>> = OnceLock::new();
    DRIVER.get_or_init(load_driver).as_ref().map_err(Clone::clone)
}

fn load_driver() -> Result<Driver, DeviceError> {
    let mut last_error = String::from("no candidate library name");
    let mut lib = None;
    for name in DRIVER_LIBRARIES {
        // SAFETY: loading the NVIDIA driver library runs its initialisers, which have no
        // preconditions.
        match unsafe { Library::new(*name) } {
            Ok(loaded) => {
                lib = Some(loaded);
                break;
            }
            Err(err) => last_error = loader_error(&err),
        }
    }
    let Some(lib) = lib else {
        return Err(DeviceError::NoDriver { tried: DRIVER_LIBRARIES.join(", "), reason: last_error });
    };

    // SAFETY: the signatures match the CUDA driver API (cuda.h); `cuInit` must come first.
    unsafe {
        let cu_init = symbol::<CuInit>(&lib, c"cuInit")?;
        check(&lib, "cuInit", cu_init(0))?;

        let mut version: c_int = 0;
        let version = match symbol::<CuDriverGetVersion>(&lib, c"cuDriverGetVersion") {
            Ok(get) if get(&mut version) == CUDA_SUCCESS => Some(version),
            _ => None,
        };

        let get_count = symbol::<CuDeviceGetCount>(&lib, c"cuDeviceGetCount")?;
        let mut count: c_int = 0;
        check(&lib, "cuDeviceGetCount", get_count(&mut count))?;

        Ok(Driver { lib, device_count: usize::try_from(count).unwrap_or(0), version })
    }
}

/// A `libloading` error with its cause (its `Display` alone is just "dlopen failed").
fn loader_error(err: &libloading::Error) -> String {
    match std::error::Error::source(err) {
        Some(source) => format!("{err}: {source}"),
        None => err.to_string(),
    }
}

/// Looks up a driver function.
///
/// # Safety
/// `T` must be the function's real signature.
unsafe fn symbol<T: Copy>(lib: &Library, name: &CStr) -> Result<T, DeviceError> {
    // SAFETY: forwarded to the caller.
    unsafe { lib.get::<T>(name) }.map(|symbol| *symbol).map_err(|err| DeviceError::NoDriver {
        tried: DRIVER_LIBRARIES.join(", "),
        reason: format!("the library has no {}: {}", name.to_string_lossy(), loader_error(&err)),
    })
}

/// Turns a `CUresult` into a [`DeviceError`], naming the code through the driver.
fn check(lib: &Library, call: &'static str, code: c_int) -> Result<(), DeviceError> {
    match code {
        CUDA_SUCCESS => Ok(()),
        CUDA_ERROR_NO_DEVICE => Err(DeviceError::NoDevice),
        _ => {
            let text = |function: &CStr| -> Option<String> {
                // SAFETY: `cuGetErrorName` / `cuGetErrorString` have this signature, need no
                // `cuInit`, and hand back a static NUL-terminated string or an error.
                unsafe {
                    let get = symbol::<CuGetErrorText>(lib, function).ok()?;
                    let mut ptr: *const c_char = std::ptr::null();
                    if get(code, &mut ptr) != CUDA_SUCCESS || ptr.is_null() {
                        return None;
                    }
                    Some(CStr::from_ptr(ptr).to_string_lossy().into_owned())
                }
            };
            let hint = match code {
                CUDA_ERROR_STUB_LIBRARY => {
                    ". The loaded libcuda is the CUDA toolkit's link stub, not the driver: remove \
                     the toolkit's `stubs/` folder from LD_LIBRARY_PATH"
                }
                CUDA_ERROR_INSUFFICIENT_DRIVER => ". The NVIDIA driver is older than the CUDA runtime in use; update the driver",
                _ => "",
            };
            Err(DeviceError::Driver {
                call,
                code,
                name: text(c"cuGetErrorName").unwrap_or_else(|| "CUresult".to_string()),
                message: text(c"cuGetErrorString").unwrap_or_else(|| "unknown error".to_string()),
                hint,
            })
        }
    }
}

/// The name the driver gives device `index`, if it answers.
fn cuda_device_name(driver: &Driver, index: usize) -> Option<String> {
    let ordinal = c_int::try_from(index).ok()?;
    // SAFETY: signatures from cuda.h; `cuInit` succeeded when `driver` was built; the buffer
    // outlives the call and its length is passed.
    unsafe {
        let device_get = symbol::<CuDeviceGet>(&driver.lib, c"cuDeviceGet").ok()?;
        let get_name = symbol::<CuDeviceGetName>(&driver.lib, c"cuDeviceGetName").ok()?;
        let mut device: c_int = 0;
        if device_get(&mut device, ordinal) != CUDA_SUCCESS {
            return None;
        }
        let mut buffer = [0 as c_char; 256];
        if get_name(buffer.as_mut_ptr(), buffer.len() as c_int, device) != CUDA_SUCCESS {
            return None;
        }
        buffer[buffer.len() - 1] = 0;
        Some(CStr::from_ptr(buffer.as_ptr()).to_string_lossy().into_owned())
    }
}

/// How many CUDA devices the NVIDIA driver reports.
///
/// Loads the driver (`libcuda.so.1`, then `libcuda.so`), calls `cuInit(0)` and
/// `cuDeviceGetCount`. Never panics: no driver, a stub library, a driver error and zero
/// devices are all an `Err` saying which. The answer is computed once per process.
///
/// Works in every build, with or without the `cuda` feature.
pub fn cuda_device_count() -> Result<usize, DeviceError> {
    let driver = driver()?;
    match driver.device_count {
        0 => Err(DeviceError::NoDevice),
        count => Ok(count),
    }
}

// ---------------------------------------------------------------------------------------------
// NVRTC
// ---------------------------------------------------------------------------------------------

/// The names cudarc 0.19 tries for NVRTC on Linux, in its order
/// (`cudarc::get_lib_name_candidates("nvrtc")`, with `{major}` the CUDA version cudarc was built
/// for; the Windows-style `nvrtc64_*` names it also tries never exist on Linux).
#[cfg(not(windows))]
const NVRTC_LIBRARIES: &[&str] =
    &["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11", "libnvrtc.so.10", "libnvrtc.so.9", "libnvrtc.so.1"];
#[cfg(windows)]
const NVRTC_LIBRARIES: &[&str] = &["nvrtc.dll", "nvrtc64.dll", "nvrtc64_130_0.dll", "nvrtc64_120_0.dll", "nvrtc64_112_0.dll"];

/// Checks that NVRTC can be loaded the way cudarc will load it; the handle stays loaded.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn check_nvrtc() -> Result<&'static str, DeviceError> {
    static NVRTC: OnceLock<Result<(Library, &'static str), DeviceError>> = OnceLock::new();
    NVRTC
        .get_or_init(|| {
            for name in NVRTC_LIBRARIES {
                // SAFETY: loading NVRTC runs its initialisers, which have no preconditions.
                if let Ok(lib) = unsafe { Library::new(*name) } {
                    return Ok((lib, *name));
                }
            }
            Err(DeviceError::NoNvrtc { tried: NVRTC_LIBRARIES.join(", ") })
        })
        .as_ref()
        .map(|(_, name)| *name)
        .map_err(Clone::clone)
}

// ---------------------------------------------------------------------------------------------
// Opening and describing
// ---------------------------------------------------------------------------------------------

/// Opens the device `spec` names.
///
/// - [`DeviceSpec::Cpu`]: `Device::flex()`, the burn-flex CPU backend. Needs the `cpu` feature.
/// - [`DeviceSpec::Cuda`]`(i)`: `Device::cuda(i)`. Needs the `cuda` feature. Checks first, so
///   that a missing driver or device is an `Err` rather than a panic on the first tensor
///   operation: [`cuda_device_count`] must be greater than `i`, and NVRTC must load.
///
/// # Where NVRTC is looked for
///
/// Kernels are generated as CUDA C++ and compiled at run time by NVRTC. cubecl-cuda calls it
/// through cudarc 0.19.10 (features `fallback-dynamic-loading`,
/// `cuda-version-from-build-system`, `fallback-latest`), which `dlopen`s it on the first kernel
/// compilation, trying in order `libnvrtc.so`, `libnvrtc64.so`, `libnvrtc64_{M}.so`, … (Windows
/// spellings), then `libnvrtc.so.{M}`, `libnvrtc.so.12`, `.11`, `.10`, `.9`, `.1`, and panics
/// if none loads. `{M}` is the CUDA major version chosen when cudarc was *built*: the
/// `CUDARC_CUDA_VERSION` build-time environment variable (e.g. `12080`), else `nvcc --version`,
/// else the newest it knows (13.4, the case on machines without nvcc). No path is configured:
/// the names go through the dynamic loader, so the library's folder must be in the loader's
/// search path (`LD_LIBRARY_PATH`, `ldconfig`'s cache, or the binary's rpath). cudarc reads
/// `CUDA_HOME`/`CUDA_PATH`/`CUDA_ROOT`/`CUDA_TOOLKIT_ROOT_DIR` only at build time, and only for
/// linking, which this build does not do. The driver is found the same way (`libcuda.so`,
/// …, `libcuda.so.1`).
///
/// On a GPU machine, find NVRTC with
/// `find /usr /opt -name 'libnvrtc.so*' -not -path '*/stubs/*'` (typically
/// `/usr/local/cuda/lib64`, `/usr/local/cuda-12.x/targets/x86_64-linux/lib`, or a pip
/// `nvidia/cuda_nvrtc/lib` folder) and put that folder on `LD_LIBRARY_PATH`. Never put a CUDA
/// toolkit `stubs/` folder there: its `libcuda.so` is a link-time stub that makes every driver
/// call fail (`CUDA_ERROR_STUB_LIBRARY`).
pub fn open(spec: &DeviceSpec) -> Result<burn::tensor::Device, DeviceError> {
    match spec {
        DeviceSpec::Cpu => open_cpu(spec),
        DeviceSpec::Cuda(index) => {
            let count = cuda_device_count()?;
            if *index >= count {
                return Err(DeviceError::NoSuchDevice { index: *index, count });
            }
            open_cuda(spec, *index)
        }
        DeviceSpec::Wgpu(index) => open_wgpu(spec, *index),
    }
}

/// The graphics API wgpu runs its devices on in this process, checked to be one that can run the
/// service: wgpu's automatic choice takes the first of Vulkan, DX12 and OpenGL (Metal on macOS)
/// that has an adapter, so a machine without a Vulkan driver silently lands on OpenGL, where f16
/// fails; and with no adapter at all the first tensor operation panics. Both are an error here,
/// checked by asking that API for its adapters before any device is opened.
#[cfg(feature = "wgpu")]
pub fn wgpu_api(spec: &DeviceSpec) -> Result<String, DeviceError> {
    use cubecl_wgpu::GraphicsApi;
    use cubecl_wgpu::wgpu::{Backend, Backends, Instance, InstanceDescriptor};
    static CHECKED: OnceLock<Result<String, String>> = OnceLock::new();
    let checked = CHECKED.get_or_init(|| {
        let api = cubecl_wgpu::AutoGraphicsApi::backend();
        let name = format!("{api:?}");
        if !matches!(api, Backend::Vulkan | Backend::Metal | Backend::Dx12) {
            return Err(name);
        }
        let instance =
            Instance::new(InstanceDescriptor { backends: Backends::from(api), ..InstanceDescriptor::new_without_display_handle() });
        // On native targets the adapter list is ready at once; poll it once.
        let mut future = std::pin::pin!(instance.enumerate_adapters(Backends::from(api)));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(adapters) if !adapters.is_empty() => Ok(name),
            _ => Err(format!("{name} without any adapter")),
        }
    });
    checked.clone().map_err(|api| DeviceError::WgpuNoVulkan { spec: spec.to_string(), api })
}

#[cfg(feature = "wgpu")]
fn open_wgpu(spec: &DeviceSpec, index: Option<usize>) -> Result<burn::tensor::Device, DeviceError> {
    use burn::tensor::{Device, DeviceKind, DeviceType};
    wgpu_api(spec)?;
    match index {
        None => Ok(Device::wgpu(DeviceKind::DefaultDevice)),
        Some(index) => {
            let all: Vec<Device> = Device::enumerate(DeviceType::Wgpu).into_iter().collect();
            let count = all.len();
            all.into_iter().nth(index).ok_or(DeviceError::NoSuchWgpuAdapter { index, count })
        }
    }
}

#[cfg(not(feature = "wgpu"))]
fn open_wgpu(spec: &DeviceSpec, _index: Option<usize>) -> Result<burn::tensor::Device, DeviceError> {
    Err(DeviceError::FeatureMissing { spec: spec.to_string(), feature: "wgpu" })
}

/// `spec` described for logs: the adapter's name and the graphics API.
#[cfg(feature = "wgpu")]
fn describe_wgpu(spec: &DeviceSpec) -> String {
    let api = match wgpu_api(spec) {
        Ok(api) => api,
        Err(err) => return format!("{spec} (unavailable: {err})"),
    };
    match open(spec) {
        Ok(device) => {
            let name = device.identity().map_or_else(|| "unnamed adapter".to_string(), |i| i.name);
            format!("{spec} ({name}; wgpu on {api})")
        }
        Err(err) => format!("{spec} (unavailable: {err})"),
    }
}

#[cfg(not(feature = "wgpu"))]
fn describe_wgpu(spec: &DeviceSpec) -> String {
    format!("{spec} (unavailable: built without the `wgpu` feature)")
}

#[cfg(feature = "cpu")]
fn open_cpu(_spec: &DeviceSpec) -> Result<burn::tensor::Device, DeviceError> {
    Ok(burn::tensor::Device::flex())
}

#[cfg(not(feature = "cpu"))]
fn open_cpu(spec: &DeviceSpec) -> Result<burn::tensor::Device, DeviceError> {
    Err(DeviceError::FeatureMissing { spec: spec.to_string(), feature: "cpu" })
}

#[cfg(feature = "cuda")]
fn open_cuda(_spec: &DeviceSpec, index: usize) -> Result<burn::tensor::Device, DeviceError> {
    check_nvrtc()?;
    Ok(burn::tensor::Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(spec: &DeviceSpec, _index: usize) -> Result<burn::tensor::Device, DeviceError> {
    Err(DeviceError::FeatureMissing { spec: spec.to_string(), feature: "cuda" })
}

/// One line saying what `spec` is and whether it can be used here, for logs and status replies.
///
/// E.g. `cpu (burn-flex)`, `cuda:0 (NVIDIA H100 80GB HBM3; 1 CUDA device, driver CUDA 12.8)`,
/// `cuda:0 (unavailable: no CUDA driver: ...)`.
pub fn describe(spec: &DeviceSpec) -> String {
    match spec {
        DeviceSpec::Cpu => {
            if cfg!(feature = "cpu") {
                format!("{spec} (burn-flex)")
            } else {
                format!("{spec} (unavailable: built without the `cpu` feature)")
            }
        }
        DeviceSpec::Cuda(index) => {
            let count = match cuda_device_count() {
                Ok(count) => count,
                Err(err) => return format!("{spec} (unavailable: {err})"),
            };
            let Ok(driver) = driver() else { unreachable!("cuda_device_count succeeded") };
            let driver_version = driver.version.map(|v| format!(", driver CUDA {}.{}", v / 1000, (v % 1000) / 10)).unwrap_or_default();
            let summary = format!("{count} CUDA device(s){driver_version}");
            if *index >= count {
                return format!("{spec} (unavailable: {}; {summary})", DeviceError::NoSuchDevice { index: *index, count });
            }
            let name = cuda_device_name(driver, *index).unwrap_or_else(|| "unnamed".to_string());
            if !cfg!(feature = "cuda") {
                return format!("{spec} ({name}; {summary}; unusable: built without the `cuda` feature)");
            }
            match check_nvrtc() {
                Ok(nvrtc) => format!("{spec} ({name}; {summary}; NVRTC {nvrtc})"),
                Err(err) => format!("{spec} ({name}; {summary}; unusable: {err})"),
            }
        }
        DeviceSpec::Wgpu(_) => describe_wgpu(spec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_accepted_forms() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!(" CPU ".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:0".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:1".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(1)));
        assert_eq!("Cuda:12".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(12)));
        assert_eq!("wgpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Wgpu(None)));
        assert_eq!(" WGPU:2".parse::<DeviceSpec>(), Ok(DeviceSpec::Wgpu(Some(2))));
    }

    #[test]
    fn rejects_other_forms_naming_the_accepted_ones() {
        for bad in [
            "",
            "gpu",
            "cuda:",
            "cuda:-1",
            "cuda:+1",
            "cuda:x",
            "cuda:1:2",
            "cuda1",
            "cpu:0",
            "cuda: 1",
            "cuda:99999999999999999999999",
            "wgpu:",
            "wgpu:x",
            "vulkan",
        ] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert_eq!(err, DeviceError::InvalidSpec { input: bad.to_string() });
            let message = err.to_string();
            for form in ["`cpu`", "`cuda`", "`cuda:N`", "`wgpu`", "`wgpu:N`"] {
                assert!(message.contains(form), "{message:?} lacks {form}");
            }
        }
    }

    #[test]
    fn display_round_trips() {
        for spec in [DeviceSpec::Cpu, DeviceSpec::Cuda(0), DeviceSpec::Cuda(3), DeviceSpec::Wgpu(None), DeviceSpec::Wgpu(Some(1))] {
            assert_eq!(spec.to_string().parse::<DeviceSpec>(), Ok(spec));
        }
    }

    #[test]
    fn error_messages_are_specific() {
        let err = DeviceError::NoSuchDevice { index: 2, count: 1 };
        assert!(err.to_string().contains("CUDA device 2 does not exist"));
        assert!(err.to_string().contains("cuda:0 .. cuda:0"));
        let err = DeviceError::FeatureMissing { spec: "cuda:0".into(), feature: "cuda" };
        assert!(err.to_string().contains("built without the `cuda` feature"));
    }

    /// Whether this machine has a usable NVIDIA driver and device; the tests below then check
    /// the other side.
    fn has_cuda() -> bool {
        cuda_device_count().is_ok()
    }

    #[test]
    fn cuda_device_count_does_not_panic() {
        match cuda_device_count() {
            Ok(count) => assert!(count > 0),
            Err(err) => {
                assert!(matches!(err, DeviceError::NoDriver { .. } | DeviceError::NoDevice | DeviceError::Driver { .. }));
                assert!(!err.to_string().is_empty());
            }
        }
    }

    #[test]
    fn without_a_driver_cuda_is_an_error_not_a_panic() {
        if has_cuda() {
            eprintln!("skipped: this machine has a CUDA device");
            return;
        }
        assert!(cuda_device_count().is_err());
        assert!(open(&DeviceSpec::Cuda(0)).is_err());
        assert!(describe(&DeviceSpec::Cuda(0)).contains("unavailable"));
    }

    #[test]
    fn cuda_index_past_the_last_device_is_an_error() {
        // Without a driver this fails earlier, which is an error too.
        assert!(open(&DeviceSpec::Cuda(usize::MAX)).is_err());
    }

    #[test]
    fn cpu_matches_the_cpu_feature() {
        let opened = open(&DeviceSpec::Cpu);
        if cfg!(feature = "cpu") {
            assert!(opened.is_ok());
            assert_eq!(describe(&DeviceSpec::Cpu), "cpu (burn-flex)");
        } else {
            assert!(matches!(opened, Err(DeviceError::FeatureMissing { feature: "cpu", .. })));
        }
    }
}
