# syntax=docker/dockerfile:1
#
# stylealign images. Two targets:
#
#   docker build --target cpu -t stylealign:cpu .     # CPU backend (burn-flex), distroless runtime
#   docker build --target gpu -t stylealign:gpu .     # CUDA backend (--features cuda), CUDA runtime
#
# Build args (all optional):
#   FEATURES             cargo features of the `cpu` target's build (default: none = CPU only)
#   GPU_FEATURES         cargo features of the `gpu` target's build (default: cuda)
#   CUDA_VERSION         nvidia/cuda image version of the `gpu` target (default 12.8.1)
#   CUDA_DISTRO          nvidia/cuda image distro of the `gpu` target (default ubuntu22.04)
#   CUDARC_CUDA_VERSION  the CUDA API version cudarc binds at build time; keep it equal to
#                        CUDA_VERSION's major.minor, written MM0m0 (12.8 -> 12080)
#   CPU_RUNTIME_IMAGE    base of the `cpu` target (default gcr.io/distroless/cc-debian12:nonroot)
#
# See deploy/README.md for why each runtime image was chosen.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG CPU_RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG CUDA_VERSION=12.8.1
ARG CUDA_DISTRO=ubuntu22.04

# ---------------------------------------------------------------------------------------------
# Sources: only what `cargo build --bin stylealign` reads (see also .dockerignore).
# ---------------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS sources
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
# Local stand-in for cubecl-llvm, wired in by [patch.crates-io]: cargo needs it to resolve the
# lock file even for the CPU build.
COPY crates ./crates
COPY proto ./proto
COPY assets ./assets
# The playground's page and style sheet, embedded next to the bundle in assets/.
COPY web/src/index.html web/src/style.css ./web/src/
# Cargo.toml declares [[bench]] unet; cargo checks that its file exists when it reads the manifest.
COPY benches ./benches
COPY src ./src

# ---------------------------------------------------------------------------------------------
# CPU build (FEATURES, default empty).
# ---------------------------------------------------------------------------------------------
FROM sources AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG FEATURES=""
ARG CUDARC_CUDA_VERSION=12080
ENV CARGO_TERM_COLOR=never \
    CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION}
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    export CARGO_TARGET_DIR="/src/target/features-${FEATURES:-default}" \
 && cargo build --release --locked --bin stylealign ${FEATURES:+--features "${FEATURES}"} \
 && install -D -m 0755 "${CARGO_TARGET_DIR}/release/stylealign" /out/stylealign

# ---------------------------------------------------------------------------------------------
# CUDA build (GPU_FEATURES, default cuda). No CUDA toolkit is needed to build: the binary links
# no CUDA library; it dlopens libcuda.so.1 and libnvrtc.so.<major> at run time. cudarc picks the
# CUDA API version at build time from CUDARC_CUDA_VERSION (without it and without nvcc it would
# pick the newest it knows, CUDA 13.x, whose NVRTC the 12.x runtime image does not have).
# ---------------------------------------------------------------------------------------------
FROM sources AS builder-gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG GPU_FEATURES=cuda
ARG CUDARC_CUDA_VERSION=12080
ENV CARGO_TERM_COLOR=never \
    CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION}
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    export CARGO_TARGET_DIR="/src/target/gpu-${GPU_FEATURES}-${CUDARC_CUDA_VERSION}" \
 && cargo build --release --locked --bin stylealign --features "${GPU_FEATURES}" \
 && install -D -m 0755 "${CARGO_TARGET_DIR}/release/stylealign" /out/stylealign

# ---------------------------------------------------------------------------------------------
# CUDA headers. The kernels are generated as CUDA C++ and compiled by NVRTC at run time with
# `--include-path=$CUDA_PATH/include`; they #include <cuda_fp16.h>, <mma.h>, <cuda/barrier>,
# <cooperative_groups.h>. The -runtime images ship libnvrtc but no headers, so the headers are
# taken from the -devel image of the same version (only this folder reaches the final image).
# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${CUDA_DISTRO} AS cuda-headers

