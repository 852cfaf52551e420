//! Stand-in for `cubecl-llvm` 0.11.3 that contains no LLVM.
//!
//! `cubecl-cuda` 0.11.3 always depends on `cubecl-llvm`, whose build script downloads a
//! prebuilt LLVM. Binaries built here compile their CUDA kernels through CUDA C++ and NVRTC
//! instead (`cubecl-cuda`'s `cpp` feature), so this crate provides only the items
//! `cubecl-cuda` names, at the same paths:
//!
//! - [`nvptx::ptx_version::PtxVersion`]: a real, working copy (the runtime asks it for the
//!   driver's PTX version and prints it in its kernel-cache key, whichever backend runs);
//! - [`shared::lowered_features::GpuTarget`] and [`shared::lowered_features::restrict_features`]:
//!   only called when the LLVM backend is selected, so it panics with an explanation;
//! - [`PlironCompiler`], [`PlironOptions`], [`PlironArtifact`], [`NvptxModule`], [`LlvmTarget`]:
//!   the compiler type the LLVM variant of `cubecl_cuda::CudaCompiler` holds; compiling with it
//!   returns a [`CompilationError`] saying the LLVM/PTX path is not built into this binary.
//!
//! If the LLVM path is ever taken, it means `cubecl-cuda` was built without its `cpp` feature.

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

use cubecl_core::ir::amd::GfxArch;
#[cfg(feature = "nvptx")]
use cubecl_core::ir::nvidia::SmArch;
use cubecl_environment::backtrace::BackTrace;
use cubecl_runtime::compiler::{CompilationError, Compiler};
use cubecl_runtime::kernel::{BufferIOAttr, KernelDefinition};

/// What every entry point of this stand-in reports.
pub const UNAVAILABLE: &str = "the LLVM/PTX kernel compiler (cubecl-llvm) is not built into this \
binary: it is a stand-in crate without LLVM, and CUDA kernels are compiled through CUDA C++ with \
NVRTC instead. Reaching this means cubecl-cuda was built without its `cpp` feature (stylealign's \
`cuda` feature enables it) or something selected the LLVM backend explicitly";

pub mod target {
    //! LLVM compilation targets.

    /// Same variants as the real crate (per feature).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub enum LlvmTarget {
        #[default]
        Cpu,
        #[cfg(feature = "amdgpu")]
        AmdGpu,
        #[cfg(feature = "nvptx")]
        Nvptx,
    }

    impl LlvmTarget {
        /// Whether the target provides a hardware launch grid.
        pub fn is_gpu(self) -> bool {
            !matches!(self, LlvmTarget::Cpu)
        }
    }
}

pub use target::LlvmTarget;

#[cfg(feature = "nvptx")]
pub mod nvptx {
    //! NVPTX target: only the PTX version table survives in the stand-in.

    pub mod ptx_version {
        //! The PTX ISA version emitted for the installed driver (copied verbatim from
        //! cubecl-llvm 0.11.3, MIT OR Apache-2.0).

        use alloc::format;
        use core::fmt;
        use std::ffi::CString;

        /// A PTX ISA version, as the NVPTX target feature spells it: 8.7 is `87`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct PtxVersion(u32);

        impl PtxVersion {
            /// The newest version a driver of CUDA `driver` loads, as `cuDriverGetVersion`
            /// reports it (12.8 is `12080`). `None` below CUDA 10.0.
            pub fn for_driver(driver: i32) -> Option<Self> {
                DRIVER_PTX
                    .iter()
                    .find(|(first_driver, _)| driver >= *first_driver)
                    .map(|(_, ptx)| Self(*ptx))
            }

            /// The NVPTX target feature that selects this version.
            pub fn target_feature(self) -> CString {
                CString::new(format!("+{self}")).expect("the feature has no NUL")
            }
        }

        impl fmt::Display for PtxVersion {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "ptx{}", self.0)
            }
        }

        /// The first CUDA release to load each PTX version, newest first.
        const DRIVER_PTX: &[(i32, u32)] = &[
            (13030, 93),
            (13020, 92),
            (13010, 91),
            (13000, 90),
            (12090, 88),
            (12080, 87),
            (12050, 85),
            (12040, 84),
            (12030, 83),
            (12020, 82),
            (12010, 81),
            (12000, 80),
            (11080, 78),
            (11070, 77),
            (11060, 76),
            (11050, 75),
            (11040, 74),
            (11030, 73),
            (11020, 72),
            (11010, 71),
            (11000, 70),
            (10020, 65),
            (10010, 64),
            (10000, 63),
        ];

        #[cfg(test)]
        mod tests {
            use super::*;

            #[test]
            fn a_driver_gets_the_newest_version_it_loads() {
                assert_eq!(PtxVersion::for_driver(12080), Some(PtxVersion(87)));
                assert_eq!(PtxVersion::for_driver(12060), Some(PtxVersion(85)));
                assert_eq!(PtxVersion::for_driver(13050), Some(PtxVersion(93)));
                assert_eq!(PtxVersion::for_driver(8000), None);
                assert_eq!(PtxVersion(87).to_string(), "ptx87");
            }
        }
    }
}

