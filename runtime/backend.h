// A compute backend: where weights, gradients, optimizer state and activations live, which
// streams run the work, and which kernels do the math. The executor (runtime/executor.h) and the
// trainer speak only to this interface, so the CPU reference and the CUDA backend run the
// same schedule, the same arena and the same recompute plan.
//
// Conventions of every op below:
// - It is enqueued on `s` through Stream::launch (label and block name it in traces and NVTX)
//   and returns at once; on a null stream (the dry run) it does nothing.
// - "Elem" pointers (void*) hold the backend's element type, dtype(): fp32, or bf16 on CUDA.
//   LayerNorm statistics, the attention log-sum-exp, losses, AdamW master weights and
//   moments are fp32 (float*) on every backend.
// - Pointers are backend memory (host on the CPU, device on CUDA). Shapes are the kernels'
//   (kernels/*.h), whose contracts hold here too.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "base/error.h"
#include "kernels/adamw.h"
#include "runtime/arena.h"
#include "runtime/stream.h"

namespace remat {

// Element type of activations, weights and gradients.
enum class ActDType { kFP32, kBF16 };
int act_bytes(ActDType t);
const char* dtype_name(ActDType t);

class Backend {
 public:
  virtual ~Backend() = default;

  virtual const char* name() const = 0;  // "cpu" or "cuda"
  virtual ActDType dtype() const = 0;
  int elem_bytes() const { return act_bytes(dtype()); }
  // One line for the run's header: device name, memory, precision.
  virtual std::string describe() const = 0;

  // ---- resources (outside the step) ----
  virtual std::unique_ptr<Stream> make_stream(const std::string& name, int id) = 0;
  virtual MemoryResource* memory() = 0;  // where arena reservations come from
  // Bytes that could still be reserved (0 = unknown): the pre-flight memory check.
  virtual uint64_t available_bytes() const = 0;
  // A persistent buffer (weights, gradients, optimizer state, token staging), zero-filled.
  virtual void* alloc(size_t bytes, const char* what) = 0;
  virtual void release(void* p) = 0;
  // Synchronous copies between host memory and backend memory (checkpoints, restore).
  virtual void upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, size_t bytes) = 0;
  // Synchronous fp32 host values -> Elem backend buffer (n elements), and back.
  virtual void upload_elems(void* dst, const float* host_src, size_t n) = 0;
  virtual void download_elems(float* host_dst, const void* src, size_t n) = 0;
  // Host memory the backend's streams may write asynchronously (pinned on CUDA), zero-filled;
  // read it only after the stream that wrote it has been synchronized.
  virtual void* alloc_host(size_t bytes) = 0;
  virtual void release_host(void* p) = 0;

  // Sizes the backend's own scratch for a model shape (B, T, C, NH, padded vocabulary Vp), so
  // that the steps allocate nothing. Call with the streams idle.
  virtual void reserve_scratch(int B, int T, int C, int NH, int Vp) = 0;
  // Which attention attention_forward/backward run: "remat" (kernels/attention.h, the default)
  // or "cudnn" (cuDNN's fused attention: the CUDA backend in bf16, built with cuDNN). Call
  // before reserve_scratch(). Throws Error naming what is missing; this default runs remat's.
  virtual void set_attention(const std::string& impl) {
    REMAT_REQUIRE(impl == "remat" || impl == "cudnn",
                  "--attention: expected remat or cudnn, got '" + impl + "'");
    REMAT_REQUIRE(impl == "remat", std::string("--attention cudnn needs the CUDA backend (--device "
                                               "cuda); the ") +
                                       name() + " backend runs --attention remat only");
  }

  // ---- stream-ordered utilities ----
  virtual void zero(Stream* s, void* p, size_t bytes, const char* label) = 0;
  // host_dst[0, bytes) = src, in order on s (verify-recompute copies).
  virtual void copy_to_host(Stream* s, void* host_dst, const void* src, size_t bytes,
                            const char* label, int block) = 0;
  // host (n ints) -> dst, in order on s. host must stay valid until s is synchronized.
  virtual void upload_async(Stream* s, void* dst, const void* host_src, size_t bytes,
                            const char* label) = 0;
  // Runs fn on the host once everything enqueued on s before it has finished (CPU: as work on
  // the stream; CUDA: after synchronizing s). Exceptions reach the caller or synchronize().
  virtual void host_task(Stream* s, std::function<void()> fn, const char* label, int block) = 0;