# ---------------------------------------------------------------------------------------------
# Target `cpu`: distroless cc (glibc, libgcc, libstdc++; no shell, no package manager), user
# nonroot (65532). The Kubernetes preStop hook uses the native `sleep` action, so no shell is
# needed in the image.
# ---------------------------------------------------------------------------------------------
FROM ${CPU_RUNTIME_IMAGE} AS cpu
LABEL org.opencontainers.image.title="stylealign (CPU)" \
      org.opencontainers.image.description="Style-aligned Stable Diffusion over gRPC, burn CPU backend" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
COPY --from=builder /out/stylealign /usr/local/bin/stylealign
ENV STYLEALIGN_LISTEN=0.0.0.0:50051 \
    STYLEALIGN_ADMIN_LISTEN=0.0.0.0:9090 \
    STYLEALIGN_DEVICE=cpu \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache
# TMPDIR: the embedded model's tokenizer files are written there at start-up.
USER 65532:65532
# 50051: gRPC API (StyleAlign, health, reflection). 9090: admin (/metrics, /healthz, gRPC health).
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/stylealign"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# Target `gpu`: nvidia/cuda -runtime (CUDA shared libraries incl. libnvrtc + libnvrtc-builtins;
# libcuda.so.1 comes from the node's driver through the NVIDIA container runtime) plus the
# toolkit headers NVRTC needs.
# ---------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${CUDA_DISTRO} AS gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="stylealign (CUDA)" \
      org.opencontainers.image.description="Style-aligned Stable Diffusion over gRPC, burn CUDA backend" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
COPY --from=cuda-headers /usr/local/cuda/include/ /opt/cuda/include/
COPY --from=builder-gpu /out/stylealign /usr/local/bin/stylealign
# CUDA_PATH: where cubecl-cuda looks for include/ when it calls NVRTC.
# XDG_CACHE_HOME: cubecl's autotune cache ($XDG_CACHE_HOME/cubecl); /tmp is the writable emptyDir
# in Kubernetes (the root filesystem is read-only).
ENV CUDA_PATH=/opt/cuda \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    STYLEALIGN_LISTEN=0.0.0.0:50051 \
    STYLEALIGN_ADMIN_LISTEN=0.0.0.0:9090 \
    STYLEALIGN_DEVICE=cuda \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache
# Fail the build, not the pod, when NVRTC or a header the kernels include is missing. NVRTC's
# folder goes into the loader cache, so cudarc's dlopen("libnvrtc.so.12") finds it whatever
# LD_LIBRARY_PATH is (never a stubs/ folder: its libcuda.so is a link-time stub that makes every
# driver call fail; the real libcuda.so.1 is mounted from the node by the NVIDIA runtime).
# Then the same non-root user as the distroless image (65532).
RUN nvrtc="$(find /usr/local -name 'libnvrtc.so.*' -not -path '*/stubs/*' -print -quit)" \
 && if [ -z "${nvrtc}" ]; then echo "libnvrtc.so.* not found in the runtime image" >&2; exit 1; fi \
 && dirname "${nvrtc}" > /etc/ld.so.conf.d/zz-stylealign-nvrtc.conf \
 && ldconfig \
 && ldconfig -p | grep 'libnvrtc\.so\.' >/dev/null \
 && for h in cuda_fp16.h cuda_bf16.h mma.h cooperative_groups.h vector_types.h; do \
        if [ ! -e "/opt/cuda/include/${h}" ]; then echo "missing CUDA header ${h}" >&2; exit 1; fi; \
    done \
 && if [ ! -e /opt/cuda/include/cuda/barrier ] && [ ! -e /opt/cuda/include/cccl/cuda/barrier ]; then \
        echo "missing CUDA header cuda/barrier (CCCL)" >&2; exit 1; \
    fi \
 && groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin nonroot
USER 65532:65532
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/stylealign"]
CMD ["serve"]
