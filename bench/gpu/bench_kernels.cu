// Kernel benchmark of the CUDA backend (the product's kernels, linked from remat_cuda).
//
// Outline, per op: build inputs, check the result against the CPU reference at a small size
// (the run stops with exit code 1 on a mismatch, before any timing), then time with CUDA
// events, flushing L2 (a memset over twice its size) before every timed launch. Reports
// TFLOP/s for attention and GEMMs, GB/s as a fraction of a device-to-device copy measured in
// the same run for the memory-bound ops. Results go to stdout and to --out (markdown) and
// --csv (name,metric,value,unit lines). Attention: remat's kernels and, when built with
// cuDNN, cuDNN's fused attention ("cudnn attention" rows) on the same shapes and buffers;
// bench/gpu_check.sh times PyTorch SDPA on those shapes beside them.
//
// Usage: gpu_bench_kernels [--out results.md] [--csv results.csv] [--quick]
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/attention.h"
#include "kernels/classifier.h"
#include "kernels/cuda_common.cuh"
#include "kernels/cudnn_attention.h"
#include "kernels/gelu.h"
#include "kernels/layernorm.h"
#include "kernels/matmul.h"

namespace remat {
namespace {

using bf16 = __nv_bfloat16;

// ---------------------------------------------------------------- helpers

template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) {
    REMAT_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)));
  }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
};

std::vector<float> random_vec(size_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = __bfloat162float(__float2bfloat16(d(rng)));  // bf16-exact
  return v;
}
void upload(Dev<bf16>& d, const std::vector<float>& h) {
  std::vector<bf16> t(h.size());
  for (size_t i = 0; i < h.size(); ++i) t[i] = __float2bfloat16(h[i]);
  REMAT_CUDA_CHECK(cudaMemcpy(d.p, t.data(), t.size() * sizeof(bf16), cudaMemcpyHostToDevice));
}
std::vector<float> download(const Dev<bf16>& d, size_t n) {
  std::vector<bf16> t(n);
  REMAT_CUDA_CHECK(cudaDeviceSynchronize());
  REMAT_CUDA_CHECK(cudaMemcpy(t.data(), d.p, n * sizeof(bf16), cudaMemcpyDeviceToHost));
  std::vector<float> h(n);
  for (size_t i = 0; i < n; ++i) h[i] = __bfloat162float(t[i]);
  return h;
}
void fill_random(Dev<bf16>& d, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  upload(d, random_vec(d.n, lo, hi, seed));
}

// Max |got - ref| over rms(ref) must stay within `ulps` bf16 ulps (2^-7): see
// tests/gpu/test_kernels_gpu.cu for the derivation of the tolerances.
bool check(const char* what, const std::vector<float>& got, const std::vector<float>& ref,
           double ulps) {
  double ss = 0, worst = 0;
  for (float r : ref) ss += static_cast<double>(r) * r;
  const double rms = std::sqrt(ss / std::max<size_t>(ref.size(), 1));
  bool ok = got.size() == ref.size();
  for (size_t i = 0; ok && i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - ref[i]);
    if (!(err <= ulps / 128 * (std::fabs(ref[i]) + rms))) ok = false;
    if (!std::isnan(err)) worst = std::max(worst, err);
  }
  std::printf("check %-28s %s (max err %.3g, rms %.3g)\n", what, ok ? "ok" : "FAILED", worst, rms);
  return ok;
}