  // ---- the model's ops (kernels/*.h) ----
  // wpe may be null (no position embedding); dwpe is then null too.
  virtual void encoder_forward(Stream* s, void* out, const int* tokens, const void* wte,
                               const void* wpe, int B, int T, int C) = 0;
  // dwte (Vp, C) +=, dwpe (T, C) += (deterministic).
  virtual void encoder_backward(Stream* s, void* dwte, void* dwpe, const void* dout,
                                const int* tokens, int B, int T, int C, int Vp) = 0;
  virtual void layernorm_forward(Stream* s, void* out, float* mean, float* rstd, const void* inp,
                                 const void* w, const void* b, int N, int C, const char* label,
                                 int block) = 0;
  virtual void residual_layernorm_forward(Stream* s, void* residual, void* out, float* mean,
                                          float* rstd, const void* x, const void* y, const void* w,
                                          const void* b, int N, int C, const char* label,
                                          int block) = 0;
  // dinp +=, dw +=, db += .
  virtual void layernorm_backward(Stream* s, void* dinp, void* dw, void* db, const void* dout,
                                  const void* inp, const void* w, const float* mean,
                                  const float* rstd, int N, int C, const char* label,
                                  int block) = 0;
  // RMSNorm (kernels/rmsnorm.h); rstd (N) fp32.
  virtual void rmsnorm_forward(Stream* s, void* out, float* rstd, const void* inp, const void* w,
                               int N, int C, float eps, const char* label, int block) = 0;
  virtual void residual_rmsnorm_forward(Stream* s, void* residual, void* out, float* rstd,
                                        const void* x, const void* y, const void* w, int N, int C,
                                        float eps, const char* label, int block) = 0;
  // dinp +=, dw += .
  virtual void rmsnorm_backward(Stream* s, void* dinp, void* dw, const void* dout, const void* inp,
                                const void* w, const float* rstd, int N, int C, const char* label,
                                int block) = 0;
  virtual void matmul_forward(Stream* s, void* out, const void* inp, const void* w,
                              const void* bias, int N, int C, int OC, const char* label,
                              int block) = 0;
  // dinp = (overwritten), dw +=, dbias += .
  virtual void matmul_backward(Stream* s, void* dinp, void* dw, void* dbias, const void* dout,
                               const void* inp, const void* w, int N, int C, int OC,
                               const char* label, int block) = 0;
  virtual void gelu_forward(Stream* s, void* out, const void* inp, size_t n, const char* label,
                            int block) = 0;
  virtual void gelu_backward(Stream* s, void* dinp, const void* inp, const void* dout, size_t n,
                             const char* label, int block) = 0;
  // SwiGLU (kernels/swiglu.h): out (N, I) from inp (N, 2I); dinp overwritten.
  virtual void swiglu_forward(Stream* s, void* out, const void* inp, int N, int I,
                              const char* label, int block) = 0;
  virtual void swiglu_backward(Stream* s, void* dinp, const void* inp, const void* dout, int N,
                               int I, const char* label, int block) = 0;
  // Rotary embedding of packed qkv (kernels/rope.h); dinp overwritten. inv_freq: HD/2 host
  // values that stay valid while the program lives.
  virtual void rope_forward(Stream* s, void* out, const void* inp, int B, int T, int NH, int NKV,
                            int HD, const float* inv_freq, const char* label, int block) = 0;
  virtual void rope_backward(Stream* s, void* dinp, const void* dout, int B, int T, int NH, int NKV,
                             int HD, const float* inv_freq, const char* label, int block) = 0;
  // Causal attention with NH query heads and NKV key/value heads (kernels/attention.h); qkv
  // (B, T, C + 2 NKV C / NH); dqkv overwritten.
  virtual void attention_forward(Stream* s, void* out, float* lse, const void* qkv, int B, int T,
                                 int C, int NH, int NKV, const char* label, int block) = 0;
  virtual void attention_backward(Stream* s, void* dqkv, const void* dout, const void* qkv,
                                  const void* out, const float* lse, int B, int T, int C, int NH,
                                  int NKV, const char* label, int block) = 0;
  // Chunked fused classifier. losses (N) fp32; dx (N, C) overwritten and dwte += when dx is not
  // null; workspace holds chunk_rows * Vp Elems. *mean_loss_host (from alloc_host()) receives the
  // mean loss once s has been synchronized.
  virtual void classifier(Stream* s, float* losses, void* dx, void* dwte, const void* x,
                          const void* wte, const int* targets, int N, int C, int V, int Vp,
                          float dloss, void* workspace, int chunk_rows, float* mean_loss_host) = 0;
  // logits (N, Vp) fp32 on the host, columns >= V set to -inf; synchronous.
  virtual void classifier_logits(Stream* s, float* host_logits, const void* x, const void* wte,
                                 int N, int C, int V, int Vp) = 0;

  // ---- the optimizer ----
  // Sum of squares of g (n Elems); synchronous (the host needs it to decide the step).
  virtual double sum_squares(Stream* s, const void* g, size_t n) = 0;
  // master, m, v (n fp32) updated in place from grads (n Elems). params (n Elems), when not
  // null and different from master, receives the new master rounded to Elem.
  virtual void adamw(Stream* s, float* master, float* m, float* v, const void* grads, void* params,
                     size_t n, const cpu::AdamWParams& p) = 0;
};

// The CPU reference backend (process-wide; fp32).
Backend* cpu_backend();

// The CUDA backend is linked into programs built with it and registers itself (see
// runtime/cuda/cuda_backend.h), so the core library stays free of CUDA.
struct CudaBackendHooks {
  // Number of CUDA devices usable now (0 when there is no driver or device).
  int (*device_count)() = nullptr;
  // A backend on device 0 with the given element type.
  std::unique_ptr<Backend> (*create)(ActDType dtype) = nullptr;
};
void register_cuda_backend(const CudaBackendHooks& hooks);
bool cuda_backend_built();  // registered by this program
int cuda_device_count();    // 0 when not built or no device

// --device auto|cpu|cuda with --dtype auto|fp32|bf16 -> a backend. auto picks CUDA when a
// device is present, else the CPU (the caller says which, once). Errors name what is missing.
struct BackendChoice {
  Backend* backend = nullptr;      // cpu_backend() or owned.get()
  std::unique_ptr<Backend> owned;  // the CUDA backend, when chosen
  std::string note;                // why auto chose what it chose ("" for explicit)
};
BackendChoice choose_backend(const std::string& device, const std::string& dtype);

}  // namespace remat
