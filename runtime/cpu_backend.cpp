// The CPU reference backend (runtime/backend.h): fp32 everywhere, each op a closure on a CPU
// stream's worker thread calling the reference kernels of kernels/cpu/.
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

#include "kernels/attention.h"
#include "kernels/classifier.h"
#include "kernels/common.h"
#include "kernels/encoder.h"
#include "kernels/gelu.h"
#include "kernels/gradnorm.h"
#include "kernels/layernorm.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "runtime/backend.h"

namespace remat {

int act_bytes(ActDType t) {
  return t == ActDType::kBF16 ? 2 : 4;
}

const char* dtype_name(ActDType t) {
  return t == ActDType::kBF16 ? "bf16" : "fp32";
}

namespace {

const float* F(const void* p) {
  return static_cast<const float*>(p);
}
float* F(void* p) {
  return static_cast<float*>(p);
}

// Bytes of a cgroup (v2, then v1) memory limit that are still free; 0 when there is none.
// Usage counts the page cache; its inactive part is reclaimable, so it is not counted as used
// (the working set, as container runtimes count it).
uint64_t cgroup_free_bytes() {
  auto read_u64 = [](const char* path, unsigned long long* v) {
    FILE* f = std::fopen(path, "r");
    if (!f) return false;
    const bool ok = std::fscanf(f, "%llu", v) == 1;  // "max" does not parse: no limit
    std::fclose(f);
    return ok;
  };
  auto stat_value = [](const char* path, const char* key) {
    unsigned long long v = 0, found = 0;
    FILE* f = std::fopen(path, "r");
    if (!f) return found;
    char name[64];
    while (std::fscanf(f, "%63s %llu", name, &v) == 2) {
      if (std::strcmp(name, key) == 0) {
        found = v;
        break;
      }
    }
    std::fclose(f);
    return found;
  };
  auto free_of = [](unsigned long long limit, unsigned long long used,
                    unsigned long long reclaimable) -> uint64_t {
    used = used > reclaimable ? used - reclaimable : 0;
    return limit > used ? limit - used : 1;
  };
  unsigned long long limit = 0, used = 0;
  if (read_u64("/sys/fs/cgroup/memory.max", &limit) &&
      read_u64("/sys/fs/cgroup/memory.current", &used))
    return free_of(limit, used, stat_value("/sys/fs/cgroup/memory.stat", "inactive_file"));
  if (read_u64("/sys/fs/cgroup/memory/memory.limit_in_bytes", &limit) && limit < (1ull << 60) &&
      read_u64("/sys/fs/cgroup/memory/memory.usage_in_bytes", &used))
    return free_of(limit, used,
                   stat_value("/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"));
  return 0;
}

class CpuBackend final : public Backend {
  // With OpenMP a kernel already uses every core. Kernels of two streams running at once
  // would put two OpenMP teams on the same cores, and their spinning and stragglers made a
  // recompute cost far more than its kernels (`selective` +29% on `small` for +16% of kernel
  // time). So every stream hands its kernels to one compute thread, which owns the one
  // OpenMP team and runs them whole, in the order they arrive; the streams still run their
  // queues, waits and events on their own threads. Without OpenMP (the TSan build, one
  // thread per kernel) kernels run on their streams' threads at once, so a missing event
  // stays a data race.
  template <typename Fn>
  void compute(Stream* s, Fn fn, const char* label, int block = -1) {
#ifdef _OPENMP
    s->launch([this, fn] { cores_.run(fn); }, label, block);
#else
    s->launch(fn, label, block);
#endif
  }
#ifdef _OPENMP
  // The compute thread: run(fn) returns when fn has run there (its exception rethrown).
  class ComputeThread {
   public:
    ComputeThread() : worker_([this] { loop(); }) {}
    ~ComputeThread() {
      {
        std::lock_guard<std::mutex> lock(mu_);
        stop_ = true;
      }
      cv_.notify_all();
      worker_.join();
    }
    void run(const std::function<void()>& fn) {
      Job job{&fn, false, nullptr};
      {
        std::lock_guard<std::mutex> lock(mu_);
        queue_.push_back(&job);
      }
      cv_.notify_all();
      std::unique_lock<std::mutex> lock(mu_);
      done_cv_.wait(lock, [&] { return job.done; });
      if (job.error) std::rethrow_exception(job.error);
    }

