// cuDNN's fused attention (its SDPA, built through cudnn-frontend's graph API) behind the
// contract of remat's own (kernels/attention.h): causal, scale 1/sqrt(HD), packed qkv
// (B, T, C + 2 NKV HD) read in place, out (B, T, C), lse (B, NH, T) fp32 and dqkv overwritten.
// bf16 only (fp32 runs remat's attention: --attention remat).
//
// The log-sum-exp is cuDNN's softmax statistic, which is remat's lse exactly in meaning
// (natural log of the sum of exp of the scaled, masked scores), so the forward's lse feeds a
// recompute and the backward of either implementation.
//
// Determinism: the forward has no cross-block reduction; the backward is built with cuDNN's
// deterministic algorithm. On Hopper that algorithm keeps dP, a (T, T) bf16 matrix per query
// head, in the workspace: backward_workspace_bytes() grows with B NH T^2 (200 MB at B = 8,
// NH = 12, T = 1024), which the caller owns (the CUDA backend uses its main-stream scratch).
//
// Graphs and plans are built once per shape and kept; after that a call only enqueues work
// on `stream` (no allocation, no synchronization). Built only with cuDNN and cudnn-frontend
// (REMAT_WITH_CUDNN, see CMakeLists.txt).
#pragma once
#ifdef REMAT_WITH_CUDNN
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <string>

namespace remat::cuda {

class CudnnAttention {
 public:
  // No device work: the cuDNN handle is made at the first graph build, on the current device.
  CudnnAttention();
  ~CudnnAttention();
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  // Builds the forward and backward graphs of this shape (once; host work, though cuDNN may
  // compile kernels the first time). Throws remat::Error with cuDNN's reason when cuDNN does
  // not support the shape. NKV = 0 means NH, as in kernels/attention.h.
  void prepare(int B, int T, int C, int NH, int NKV = 0);

  // Device workspace bytes each call needs (prepares the shape).
  size_t forward_workspace_bytes(int B, int T, int C, int NH, int NKV = 0);
  size_t backward_workspace_bytes(int B, int T, int C, int NH, int NKV = 0);

  // qkv (B, T, C + 2 NKV HD) bf16; out (B, T, C) bf16 overwritten; lse (B, NH, T) fp32
  // overwritten. workspace: forward_workspace_bytes() or more (may be null when that is 0),
  // used by this call only until it completes on `stream`.
  void forward(__nv_bfloat16* out, float* lse, const __nv_bfloat16* qkv, int B, int T, int C,
               int NH, void* workspace, size_t workspace_bytes, cudaStream_t stream, int NKV = 0);

  // dqkv (B, T, C + 2 NKV HD) overwritten. Needs the forward's qkv, out and lse. workspace:
  // backward_workspace_bytes() or more. Deterministic.
  void backward(__nv_bfloat16* dqkv, const __nv_bfloat16* dout, const __nv_bfloat16* qkv,
                const __nv_bfloat16* out, const float* lse, int B, int T, int C, int NH,
                void* workspace, size_t workspace_bytes, cudaStream_t stream, int NKV = 0);

  // "cuDNN 9.19.0 (built against 9.19.0), cudnn-frontend 1.32.0".
  static std::string version();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace remat::cuda
#endif  // REMAT_WITH_CUDNN
