// The CUDA backend (runtime/backend.h) over the kernels of kernels/*.cu: CUDA streams and
// events, one cudaMalloc arena reservation per run, cuBLASLt GEMMs, bf16 (or fp32 with TF32
// off) weights, activations and gradients with fp32 master weights, moments and reductions.
//
// Scratch that a kernel needs beyond its outputs (LayerNorm and attention backward partials,
// encoder buckets, the gradient-norm partials) is one device buffer per backend, sized when a
// runner is made (reserve_scratch), used only by ops on the main stream (the recompute stream
// runs forward kernels, which need none besides their cuBLASLt workspace, kept per stream).
#pragma once
#include <memory>

#include "runtime/backend.h"

namespace remat {

// Registers the CUDA backend with choose_backend() (programs linked with remat_cuda call it
// once at start).
void install_cuda_backend();

// The backend itself, on the current device (throws without one).
std::unique_ptr<Backend> make_cuda_backend(ActDType dtype);

}  // namespace remat