pub mod shared {
    //! Shared pieces of the real crate that cubecl-cuda names.

    pub use crate::{NvptxModule, PlironArtifact, PlironCompiler, PlironOptions};

    pub mod lowered_features {
        //! Narrowing device properties to what the LLVM backend lowers. The runtime only calls
        //! this when it selected the LLVM backend, which this binary does not contain.

        use cubecl_core::ir::DeviceProperties;

        /// The GPU target a device's features would be narrowed for.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum GpuTarget {
            #[cfg(feature = "nvptx")]
            Nvptx,
            #[cfg(feature = "amdgpu")]
            AmdGpu,
        }

        /// Always panics: being called means the runtime chose the LLVM backend while
        /// initialising the device, which cannot work in this binary. Failing here, at device
        /// initialisation, beats failing on the first kernel.
        pub fn restrict_features(_props: &mut DeviceProperties, target: GpuTarget) {
            panic!(
                "{} (device initialisation selected the LLVM backend for {target:?})",
                crate::UNAVAILABLE
            );
        }
    }
}

/// The LLVM compiler, as a type only: [`Compiler::compile`] returns an error.
#[derive(Clone, Debug, Default)]
pub struct PlironCompiler {
    pub target: LlvmTarget,
}

/// Options of the LLVM compiler; same public fields cubecl-cuda sets.
#[derive(Clone, Debug, Default)]
pub struct PlironOptions {
    /// Minimum CPU buffer alignment. Unused.
    pub cpu_buffer_alignment: Option<u32>,
    /// AMDGPU architecture. Unused.
    pub arch: Option<GfxArch>,
    /// NVPTX architecture. Unused.
    #[cfg(feature = "nvptx")]
    pub sm_arch: Option<SmArch>,
    /// PTX version to emit. Unused.
    #[cfg(feature = "nvptx")]
    pub ptx_version: Option<nvptx::ptx_version::PtxVersion>,
    /// Pass scalars and static metadata in the kernel parameter block. Unused.
    pub grid_constants: bool,
}

/// Compiled NVPTX module. Never constructed by this stand-in.
#[cfg(feature = "nvptx")]
#[derive(Clone, Debug)]
pub struct NvptxModule {
    /// NUL-terminated PTX assembly.
    pub ptx: Vec<core::ffi::c_char>,
    /// Kernel entry point symbol.
    pub entrypoint: String,
    /// IR for logging and cache keys.
    pub ir: String,
    /// Shared memory required per launch, in bytes.
    pub shared_memory_size: usize,
    /// Buffer access modes in binding order.
    pub io: Vec<BufferIOAttr>,
}

/// Placeholder so the item exists with the `nvptx` feature off (the real crate always has it).
#[cfg(not(feature = "nvptx"))]
#[derive(Clone, Debug)]
pub struct NvptxModule {
    _private: (),
}

/// Compiled kernel artifact. Never constructed by this stand-in.
#[derive(Clone, Debug)]
pub enum PlironArtifact {
    #[cfg(feature = "nvptx")]
    NvptxCode(NvptxModule),
    /// Keeps the enum inhabited-in-principle when no GPU target feature is on.
    Unavailable,
}

impl core::fmt::Display for PlironArtifact {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            #[cfg(feature = "nvptx")]
            PlironArtifact::NvptxCode(module) => write!(f, "{}", module.ir),
            PlironArtifact::Unavailable => f.write_str(UNAVAILABLE),
        }
    }
}

impl Compiler for PlironCompiler {
    type Representation = PlironArtifact;
    type CompilationOptions = PlironOptions;

    fn buffer_io(repr: &Self::Representation) -> Option<Vec<BufferIOAttr>> {
        match repr {
            #[cfg(feature = "nvptx")]
            PlironArtifact::NvptxCode(module) => Some(module.io.clone()),
            PlironArtifact::Unavailable => None,
        }
    }

    fn compile(
        &mut self,
        _kernel: KernelDefinition,
        _compilation_options: &Self::CompilationOptions,
    ) -> Result<Self::Representation, CompilationError> {
        Err(CompilationError::Generic {
            reason: alloc::format!("{UNAVAILABLE} (target {:?})", self.target),
            backtrace: BackTrace::capture(),
        })
    }

    fn extension(&self) -> &'static str {
        match self.target {
            LlvmTarget::Cpu => "plir",
            #[cfg(feature = "amdgpu")]
            LlvmTarget::AmdGpu => "ll",
            #[cfg(feature = "nvptx")]
            LlvmTarget::Nvptx => "ll",
        }
    }

    fn lang_tag(&self) -> &'static str {
        match self.target {
            LlvmTarget::Cpu => "mlir",
            #[cfg(feature = "amdgpu")]
            LlvmTarget::AmdGpu => "llvm",
            #[cfg(feature = "nvptx")]
            LlvmTarget::Nvptx => "llvm",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiling_reports_that_llvm_is_not_built_in() {
        assert!(UNAVAILABLE.contains("NVRTC"));
        assert!(UNAVAILABLE.contains("LLVM/PTX"));
        assert_eq!(PlironCompiler::default().lang_tag(), "mlir");
    }
}