   private:
    struct Job {
      const std::function<void()>* fn;
      bool done = false;
      std::exception_ptr error;
    };
    void loop() {
      std::unique_lock<std::mutex> lock(mu_);
      while (true) {
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        Job* job = queue_.front();
        queue_.pop_front();
        lock.unlock();
        try {
          (*job->fn)();
        } catch (...) {
          job->error = std::current_exception();
        }
        lock.lock();
        job->done = true;
        done_cv_.notify_all();
      }
    }
    std::mutex mu_;
    std::condition_variable cv_, done_cv_;
    std::deque<Job*> queue_;
    bool stop_ = false;
    std::thread worker_;
  };
  ComputeThread cores_;
#endif

 public:
  const char* name() const override {
    return "cpu";
  }
  ActDType dtype() const override {
    return ActDType::kFP32;
  }
  std::string describe() const override {
    return "CPU backend, fp32, " + std::to_string(std::thread::hardware_concurrency()) +
           " hardware threads";
  }

  std::unique_ptr<Stream> make_stream(const std::string& name, int id) override {
    return make_cpu_stream(name, id);
  }
  MemoryResource* memory() override {
    return cpu_memory();
  }

  // MemAvailable, lowered to what a cgroup limit leaves.
  uint64_t available_bytes() const override {
    uint64_t avail = 0;
    if (FILE* f = std::fopen("/proc/meminfo", "r")) {
      char line[256];
      unsigned long long kb = 0;
      while (std::fgets(line, sizeof line, f))
        if (std::sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
      std::fclose(f);
      avail = kb * 1024ull;
    }
    const uint64_t cg = cgroup_free_bytes();
    if (cg != 0 && (avail == 0 || cg < avail)) avail = cg;
    return avail;
  }

  void* alloc(size_t bytes, const char* what) override {
    void* p = std::calloc(std::max<size_t>(bytes, 1), 1);
    REMAT_CHECK(p != nullptr, std::string("cannot allocate ") + std::to_string(bytes) +
                                  " bytes of host memory for " + what);
    return p;
  }
  void release(void* p) override {
    std::free(p);
  }
  void upload(void* dst, const void* src, size_t bytes) override {
    std::memcpy(dst, src, bytes);
  }
  void download(void* dst, const void* src, size_t bytes) override {
    std::memcpy(dst, src, bytes);
  }
  void upload_elems(void* dst, const float* src, size_t n) override {
    std::memcpy(dst, src, n * 4);
  }
  void download_elems(float* dst, const void* src, size_t n) override {
    std::memcpy(dst, src, n * 4);
  }
  void* alloc_host(size_t bytes) override {
    return alloc(bytes, "host staging");
  }
  void release_host(void* p) override {
    std::free(p);
  }

  void reserve_scratch(int, int, int, int, int) override {}  // the CPU kernels need none

  void zero(Stream* s, void* p, size_t bytes, const char* label) override {
    s->launch([=] { std::memset(p, 0, bytes); }, label);
  }
  void copy_to_host(Stream* s, void* dst, const void* src, size_t bytes, const char* label,
                    int block) override {
    s->launch([=] { std::memcpy(dst, src, bytes); }, label, block);
  }
  void upload_async(Stream* s, void* dst, const void* src, size_t bytes,
                    const char* label) override {
    if (dst == src) return;
    s->launch([=] { std::memcpy(dst, src, bytes); }, label);
  }
  void host_task(Stream* s, std::function<void()> fn, const char* label, int block) override {
    s->launch(std::move(fn), label, block);
  }

  void encoder_forward(Stream* s, void* out, const int* tok, const void* wte, const void* wpe,
                       int B, int T, int C) override {
    compute(
        s, [=] { cpu::encoder_forward(F(out), tok, F(wte), F(wpe), B, T, C); }, "fwd.encoder");
  }
  void encoder_backward(Stream* s, void* dwte, void* dwpe, const void* dout, const int* tok, int B,
                        int T, int C, int /*Vp*/) override {
    compute(
        s, [=] { cpu::encoder_backward(F(dwte), F(dwpe), F(dout), tok, B, T, C); }, "bwd.encoder");
  }
  void layernorm_forward(Stream* s, void* out, float* mean, float* rstd, const void* inp,
                         const void* w, const void* b, int N, int C, const char* label,
                         int block) override {
    compute(
        s, [=] { cpu::layernorm_forward(F(out), mean, rstd, F(inp), F(w), F(b), N, C); }, label,
        block);
  }
  void residual_layernorm_forward(Stream* s, void* residual, void* out, float* mean, float* rstd,
                                  const void* x, const void* y, const void* w, const void* b, int N,
                                  int C, const char* label, int block) override {
    compute(
        s,
        [=] {
          cpu::residual_layernorm_forward(F(residual), F(out), mean, rstd, F(x), F(y), F(w), F(b),
                                          N, C);
        },
        label, block);
  }
  void layernorm_backward(Stream* s, void* dinp, void* dw, void* db, const void* dout,
                          const void* inp, const void* w, const float* mean, const float* rstd,
                          int N, int C, const char* label, int block) override {
    compute(
        s,
        [=] {
          cpu::layernorm_backward(F(dinp), F(dw), F(db), F(dout), F(inp), F(w), mean, rstd, N, C);
        },
        label, block);
  }
  void matmul_forward(Stream* s, void* out, const void* inp, const void* w, const void* bias, int N,
                      int C, int OC, const char* label, int block) override {
    compute(
        s, [=] { cpu::matmul_forward(F(out), F(inp), F(w), F(bias), N, C, OC); }, label, block);
  }
  void matmul_backward(Stream* s, void* dinp, void* dw, void* dbias, const void* dout,
                       const void* inp, const void* w, int N, int C, int OC, const char* label,
                       int block) override {
    compute(
        s, [=] { cpu::matmul_backward(F(dinp), F(dw), F(dbias), F(dout), F(inp), F(w), N, C, OC); },
        label, block);
  }
  void gelu_forward(Stream* s, void* out, const void* inp, size_t n, const char* label,
                    int block) override {
    compute(
        s, [=] { cpu::gelu_forward(F(out), F(inp), n); }, label, block);
  }
  void gelu_backward(Stream* s, void* dinp, const void* inp, const void* dout, size_t n,
                     const char* label, int block) override {
    compute(
        s, [=] { cpu::gelu_backward(F(dinp), F(inp), F(dout), n); }, label, block);
  }
  void rmsnorm_forward(Stream* s, void* out, float* rstd, const void* inp, const void* w, int N,
                       int C, float eps, const char* label, int block) override {
    compute(
        s, [=] { cpu::rmsnorm_forward(F(out), rstd, F(inp), F(w), N, C, eps); }, label, block);
  }
  void residual_rmsnorm_forward(Stream* s, void* residual, void* out, float* rstd, const void* x,
                                const void* y, const void* w, int N, int C, float eps,
                                const char* label, int block) override {
    compute(
        s,
        [=] {
          cpu::residual_rmsnorm_forward(F(residual), F(out), rstd, F(x), F(y), F(w), N, C, eps);
        },
        label, block);
  }
  void rmsnorm_backward(Stream* s, void* dinp, void* dw, const void* dout, const void* inp,
                        const void* w, const float* rstd, int N, int C, const char* label,
                        int block) override {
    compute(
        s, [=] { cpu::rmsnorm_backward(F(dinp), F(dw), F(dout), F(inp), F(w), rstd, N, C); }, label,
        block);
  }
  void swiglu_forward(Stream* s, void* out, const void* inp, int N, int I, const char* label,
                      int block) override {
    compute(
        s, [=] { cpu::swiglu_forward(F(out), F(inp), N, I); }, label, block);
  }
  void swiglu_backward(Stream* s, void* dinp, const void* inp, const void* dout, int N, int I,
                       const char* label, int block) override {
    compute(
        s, [=] { cpu::swiglu_backward(F(dinp), F(inp), F(dout), N, I); }, label, block);
  }
  void rope_forward(Stream* s, void* out, const void* inp, int B, int T, int NH, int NKV, int HD,
                    const float* inv_freq, const char* label, int block) override {
    compute(
        s, [=] { cpu::rope_forward(F(out), F(inp), B, T, NH, NKV, HD, inv_freq); }, label, block);
  }
  void rope_backward(Stream* s, void* dinp, const void* dout, int B, int T, int NH, int NKV, int HD,
                     const float* inv_freq, const char* label, int block) override {
    compute(
        s, [=] { cpu::rope_backward(F(dinp), F(dout), B, T, NH, NKV, HD, inv_freq); }, label,
        block);
  }
  void attention_forward(Stream* s, void* out, float* lse, const void* qkv, int B, int T, int C,
                         int NH, int NKV, const char* label, int block) override {
    compute(
        s, [=] { cpu::attention_forward(F(out), lse, F(qkv), B, T, C, NH, NKV); }, label, block);
  }
  void attention_backward(Stream* s, void* dqkv, const void* dout, const void* qkv, const void* out,
                          const float* lse, int B, int T, int C, int NH, int NKV, const char* label,
                          int block) override {
    compute(
        s,
        [=] { cpu::attention_backward(F(dqkv), F(dout), F(qkv), F(out), lse, B, T, C, NH, NKV); },
        label, block);
  }
  void classifier(Stream* s, float* losses, void* dx, void* dwte, const void* x, const void* wte,
                  const int* targets, int N, int C, int V, int Vp, float dloss, void* workspace,
                  int chunk_rows, float* mean_loss_host) override {
    compute(
        s,
        [=] {
          *mean_loss_host =
              cpu::classifier_forward_backward(losses, F(dx), F(dwte), F(x), F(wte), targets, N, C,
                                               V, Vp, dloss, F(workspace), chunk_rows);
        },
        "classifier");
  }
  void classifier_logits(Stream* s, float* host_logits, const void* x, const void* wte, int N,
                         int C, int V, int Vp) override {
    compute(
        s, [=] { cpu::classifier_logits(host_logits, F(x), F(wte), N, C, V, Vp); },
        "classifier.logits");
    s->synchronize();
  }

  double sum_squares(Stream* s, const void* g, size_t n) override {
    double out = 0;
    compute(
        s, [&out, g, n] { out = cpu::sum_squares(F(g), n); }, "optimizer.grad_norm");
    s->synchronize();
    return out;
  }
  void adamw(Stream* s, float* master, float* m, float* v, const void* grads, void* params,
             size_t n, const cpu::AdamWParams& p) override {
    compute(
        s,
        [=] {
          cpu::adamw_update(master, m, v, F(grads), n, p);
          // A separate working copy (fp32: the same values).
          if (params && params != master) std::memcpy(params, master, n * sizeof(float));
        },
        "optimizer.adamw");
  }
};

std::mutex g_registry_mu;
CudaBackendHooks g_cuda_hooks;

}  // namespace

Backend* cpu_backend() {
  static CpuBackend backend;
  return &backend;
}

void register_cuda_backend(const CudaBackendHooks& hooks) {
  std::lock_guard<std::mutex> lk(g_registry_mu);
  g_cuda_hooks = hooks;
}

bool cuda_backend_built() {
  std::lock_guard<std::mutex> lk(g_registry_mu);
  return g_cuda_hooks.create != nullptr;
}

int cuda_device_count() {
  CudaBackendHooks h;
  {
    std::lock_guard<std::mutex> lk(g_registry_mu);
    h = g_cuda_hooks;
  }
  return h.device_count ? h.device_count() : 0;
}

BackendChoice choose_backend(const std::string& device, const std::string& dtype) {
  REMAT_REQUIRE(device == "auto" || device == "cpu" || device == "cuda",
                "--device must be auto, cpu or cuda, got '" + device + "'");
  REMAT_REQUIRE(dtype == "auto" || dtype == "fp32" || dtype == "bf16",
                "--dtype must be auto, fp32 or bf16, got '" + dtype + "'");
  BackendChoice r;
  bool cuda = device == "cuda";
  if (device == "auto") {
    if (!cuda_backend_built()) {
      r.note = "device: CPU backend (this remat was built without CUDA)";
    } else if (cuda_device_count() == 0) {
      r.note = "device: CPU backend (no CUDA device found)";
    } else {
      cuda = true;
      r.note = "device: CUDA (a GPU was found; --device cpu forces the CPU backend)";
    }
  }
  if (!cuda) {
    REMAT_REQUIRE(dtype != "bf16",
                  "--dtype bf16 needs the CUDA backend; the CPU backend computes in fp32");
    r.backend = cpu_backend();
    return r;
  }
  REMAT_REQUIRE(cuda_backend_built(),
                "--device cuda: this remat was built without CUDA (no nvcc at configure time); "
                "rebuild with the CUDA toolkit or use --device cpu");
  REMAT_REQUIRE(cuda_device_count() > 0,
                "--device cuda: no CUDA device found (driver or GPU missing); use --device cpu");
  CudaBackendHooks h;
  {
    std::lock_guard<std::mutex> lk(g_registry_mu);
    h = g_cuda_hooks;
  }
  r.owned = h.create(dtype == "fp32" ? ActDType::kFP32 : ActDType::kBF16);
  r.backend = r.owned.get();
  return r;
}

}  // namespace remat
