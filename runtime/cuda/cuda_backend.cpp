// The CUDA backend (runtime/cuda/cuda_backend.h): each op is a launch() on a CUDA stream whose
// closure calls the kernel's launcher with the stream's cudaStream_t.
#include "runtime/cuda/cuda_backend.h"

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/attention.h"
#include "kernels/classifier.h"
#include "kernels/cuda_common.cuh"
#include "kernels/cudnn_attention.h"
#include "kernels/encoder.h"
#include "kernels/gelu.h"
#include "kernels/gradnorm.h"
#include "kernels/layernorm.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "runtime/cuda/cuda_memory.h"
#include "runtime/cuda/cuda_stream.h"

namespace remat {
namespace {

cudaStream_t native(Stream* s) {
  return static_cast<cudaStream_t>(s->native());
}

// Host-side conversions (round to nearest even, as the kernels round).
template <typename Elem>
Elem to_elem(float x);
template <>
float to_elem<float>(float x) {
  return x;
}
template <>
__nv_bfloat16 to_elem<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
float to_float(float x) {
  return x;
}
float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename Elem>
class CudaBackend final : public Backend {
 public:
  CudaBackend() {
    int dev = 0;
    REMAT_CUDA_CHECK(cudaGetDevice(&dev));
    REMAT_CUDA_CHECK(cudaGetDeviceProperties(&props_, dev));
    REMAT_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&scalars_dev_), 4 * sizeof(float)));
    REMAT_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&scalars_host_), 4 * sizeof(float)));
  }
  ~CudaBackend() override {
    // Never throws: the device may be in an error state already. The cuBLASLt workspaces
    // belong to the streams (each frees its own when destroyed), not to the backend: another
    // live backend's stay.
    cudaDeviceSynchronize();
    cudaFree(scratch_);
    cudaFree(scalars_dev_);
    cudaFreeHost(scalars_host_);
  }

  const char* name() const override { return "cuda"; }
  ActDType dtype() const override { return sizeof(Elem) == 2 ? ActDType::kBF16 : ActDType::kFP32; }
  std::string describe() const override {
    char buf[512];
    std::snprintf(buf, sizeof buf, "CUDA backend, %s (sm_%d%d, %.1f GiB), %s%s", props_.name,
                  props_.major, props_.minor, props_.totalGlobalMem / double(1ull << 30),
                  dtype_name(dtype()),
                  sizeof(Elem) == 2 ? " weights/activations/gradients, fp32 master weights"
                                    : " everywhere, TF32 off");
    return std::string(buf) + (use_cudnn_ ? ", cuDNN attention" : "");
  }

  std::unique_ptr<Stream> make_stream(const std::string& name, int id) override {
    return make_cuda_stream(name, id);
  }
  MemoryResource* memory() override { return cuda_memory(); }
  uint64_t available_bytes() const override {
    size_t free_b = 0, total = 0;
    if (cudaMemGetInfo(&free_b, &total) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return free_b;
  }

  void* alloc(size_t bytes, const char* what) override {
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, std::max<size_t>(bytes, 256));
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      size_t free_b = 0, total = 0;
      cudaMemGetInfo(&free_b, &total);
      throw Error(std::string("CUDA out of memory allocating ") + std::to_string(bytes) +
                  " bytes for " + what + " (" + std::to_string(free_b) + " bytes free of " +
                  std::to_string(total) + "): " + cudaGetErrorString(err));
    }
    // cudaMemset runs on the legacy stream, which the non-blocking remat streams do not wait
    // for: finish it before the buffer is handed out.
    REMAT_CUDA_CHECK(cudaMemset(p, 0, bytes));
    REMAT_CUDA_CHECK(cudaDeviceSynchronize());
    return p;
  }
  void release(void* p) override {
    if (p) cudaFree(p);
  }
  // A pageable cudaMemcpy may return before its last DMA lands: synchronize, so the data is
  // there for work on any stream.
  void upload(void* dst, const void* src, size_t bytes) override {
    REMAT_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
    REMAT_CUDA_CHECK(cudaDeviceSynchronize());
  }
  // Ordered as upload is: the copy runs on the legacy stream, which remat's non-blocking
  // streams do not synchronize with, so first wait for all their work (the data written
  // there is what is read).
  void download(void* dst, const void* src, size_t bytes) override {
    REMAT_CUDA_CHECK(cudaDeviceSynchronize());
    REMAT_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
  }
  void upload_elems(void* dst, const float* src, size_t n) override {
    std::vector<Elem> h(n);
    for (size_t i = 0; i < n; i++) h[i] = to_elem<Elem>(src[i]);
    upload(dst, h.data(), n * sizeof(Elem));
  }
  void download_elems(float* dst, const void* src, size_t n) override {
    std::vector<Elem> h(n);
    download(h.data(), src, n * sizeof(Elem));
    for (size_t i = 0; i < n; i++) dst[i] = to_float(h[i]);
  }
  void* alloc_host(size_t bytes) override {
    void* p = nullptr;
    REMAT_CUDA_CHECK(cudaMallocHost(&p, std::max<size_t>(bytes, 1)));
    std::memset(p, 0, bytes);
    return p;
  }
  void release_host(void* p) override {
    if (p) cudaFreeHost(p);
  }

  void reserve_scratch(int B, int T, int C, int NH, int Vp) override {
    const size_t n = size_t(B) * T;
    size_t need = cuda::encoder_backward_workspace_bytes(B, T, Vp);
    need = std::max(need, cuda::layernorm_backward_workspace_floats(int(n), C) * sizeof(float));
    need = std::max(need, cuda::rmsnorm_backward_workspace_floats(int(n), C) * sizeof(float));
    need = std::max(need, cuda::attention_backward_workspace_floats(B, T, NH) * sizeof(float));
    if (fused_attention_backward())
      need = std::max(need,
                      cuda::attention_backward_fused_workspace_floats(B, T, C, NH) * sizeof(float));
    need = std::max(need, cuda::gradnorm_workspace_floats() * sizeof(float));
    need = std::max(need, size_t(Vp) * sizeof(Elem));  // classifier_logits of one row
    // cuDNN's backward (when chosen) builds its graphs here.
    need = std::max(need, cudnn_backward_bytes(B, T, C, NH, 0));
    scratch(need);
  }
  void set_attention(const std::string& impl) override {
    REMAT_REQUIRE(impl == "remat" || impl == "cudnn",
                  "--attention: expected remat or cudnn, got '" + impl + "'");
    use_cudnn_ = false;
    if (impl == "remat") return;
#ifdef REMAT_WITH_CUDNN
    REMAT_REQUIRE(sizeof(Elem) == 2,
                  "--attention cudnn needs --dtype bf16 (cuDNN's fused attention is bf16 only); "
                  "fp32 runs --attention remat");
    if (!cudnn_) cudnn_ = std::make_unique<cuda::CudnnAttention>();
    use_cudnn_ = true;
#else
    throw Error(
        "--attention cudnn: this build has no cuDNN attention (cudnn-frontend headers or cuDNN "
        "were not found when it was configured; scripts/setup.sh fetches the headers); use "
        "--attention remat");
#endif
  }

  void zero(Stream* s, void* p, size_t bytes, const char* label) override {
    s->launch([=] { REMAT_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, native(s))); }, label);
  }
  void copy_to_host(Stream* s, void* dst, const void* src, size_t bytes, const char* label,
                    int block) override {
    s->launch(
        [=] {
          REMAT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, native(s)));
        },
        label, block);
  }
  void upload_async(Stream* s, void* dst, const void* src, size_t bytes,
                    const char* label) override {
    s->launch(
        [=] {
          REMAT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, native(s)));
        },
        label);
  }
  void host_task(Stream* s, std::function<void()> fn, const char* label, int block) override {
    s->launch(
        [s, fn = std::move(fn)] {
          REMAT_CUDA_CHECK(cudaStreamSynchronize(native(s)));
          fn();
        },
        label, block);
  }

  void encoder_forward(Stream* s, void* out, const int* tok, const void* wte, const void* wpe,
                       int B, int T, int C) override {
    s->launch([=] { cuda::encoder_forward(E(out), tok, E(wte), E(wpe), B, T, C, native(s)); },
              "fwd.encoder");
  }
  void encoder_backward(Stream* s, void* dwte, void* dwpe, const void* dout, const int* tok, int B,
                        int T, int C, int Vp) override {
    s->launch(
        [=] {
          void* ws = scratch(cuda::encoder_backward_workspace_bytes(B, T, Vp));
          cuda::encoder_backward(E(dwte), E(dwpe), E(dout), tok, B, T, C, Vp, ws, native(s));
        },
        "bwd.encoder");
  }
  void layernorm_forward(Stream* s, void* out, float* mean, float* rstd, const void* inp,
                         const void* w, const void* b, int N, int C, const char* label,
                         int block) override {
    s->launch(
        [=] { cuda::layernorm_forward(E(out), mean, rstd, E(inp), E(w), E(b), N, C, native(s)); },
        label, block);
  }
  void residual_layernorm_forward(Stream* s, void* residual, void* out, float* mean, float* rstd,
                                  const void* x, const void* y, const void* w, const void* b, int N,
                                  int C, const char* label, int block) override {
    s->launch(
        [=] {
          cuda::residual_layernorm_forward(E(residual), E(out), mean, rstd, E(x), E(y), E(w), E(b),
                                           N, C, native(s));
        },
        label, block);
  }
  void layernorm_backward(Stream* s, void* dinp, void* dw, void* db, const void* dout,
                          const void* inp, const void* w, const float* mean, const float* rstd,
                          int N, int C, const char* label, int block) override {
    s->launch(
        [=] {
          float* ws = static_cast<float*>(
              scratch(cuda::layernorm_backward_workspace_floats(N, C) * sizeof(float)));
          cuda::layernorm_backward(E(dinp), E(dw), E(db), E(dout), E(inp), E(w), mean, rstd, N, C,
                                   ws, native(s));
        },
        label, block);
  }
  void rmsnorm_forward(Stream* s, void* out, float* rstd, const void* inp, const void* w, int N,
                       int C, float eps, const char* label, int block) override {
    s->launch([=] { cuda::rmsnorm_forward(E(out), rstd, E(inp), E(w), N, C, eps, native(s)); },
              label, block);
  }
  void residual_rmsnorm_forward(Stream* s, void* residual, void* out, float* rstd, const void* x,
                                const void* y, const void* w, int N, int C, float eps,
                                const char* label, int block) override {
    s->launch(
        [=] {
          cuda::residual_rmsnorm_forward(E(residual), E(out), rstd, E(x), E(y), E(w), N, C, eps,
                                         native(s));
        },
        label, block);
  }
  // Uses the main stream's scratch (the backward pass runs on the main stream).
  void rmsnorm_backward(Stream* s, void* dinp, void* dw, const void* dout, const void* inp,
                        const void* w, const float* rstd, int N, int C, const char* label,
                        int block) override {
    s->launch(
        [=] {
          float* ws = static_cast<float*>(
              scratch(cuda::rmsnorm_backward_workspace_floats(N, C) * sizeof(float)));
          cuda::rmsnorm_backward(E(dinp), E(dw), E(dout), E(inp), E(w), rstd, N, C, ws, native(s));
        },
        label, block);
  }
  void matmul_forward(Stream* s, void* out, const void* inp, const void* w, const void* bias, int N,
                      int C, int OC, const char* label, int block) override {
    s->launch([=] { cuda::matmul_forward(E(out), E(inp), E(w), E(bias), N, C, OC, native(s)); },
              label, block);
  }
  void matmul_backward(Stream* s, void* dinp, void* dw, void* dbias, const void* dout,
                       const void* inp, const void* w, int N, int C, int OC, const char* label,
                       int block) override {
    s->launch(
        [=] {
          cuda::matmul_backward(E(dinp), E(dw), E(dbias), E(dout), E(inp), E(w), N, C, OC,
                                native(s));
        },
        label, block);
  }
  void gelu_forward(Stream* s, void* out, const void* inp, size_t n, const char* label,
                    int block) override {
    s->launch([=] { cuda::gelu_forward(E(out), E(inp), n, native(s)); }, label, block);
  }
  void gelu_backward(Stream* s, void* dinp, const void* inp, const void* dout, size_t n,
                     const char* label, int block) override {
    s->launch([=] { cuda::gelu_backward(E(dinp), E(inp), E(dout), n, native(s)); }, label, block);
  }
  void swiglu_forward(Stream* s, void* out, const void* inp, int N, int I, const char* label,
                      int block) override {
    s->launch([=] { cuda::swiglu_forward(E(out), E(inp), N, I, native(s)); }, label, block);
  }
  void swiglu_backward(Stream* s, void* dinp, const void* inp, const void* dout, int N, int I,
                       const char* label, int block) override {
    s->launch([=] { cuda::swiglu_backward(E(dinp), E(inp), E(dout), N, I, native(s)); }, label,
              block);
  }
  void rope_forward(Stream* s, void* out, const void* inp, int B, int T, int NH, int NKV, int HD,
                    const float* inv_freq, const char* label, int block) override {
    s->launch([=] { cuda::rope_forward(E(out), E(inp), B, T, NH, NKV, HD, inv_freq, native(s)); },
              label, block);
  }
  void rope_backward(Stream* s, void* dinp, const void* dout, int B, int T, int NH, int NKV, int HD,
                     const float* inv_freq, const char* label, int block) override {
    s->launch(
        [=] { cuda::rope_backward(E(dinp), E(dout), B, T, NH, NKV, HD, inv_freq, native(s)); },
        label, block);
  }
  void attention_forward(Stream* s, void* out, float* lse, const void* qkv, int B, int T, int C,
                         int NH, int NKV, const char* label, int block) override {
    if (use_cudnn_)
      return cudnn_attention_forward(s, out, lse, qkv, B, T, C, NH, NKV, label, block);
    s->launch([=] { cuda::attention_forward(E(out), lse, E(qkv), B, T, C, NH, native(s), NKV); },
              label, block);
  }
  // REMAT_ATTENTION_BACKWARD=fused runs cuda::attention_backward_fused (one pass, dQ summed in
  // a semaphore-ordered fixed order; UNVERIFIED on a GPU until its tests pass there); unset or
  // "two-pass" keeps cuda::attention_backward. Read once per process.
  static bool fused_attention_backward() {
    static const bool fused = [] {
      const char* v = std::getenv("REMAT_ATTENTION_BACKWARD");
      const std::string mode = v ? v : "";
      REMAT_REQUIRE(mode.empty() || mode == "two-pass" || mode == "fused",
                    "REMAT_ATTENTION_BACKWARD: expected two-pass or fused, got '" + mode + "'");
      return mode == "fused";
    }();
    return fused;
  }
  void attention_backward(Stream* s, void* dqkv, const void* dout, const void* qkv, const void* out,
                          const float* lse, int B, int T, int C, int NH, int NKV, const char* label,
                          int block) override {
    if (use_cudnn_)
      return cudnn_attention_backward(s, dqkv, dout, qkv, out, lse, B, T, C, NH, NKV, label, block);
    if (fused_attention_backward()) {
      return s->launch(
          [=] {
            float* ws = static_cast<float*>(scratch(
                cuda::attention_backward_fused_workspace_floats(B, T, C, NH) * sizeof(float)));
            cuda::attention_backward_fused(E(dqkv), E(dout), E(qkv), E(out), lse, B, T, C, NH, ws,
                                           native(s), NKV);
          },
          label, block);
    }
    s->launch(
        [=] {
          float* ws = static_cast<float*>(
              scratch(cuda::attention_backward_workspace_floats(B, T, NH) * sizeof(float)));
          cuda::attention_backward(E(dqkv), E(dout), E(qkv), E(out), lse, B, T, C, NH, ws,
                                   native(s), NKV);
        },
        label, block);
  }
  void classifier(Stream* s, float* losses, void* dx, void* dwte, const void* x, const void* wte,
                  const int* targets, int N, int C, int V, int Vp, float dloss, void* workspace,
                  int chunk_rows, float* mean_loss_host) override {
    float* mean_dev = scalars_dev_;
    s->launch(
        [=] {
          cuda::classifier_forward_backward(losses, E(dx), E(dwte), E(x), E(wte), targets, N, C, V,
                                            Vp, dloss, E(workspace), chunk_rows, native(s),
                                            mean_dev);
          REMAT_CUDA_CHECK(cudaMemcpyAsync(mean_loss_host, mean_dev, sizeof(float),
                                           cudaMemcpyDeviceToHost, native(s)));
        },
        "classifier");
  }
  void classifier_logits(Stream* s, float* host_logits, const void* x, const void* wte, int N,
                         int C, int V, int Vp) override {
    const size_t n = size_t(N) * Vp;
    std::vector<Elem> h(n);
    s->launch(
        [&] {
          Elem* dev = static_cast<Elem*>(scratch(n * sizeof(Elem)));
          cuda::classifier_logits(dev, E(x), E(wte), N, C, V, Vp, native(s));
          REMAT_CUDA_CHECK(
              cudaMemcpyAsync(h.data(), dev, n * sizeof(Elem), cudaMemcpyDeviceToHost, native(s)));
        },
        "classifier.logits");
    s->synchronize();
    for (size_t i = 0; i < n; i++) host_logits[i] = to_float(h[i]);
  }

  double sum_squares(Stream* s, const void* g, size_t n) override {
    float* out = scalars_dev_ + 1;
    s->launch(
        [=] {
          float* ws =
              static_cast<float*>(scratch(cuda::gradnorm_workspace_floats() * sizeof(float)));
          cuda::sum_squares(out, E(g), n, ws, /*accumulate=*/false, native(s));
          REMAT_CUDA_CHECK(cudaMemcpyAsync(scalars_host_ + 1, out, sizeof(float),
                                           cudaMemcpyDeviceToHost, native(s)));
        },
        "optimizer.grad_norm");
    s->synchronize();
    return scalars_host_[1];
  }
  void adamw(Stream* s, float* master, float* m, float* v, const void* grads, void* params,
             size_t n, const cpu::AdamWParams& p) override {
    Elem* w = params == master ? nullptr : static_cast<Elem*>(params);
    s->launch([=] { cuda::adamw_update(master, m, v, E(grads), w, n, p, nullptr, native(s)); },
              "optimizer.adamw");
  }

 private:
  static Elem* E(void* p) {
    return static_cast<Elem*>(p);
  }
  static const Elem* E(const void* p) {
    return static_cast<const Elem*>(p);
  }

  // The main stream's scratch, at least `bytes`. Sized by reserve_scratch(); should a shape
  // need more, it grows after a device synchronize (no kernel still reads the old buffer).
  void* scratch(size_t bytes) {
    if (bytes <= scratch_bytes_) return scratch_;
    REMAT_CUDA_CHECK(cudaDeviceSynchronize());
    if (scratch_) REMAT_CUDA_CHECK(cudaFree(scratch_));
    scratch_ = nullptr;
    scratch_bytes_ = 0;
    REMAT_CUDA_CHECK(cudaMalloc(&scratch_, bytes));
    scratch_bytes_ = bytes;
    return scratch_;
  }

  // ---- cuDNN's fused attention (set_attention("cudnn"); bf16) ----
  // The backward's workspace is the main stream's scratch; the forward runs on the main and the
  // recompute streams, so each stream has its own forward workspace (cuDNN's forward usually
  // needs none), grown after that stream has synchronized.
  bool use_cudnn_ = false;