// Times fn on `stream`: `iters` launches, each after an L2 flush; returns the median in ms.
class Timer {
 public:
  explicit Timer(cudaStream_t s) : s_(s) {
    flush_bytes_ = 2 * static_cast<size_t>(cuda::device_props().l2CacheSize);
    REMAT_CUDA_CHECK(cudaMalloc(&flush_, flush_bytes_));
    REMAT_CUDA_CHECK(cudaEventCreate(&a_));
    REMAT_CUDA_CHECK(cudaEventCreate(&b_));
  }
  ~Timer() {
    cudaFree(flush_);
    cudaEventDestroy(a_);
    cudaEventDestroy(b_);
  }
  double median_ms(const std::function<void()>& fn, int iters) {
    fn();  // warm-up (also cuBLASLt heuristics and workspace)
    REMAT_CUDA_CHECK(cudaStreamSynchronize(s_));
    std::vector<float> ms(iters);
    for (int i = 0; i < iters; ++i) {
      REMAT_CUDA_CHECK(cudaMemsetAsync(flush_, i & 0xFF, flush_bytes_, s_));
      REMAT_CUDA_CHECK(cudaEventRecord(a_, s_));
      fn();
      REMAT_CUDA_CHECK(cudaEventRecord(b_, s_));
      REMAT_CUDA_CHECK(cudaEventSynchronize(b_));
      REMAT_CUDA_CHECK(cudaEventElapsedTime(&ms[i], a_, b_));
    }
    std::sort(ms.begin(), ms.end());
    return ms[iters / 2];
  }

 private:
  cudaStream_t s_;
  void* flush_ = nullptr;
  size_t flush_bytes_ = 0;
  cudaEvent_t a_, b_;
};

struct Row {
  std::string name;  // op and shape
  double ms;         // median time
  double value;      // TFLOP/s or GB/s
  std::string unit;  // "TFLOP/s" or "GB/s"
  double fraction;   // of the copy bandwidth (GB/s rows), < 0 when not applicable
};

// ---------------------------------------------------------------- correctness

bool check_attention(cudaStream_t s) {
  const int B = 1, T = 200, NH = 4, HD = 64, C = NH * HD;
  const size_t n = static_cast<size_t>(B) * T * 3 * C;
  const std::vector<float> qkv = random_vec(n, -1.5f, 1.5f, 1);
  const std::vector<float> dout = random_vec(static_cast<size_t>(B) * T * C, -1.f, 1.f, 2);
  Dev<bf16> d_qkv(n), d_out(B * T * C), d_dout(B * T * C), d_dqkv(n);
  Dev<float> d_lse(B * NH * T), ws(cuda::attention_backward_fused_workspace_floats(B, T, C, NH));
  upload(d_qkv, qkv);
  upload(d_dout, dout);
  cuda::attention_forward(d_out.p, d_lse.p, d_qkv.p, B, T, C, NH, s);
  cuda::attention_backward(d_dqkv.p, d_dout.p, d_qkv.p, d_out.p, d_lse.p, B, T, C, NH, ws.p, s);
  std::vector<float> out(B * T * C), lse(B * NH * T), dqkv(n);
  cpu::attention_forward(out.data(), lse.data(), qkv.data(), B, T, C, NH);
  cpu::attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), B, T, C,
                          NH);
  const bool two_pass = check("attention_forward out", download(d_out, out.size()), out, 4) &
                        check("attention_backward dqkv", download(d_dqkv, n), dqkv, 4);
  // The fused (one-pass, semaphore-ordered dQ) backward, unverified until this passes.
  cuda::attention_backward_fused(d_dqkv.p, d_dout.p, d_qkv.p, d_out.p, d_lse.p, B, T, C, NH, ws.p,
                                 s);
  return two_pass & check("attention_backward_fused dqkv", download(d_dqkv, n), dqkv, 4);
}