#ifdef REMAT_WITH_CUDNN
  struct DeviceBytes {
    void* p = nullptr;
    size_t bytes = 0;
    DeviceBytes() = default;
    DeviceBytes(const DeviceBytes&) = delete;
    ~DeviceBytes() { cudaFree(p); }
  };
  std::unique_ptr<cuda::CudnnAttention> cudnn_;
  std::map<cudaStream_t, DeviceBytes> cudnn_forward_ws_;

  size_t cudnn_backward_bytes(int B, int T, int C, int NH, int NKV) {
    return use_cudnn_ ? cudnn_->backward_workspace_bytes(B, T, C, NH, NKV) : 0;
  }
  void* cudnn_forward_workspace(cudaStream_t st, size_t bytes) {
    if (bytes == 0) return nullptr;
    DeviceBytes& w = cudnn_forward_ws_[st];
    if (w.bytes < bytes) {
      REMAT_CUDA_CHECK(cudaStreamSynchronize(st));
      REMAT_CUDA_CHECK(cudaFree(w.p));
      w.p = nullptr;
      w.bytes = 0;
      REMAT_CUDA_CHECK(cudaMalloc(&w.p, bytes));
      w.bytes = bytes;
    }
    return w.p;
  }
  void cudnn_attention_forward(Stream* s, void* out, float* lse, const void* qkv, int B, int T,
                               int C, int NH, int NKV, const char* label, int block) {
    s->launch(
        [=] {
          const size_t ws = cudnn_->forward_workspace_bytes(B, T, C, NH, NKV);
          cudnn_->forward(static_cast<__nv_bfloat16*>(out), lse,
                          static_cast<const __nv_bfloat16*>(qkv), B, T, C, NH,
                          cudnn_forward_workspace(native(s), ws), ws, native(s), NKV);
        },
        label, block);
  }
  void cudnn_attention_backward(Stream* s, void* dqkv, const void* dout, const void* qkv,
                                const void* out, const float* lse, int B, int T, int C, int NH,
                                int NKV, const char* label, int block) {
    using bf16 = __nv_bfloat16;
    s->launch(
        [=] {
          const size_t ws = cudnn_backward_bytes(B, T, C, NH, NKV);
          cudnn_->backward(static_cast<bf16*>(dqkv), static_cast<const bf16*>(dout),
                           static_cast<const bf16*>(qkv), static_cast<const bf16*>(out), lse, B, T,
                           C, NH, scratch(ws), ws, native(s), NKV);
        },
        label, block);
  }
#else
  size_t cudnn_backward_bytes(int, int, int, int, int) {
    return 0;
  }
  void cudnn_attention_forward(Stream*, void*, float*, const void*, int, int, int, int, int,
                               const char*, int) {}
  void cudnn_attention_backward(Stream*, void*, const void*, const void*, const void*, const float*,
                                int, int, int, int, int, const char*, int) {}
#endif

  cudaDeviceProp props_{};
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
  float* scalars_dev_ = nullptr;   // [0] mean loss, [1] sum of squares
  float* scalars_host_ = nullptr;  // pinned
};

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(ActDType dtype) {
  REMAT_CHECK(device_count() > 0, "the CUDA backend needs a CUDA device; none was found");
  if (dtype == ActDType::kBF16) return std::make_unique<CudaBackend<__nv_bfloat16>>();
  return std::make_unique<CudaBackend<float>>();
}

void install_cuda_backend() {
  CudaBackendHooks h;
  h.device_count = device_count;
  h.create = make_cuda_backend;
  register_cuda_backend(h);
}

}  // namespace remat