#ifdef REMAT_WITH_CUDNN
// cuDNN's fused attention (--attention cudnn) on check_attention's inputs. Its failure (no
// plan on this device, a mismatch) drops only its own rows from the timings.
bool check_cudnn_attention(cuda::CudnnAttention& a, cudaStream_t s) {
  const int B = 1, T = 200, NH = 4, HD = 64, C = NH * HD;
  const size_t n = static_cast<size_t>(B) * T * 3 * C;
  try {
    std::printf("%s\n", cuda::CudnnAttention::version().c_str());
    const std::vector<float> qkv = random_vec(n, -1.5f, 1.5f, 1);
    const std::vector<float> dout = random_vec(static_cast<size_t>(B) * T * C, -1.f, 1.f, 2);
    const size_t fws = a.forward_workspace_bytes(B, T, C, NH),
                 bws = a.backward_workspace_bytes(B, T, C, NH);
    Dev<bf16> d_qkv(n), d_out(B * T * C), d_dout(B * T * C), d_dqkv(n);
    Dev<float> d_lse(B * NH * T);
    Dev<char> fw(fws), bw(bws);
    upload(d_qkv, qkv);
    upload(d_dout, dout);
    a.forward(d_out.p, d_lse.p, d_qkv.p, B, T, C, NH, fw.p, fws, s);
    a.backward(d_dqkv.p, d_dout.p, d_qkv.p, d_out.p, d_lse.p, B, T, C, NH, bw.p, bws, s);
    std::vector<float> out(B * T * C), lse(B * NH * T), dqkv(n);
    cpu::attention_forward(out.data(), lse.data(), qkv.data(), B, T, C, NH);
    cpu::attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), B, T, C,
                            NH);
    // tests/gpu/test_cudnn_attention_gpu.cu: 4 ulps for out, 6 for the gradients.
    return check("cudnn attention_forward out", download(d_out, out.size()), out, 4) &
           check("cudnn attention_backward dqkv", download(d_dqkv, n), dqkv, 6);
  } catch (const std::exception& e) {
    std::printf("check cudnn attention: FAILED: %s\n", e.what());
    return false;
  }
}
#endif

bool check_layernorm(cudaStream_t s) {
  const int N = 64, C = 768;
  const std::vector<float> x = random_vec(N * C, -2.f, 2.f, 3), w = random_vec(C, .5f, 1.5f, 4),
                           b = random_vec(C, -.5f, .5f, 5);
  Dev<bf16> dx(N * C), dw(C), db(C), dout(N * C);
  upload(dx, x);
  upload(dw, w);
  upload(db, b);
  cuda::layernorm_forward(dout.p, static_cast<float*>(nullptr), static_cast<float*>(nullptr), dx.p,
                          dw.p, db.p, N, C, s);
  std::vector<float> out(N * C);
  cpu::layernorm_forward(out.data(), nullptr, nullptr, x.data(), w.data(), b.data(), N, C);
  return check("layernorm_forward", download(dout, out.size()), out, 2);
}

bool check_matmul(cudaStream_t s) {
  const int N = 64, C = 768, OC = 256;
  const std::vector<float> x = random_vec(N * C, -1.f, 1.f, 6),
                           w = random_vec(OC * C, -.036f, .036f, 7), b = random_vec(OC, -1, 1, 8);
  Dev<bf16> dx(N * C), dw(OC * C), db(OC), dout(N * OC), dpre(N * OC);
  upload(dx, x);
  upload(dw, w);
  upload(db, b);
  cuda::matmul_forward(dout.p, dx.p, dw.p, db.p, N, C, OC, s, dpre.p);
  std::vector<float> pre(N * OC), out(N * OC);
  cpu::matmul_forward(pre.data(), x.data(), w.data(), b.data(), N, C, OC);
  cpu::gelu_forward(out.data(), pre.data(), out.size());
  return check("matmul_forward pre_gelu", download(dpre, pre.size()), pre, 2) &
         check("matmul_forward gelu", download(dout, out.size()), out, 4);
}

}  // namespace
}  // namespace remat

int main(int argc, char** argv) {
  using namespace remat;
  std::string out_md = "bench_kernels.md", out_csv = "bench_kernels.csv";
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--out") && i + 1 < argc) {
      out_md = argv[++i];
    } else if (!std::strcmp(argv[i], "--csv") && i + 1 < argc) {
      out_csv = argv[++i];
    } else if (!std::strcmp(argv[i], "--quick")) {
      quick = true;
    } else {
      std::fprintf(stderr, "usage: %s [--out results.md] [--csv results.csv] [--quick]\n", argv[0]);
      return 2;
    }
  }
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    std::fprintf(stderr, "gpu_bench_kernels: no CUDA device\n");
    return 3;
  }
  try {
    const cudaDeviceProp& prop = cuda::device_props();
    std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
                prop.l2CacheSize >> 20);
    cudaStream_t s;
    REMAT_CUDA_CHECK(cudaStreamCreate(&s));
    if (!(check_attention(s) & check_layernorm(s) & check_matmul(s))) {
      std::fprintf(stderr, "gpu_bench_kernels: correctness check failed, nothing timed\n");
      return 1;
    }
#ifdef REMAT_WITH_CUDNN
    cuda::CudnnAttention cudnn;
    const bool cudnn_ok = check_cudnn_attention(cudnn, s);
#else
    const bool cudnn_ok = true;
    std::printf("cudnn attention: not in this build (no cudnn-frontend headers)\n");
#endif
    Timer timer(s);
    const int iters = quick ? 5 : 20;
    std::vector<Row> rows;

    // Device-to-device copy: the roofline of the memory-bound ops (read + write bytes).
    const size_t copy_bytes = 512u << 20;
    double copy_gbs;
    {
      Dev<char> a(copy_bytes), b(copy_bytes);
      const double ms = timer.median_ms(
          [&] {
            REMAT_CUDA_CHECK(cudaMemcpyAsync(b.p, a.p, copy_bytes, cudaMemcpyDeviceToDevice, s));
          },
          iters);
      copy_gbs = 2.0 * copy_bytes / (ms * 1e6);
      rows.push_back({"d2d copy 512 MiB", ms, copy_gbs, "GB/s", 1.0});
    }
    const auto gbs_row = [&](const std::string& name, double ms, double bytes) {
      const double g = bytes / (ms * 1e6);
      rows.push_back({name, ms, g, "GB/s", g / copy_gbs});
    };

    // Attention, C 768 causal, 8192 tokens per call: GPT-2 124M heads (NH 12, HD 64) and HD 128
    // (NH 6). The backward twice: two-pass (default) and fused (one pass, ordered dQ adds).
    const int attn_shapes[][2] = {{1024, 64}, {4096, 64}, {1024, 128}, {4096, 128}};  // T, HD
    for (const auto& shape_t_hd : attn_shapes) {
      const int T = shape_t_hd[0], HD = shape_t_hd[1], NH = 768 / HD, C = NH * HD, B = 8192 / T;
      const size_t n = static_cast<size_t>(B) * T * 3 * C;
      Dev<bf16> qkv(n), out(static_cast<size_t>(B) * T * C), dout(out.n), dqkv(n);
      Dev<float> lse(static_cast<size_t>(B) * NH * T),
          ws(cuda::attention_backward_fused_workspace_floats(B, T, C, NH));
      fill_random(qkv, 9);
      fill_random(dout, 10);
      const double flops = 4.0 * B * T * static_cast<double>(T) * NH * HD / 2;  // causal
      const double fwd = timer.median_ms(
          [&] { cuda::attention_forward(out.p, lse.p, qkv.p, B, T, C, NH, s); }, iters);
      const double bwd = timer.median_ms(
          [&] {
            cuda::attention_backward(dqkv.p, dout.p, qkv.p, out.p, lse.p, B, T, C, NH, ws.p, s);
          },
          iters);
      const double fused = timer.median_ms(
          [&] {
            cuda::attention_backward_fused(dqkv.p, dout.p, qkv.p, out.p, lse.p, B, T, C, NH, ws.p,
                                           s);
          },
          iters);
      const std::string shape = " B=" + std::to_string(B) + " T=" + std::to_string(T) +
                                " NH=" + std::to_string(NH) + " HD=" + std::to_string(HD) +
                                " causal";
      rows.push_back({"attention fwd" + shape, fwd, flops / (fwd * 1e9), "TFLOP/s", -1});
      rows.push_back({"attention bwd" + shape, bwd, 2.5 * flops / (bwd * 1e9), "TFLOP/s", -1});
      rows.push_back(
          {"attention bwd fused" + shape, fused, 2.5 * flops / (fused * 1e9), "TFLOP/s", -1});
#ifdef REMAT_WITH_CUDNN
      if (cudnn_ok) {  // cuDNN's on the same buffers, its deterministic backward
        const size_t fws = cudnn.forward_workspace_bytes(B, T, C, NH),
                     bws = cudnn.backward_workspace_bytes(B, T, C, NH);
        Dev<char> fw(fws), bw(bws);
        const double cf = timer.median_ms(
            [&] { cudnn.forward(out.p, lse.p, qkv.p, B, T, C, NH, fw.p, fws, s); }, iters);
        const double cb = timer.median_ms(
            [&] { cudnn.backward(dqkv.p, dout.p, qkv.p, out.p, lse.p, B, T, C, NH, bw.p, bws, s); },
            iters);
        rows.push_back({"cudnn attention fwd" + shape, cf, flops / (cf * 1e9), "TFLOP/s", -1});
        rows.push_back(
            {"cudnn attention bwd" + shape, cb, 2.5 * flops / (cb * 1e9), "TFLOP/s", -1});
      }
#endif
    }

    const int N = 8192, C = 768;
    // LayerNorm, bf16 rows of 768.
    {
      Dev<bf16> x(N * C), w(C), b(C), out(N * C), dout(N * C), dinp(N * C), dw(C), db(C);
      Dev<float> mean(N), rstd(N), ws(cuda::layernorm_backward_workspace_floats(N, C));
      fill_random(x, 11);
      fill_random(w, 12);
      fill_random(b, 13);
      fill_random(dout, 14);
      const double fwd = timer.median_ms(
          [&] { cuda::layernorm_forward(out.p, mean.p, rstd.p, x.p, w.p, b.p, N, C, s); }, iters);
      gbs_row("layernorm fwd N=8192 C=768", fwd, 2.0 * N * C * 2 + 8.0 * N);
      const double bwd = timer.median_ms(
          [&] {
            cuda::layernorm_backward(dinp.p, dw.p, db.p, dout.p, x.p, w.p, mean.p, rstd.p, N, C,
                                     ws.p, s);
          },
          iters);
      gbs_row("layernorm bwd N=8192 C=768", bwd, 4.0 * N * C * 2 + 8.0 * N);
    }
    // GeLU forward over (N, 4C).
    {
      const size_t n = static_cast<size_t>(N) * 4 * C;
      Dev<bf16> x(n), y(n);
      fill_random(x, 15);
      const double ms = timer.median_ms([&] { cuda::gelu_forward(y.p, x.p, n, s); }, iters);
      gbs_row("gelu fwd n=8192x3072", ms, 4.0 * n);
    }
    // AdamW over GPT-2 124M's parameter count: 28 bytes per parameter.
    {
      const size_t n = 124439808;
      Dev<float> master(n), m(n), v(n);
      Dev<bf16> g(n), p(n);
      REMAT_CUDA_CHECK(cudaMemset(master.p, 0, n * 4));
      REMAT_CUDA_CHECK(cudaMemset(m.p, 0, n * 4));
      REMAT_CUDA_CHECK(cudaMemset(v.p, 0, n * 4));
      REMAT_CUDA_CHECK(cudaMemset(g.p, 0, n * 2));
      const cpu::AdamWParams hp{6e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1, 1.f};
      const double ms = timer.median_ms(
          [&] { cuda::adamw_update(master.p, m.p, v.p, g.p, p.p, n, hp, nullptr, s); }, iters);
      gbs_row("adamw n=124.4M", ms, 28.0 * n);
    }
    // GEMM with the GeLU epilogue (GPT-2 fc layer) and the fused classifier.
    {
      const int OC = 4 * C;
      Dev<bf16> x(N * C), w(static_cast<size_t>(OC) * C), b(OC), pre(static_cast<size_t>(N) * OC),
          out(pre.n);
      fill_random(x, 16);
      fill_random(w, 17, -.03f, .03f);
      fill_random(b, 18);
      const double ms = timer.median_ms(
          [&] { cuda::matmul_forward(out.p, x.p, w.p, b.p, N, C, OC, s, pre.p); }, iters);
      rows.push_back(
          {"matmul fwd+bias+gelu 8192x768x3072", ms, 2.0 * N * C * OC / (ms * 1e9), "TFLOP/s", -1});
    }
    {
      const int V = 50257, Vp = 50304, chunk = N;
      Dev<bf16> x(N * C), wte(static_cast<size_t>(Vp) * C), dx(N * C), dwte(wte.n),
          ws(cuda::classifier_workspace_elems(chunk, Vp));
      Dev<int> targets(N);
      Dev<float> losses(N), mean(1);
      fill_random(x, 19);
      fill_random(wte, 20, -.05f, .05f);
      REMAT_CUDA_CHECK(cudaMemset(targets.p, 0, N * sizeof(int)));
      REMAT_CUDA_CHECK(cudaMemset(dwte.p, 0, dwte.n * 2));
      const double fb = timer.median_ms(
          [&] {
            cuda::classifier_forward_backward(losses.p, dx.p, dwte.p, x.p, wte.p, targets.p, N, C,
                                              V, Vp, 1.f / N, ws.p, chunk, s, mean.p);
          },
          quick ? 3 : 10);
      rows.push_back(
          {"classifier fwd+bwd N=8192 V=50257", fb, 6.0 * N * C * V / (fb * 1e9), "TFLOP/s", -1});
      const double f = timer.median_ms(
          [&] {
            cuda::classifier_forward_backward(losses.p, static_cast<bf16*>(nullptr),
                                              static_cast<bf16*>(nullptr), x.p, wte.p, targets.p, N,
                                              C, V, Vp, 1.f / N, ws.p, chunk, s, mean.p);
          },
          quick ? 3 : 10);
      const double g = timer.median_ms(
          [&] {
            cuda::gemm(cpu::Trans::kNo, cpu::Trans::kYes, N, V, C, x.p, C, wte.p, C, 0.f, ws.p, Vp,
                       s);
          },
          quick ? 3 : 10);
      // The fused softmax/loss kernel alone, derived: forward minus its logits GEMM. It reads
      // the logits once (forward only).
      if (f > g) gbs_row("classifier softmax/loss (fwd - gemm)", f - g, 2.0 * N * Vp);
    }

    // Report.
    std::FILE* md = std::fopen(out_md.c_str(), "w");
    std::FILE* csv = std::fopen(out_csv.c_str(), "w");
    if (!md || !csv) {
      std::fprintf(stderr, "gpu_bench_kernels: cannot write %s / %s\n", out_md.c_str(),
                   out_csv.c_str());
      return 1;
    }
    std::fprintf(
        md, "device: %s\n\n| op | median ms | rate | of copy BW |\n| --- | --- | --- | --- |\n",
        prop.name);
    std::printf("\n%-46s %10s %14s %10s\n", "op", "ms", "rate", "of copy");
    for (const Row& r : rows) {
      char frac[32] = "";
      if (r.fraction >= 0) std::snprintf(frac, sizeof frac, "%.0f%%", 100 * r.fraction);
      std::printf("%-46s %10.3f %8.1f %-7s %8s\n", r.name.c_str(), r.ms, r.value, r.unit.c_str(),
                  frac);
      std::fprintf(md, "| %s | %.3f | %.1f %s | %s |\n", r.name.c_str(), r.ms, r.value,
                   r.unit.c_str(), frac);
      std::fprintf(csv, "%s,%.4f,%.2f,%s,%.3f\n", r.name.c_str(), r.ms, r.value, r.unit.c_str(),
                   r.fraction);
    }
    std::fclose(md);
    std::fclose(csv);
    cuda::matmul_release_workspaces();
    REMAT_CUDA_CHECK(cudaStreamDestroy(s));
    if (!cudnn_ok) {
      std::fprintf(stderr, "gpu_bench_kernels: cuDNN attention check failed (its rows omitted)\n");
      return 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpu_bench_kernels: %s\n", e.what());
    return 1;
  }
  return 0;
}
