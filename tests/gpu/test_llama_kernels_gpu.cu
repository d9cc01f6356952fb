// The Llama family's CUDA kernels (RMSNorm, RoPE, SwiGLU, grouped-query attention, the encoder
// without position embedding) against the CPU reference (remat::cpu::...) on fresh random
// inputs, at several sizes including ragged ones, in fp32 and bf16. Outputs are poisoned (NaN)
// before each launch and NaN never passes a comparison.
//
// Tolerances, from principle (as in tests/gpu/gpu_test_util.h):
// - fp32: device and reference sum in different orders (the reference often in double) and
//   the device may fuse a multiply-add. A sum of n fp32 terms drifts by about sqrt(n) 2^-24
//   relative; for the lengths here (<= 16384) that stays under 1e-5, which is asserted
//   (twice that where an output sums two such reductions).
// - bf16: inputs are bf16 values, and both sides compute in fp32 (or double) from them, so
//   what remains is the device's rounding of what it stores in bf16: half an ulp each
//   (ulp = 2^-7 of the magnitude). The fp32 reductions add n 2^-24 relative at most, under
//   n / 65536 bf16 ulps (< 0.25 ulp for n <= 16384): negligible beside one rounding. So a
//   check allows k ulps relative to each element plus k ulps of the array's rms, k being the
//   number of bf16 roundings on the path (derived at each call site).
// - exact: where device and reference do the same IEEE operations (residual add, copies,
//   gathers) the comparison is bitwise.
// Tests need a device and skip without one (saying so); REMAT_GPU_TEST_SMALL=1 keeps only the
// smallest sizes (for compute-sanitizer runs). The shape checks run without a device.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cuda_common.cuh"
#include "kernels/encoder.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/require_gpu.h"

namespace remat {
namespace {

// The shared helpers: element types, sizes(), tolerances, expect_close, DeviceArray, ...
using namespace test;  // NOLINT(build/namespaces): a test file, not a header

// ---------------------------------------------------------------- fixture

template <typename E>
class GpuLlamaKernels : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_present()) REMAT_CUDA_CHECK(cudaStreamCreate(&stream_));
  }
  void TearDown() override {
    if (stream_) cudaStreamDestroy(stream_);
  }
  cudaStream_t stream_ = nullptr;
};

TYPED_TEST_SUITE(GpuLlamaKernels, ElemTypes, ElemNames);

// ---------------------------------------------------------------- checks without a device

TEST(GpuLlamaKernelChecks, ShapeErrorsThrowBeforeAnyLaunch) {
  // Host-side checks run before any CUDA call: no device needed.
  float* f = nullptr;
  bf16* h = nullptr;
  const cudaStream_t s = nullptr;
  // RMSNorm: C % 8, C <= 16384, N >= 0, eps >= 0, residual needs y.
  EXPECT_THROW(cuda::rmsnorm_forward<float>(f, f, f, f, 1, 12, 1e-5f, s), Error);
  EXPECT_THROW(cuda::rmsnorm_forward<bf16>(h, f, h, h, 1, 16392, 1e-5f, s), Error);
  EXPECT_THROW(cuda::rmsnorm_forward<float>(f, f, f, f, -1, 64, 1e-5f, s), Error);
  EXPECT_THROW(cuda::rmsnorm_forward<float>(f, f, f, f, 1, 64, -1.f, s), Error);
  EXPECT_THROW(cuda::residual_rmsnorm_forward<float>(f, f, f, f, nullptr, f, 1, 64, 1e-5f, s),
               Error);
  EXPECT_THROW(cuda::rmsnorm_backward<bf16>(h, h, h, h, h, f, 1, 20, f, s), Error);
  // RoPE: even HD <= 512, NH and NKV positive, theta positive.
  EXPECT_THROW(cuda::rope_forward<float>(f, f, 1, 4, 2, 1, 7, 1e4f, s), Error);
  EXPECT_THROW(cuda::rope_forward<float>(f, f, 1, 4, 2, 0, 8, 1e4f, s), Error);
  EXPECT_THROW(cuda::rope_forward<bf16>(h, h, 1, 4, 2, 1, 1026, 1e4f, s), Error);
  EXPECT_THROW(cuda::rope_backward<bf16>(h, h, 1, 4, 0, 1, 64, 1e4f, s), Error);
  EXPECT_THROW(cuda::rope_backward<float>(f, f, 1, 4, 2, 1, 64, 0.f, s), Error);
  // SwiGLU: I > 0, N >= 0.
  EXPECT_THROW(cuda::swiglu_forward<float>(f, f, 4, 0, s), Error);
  EXPECT_THROW(cuda::swiglu_backward<bf16>(h, h, h, -1, 8, s), Error);
  // Attention: NH % NKV == 0, NKV >= 0.
  EXPECT_THROW(cuda::attention_forward<bf16>(h, f, h, 1, 4, 512, 8, s, 3), Error);
  EXPECT_THROW(cuda::attention_forward<float>(f, f, f, 1, 4, 512, 8, s, -2), Error);
  EXPECT_THROW(cuda::attention_backward<bf16>(h, h, h, h, f, 1, 4, 512, 8, f, s, 3), Error);
  EXPECT_THROW(cuda::attention_backward<float>(f, f, f, f, f, 1, 4, 512, 8, f, s, 16), Error);
}

// ---------------------------------------------------------------- RMSNorm

TYPED_TEST(GpuLlamaKernels, RmsNormMatchesCpuAndBackwardIsDeterministic) {
  REMAT_REQUIRE_GPU();
  using E = TypeParam;
  struct Case {
    int N, C;
  };
  // C = 1000: packs not a multiple of the block (ragged); N > 256: blocks take several rows;
  // C = 12288 and 16384: the backward's largest per-thread pack counts.
  const float eps = 1e-5f;
  for (const Case& c :
       sizes<Case>({{1, 8}, {7, 64}, {130, 1000}, {390, 4096}, {33, 12288}, {3, 16384}}, 2)) {
    const std::string tag = " N=" + std::to_string(c.N) + " C=" + std::to_string(c.C);
    const size_t n = static_cast<size_t>(c.N) * c.C;
    const Vec x = random_elems<E>(n, -2.f, 2.f, 131 + c.C), y = random_elems<E>(n, -1.f, 1.f, 132);
    const Vec w = random_elems<E>(c.C, 0.5f, 1.5f, 133);
    DeviceArray<E> dx(n), dy(n), dw(c.C), dout(n), dres(n), dout2(n);
    DeviceArray<float> drstd(c.N), drstd2(c.N);
    upload(dx, x);
    upload(dy, y);
    upload(dw, w);
    dout.poison();
    drstd.poison();
    cuda::rmsnorm_forward(dout.get(), drstd.get(), dx.get(), dw.get(), c.N, c.C, eps,
                          this->stream_);
    Vec out(n), rstd(c.N);
    cpu::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), c.N, c.C, eps);
    // rstd: an fp32 sum of C squares against a double one (<= 1e-5, see the file comment).
    // out: fp32 math, then one bf16 rounding.
    expect_close("rmsnorm rstd" + tag, download(drstd), rstd, tol<float>(0));
    expect_close("rmsnorm out" + tag, download(dout), out, tol<E>(1));

    // Fused residual: the residual is one fp32 add rounded to E on both sides (bitwise), and the
    // reference normalizes it as stored.
    dres.poison();
    dout.poison();
    drstd.poison();
    cuda::residual_rmsnorm_forward(dres.get(), dout.get(), drstd.get(), dx.get(), dy.get(),
                                   dw.get(), c.N, c.C, eps, this->stream_);
    Vec res(n);
    for (size_t i = 0; i < n; ++i) res[i] = Elem<E>::round(x[i] + y[i]);
    cpu::rmsnorm_forward(out.data(), rstd.data(), res.data(), w.data(), c.N, c.C, eps);
    expect_close("residual" + tag, download(dres), res, kExact);
    expect_close("residual_rmsnorm rstd" + tag, download(drstd), rstd, tol<float>(0));
    expect_close("residual_rmsnorm out" + tag, download(dout), out, tol<E>(1));
    // Contract (recompute relies on it): bitwise equal to rmsnorm_forward on the stored residual.
    dout2.poison();
    drstd2.poison();
    cuda::rmsnorm_forward(dout2.get(), drstd2.get(), dres.get(), dw.get(), c.N, c.C, eps,
                          this->stream_);
    EXPECT_TRUE(bitwise_equal(dout.download_raw(), dout2.download_raw()))
        << "fused residual RMSNorm out differs from the plain one" << tag;
    EXPECT_TRUE(bitwise_equal(drstd.download_raw(), drstd2.download_raw()))
        << "fused residual RMSNorm rstd differs from the plain one" << tag;

    // Backward, from the reference rstd (so only the backward is compared).
    const Vec g = random_elems<E>(n, -1.f, 1.f, 135);
    const Vec dinp0 = random_elems<E>(n, -1.f, 1.f, 136),
              dw0 = random_elems<E>(c.C, -1.f, 1.f, 137);
    DeviceArray<E> dg(n), ddinp(n), ddw(c.C);
    DeviceArray<float> ws(cuda::rmsnorm_backward_workspace_floats(c.N, c.C));
    upload(dg, g);
    drstd.upload_raw(rstd);
    std::vector<E> first[2];
    for (int run = 0; run < 2; ++run) {
      upload(ddinp, dinp0);
      upload(ddw, dw0);
      ws.poison();
      cuda::rmsnorm_backward(ddinp.get(), ddw.get(), dg.get(), dres.get(), dw.get(), drstd.get(),
                             c.N, c.C, ws.get(), this->stream_);
      std::vector<E> now[2] = {ddinp.download_raw(), ddw.download_raw()};
      for (int k = 0; k < 2; ++k) {
        if (run == 0) {
          first[k] = now[k];
        } else {
          EXPECT_TRUE(bitwise_equal(first[k], now[k]))
              << "rmsnorm_backward output " << k << " not deterministic" << tag;
        }
      }
    }
    Vec rdinp = dinp0, rdw = dw0;
    cpu::rmsnorm_backward(rdinp.data(), rdw.data(), g.data(), res.data(), w.data(), rstd.data(),
                          c.N, c.C);
    // dinp: a C-term fp32 row sum, then one rounding of old + delta. dw: N rows summed in fp32
    // partials (two reductions: within and across blocks), then one rounding of old + sum.
    expect_close("rmsnorm_backward dinp" + tag, download(ddinp), rdinp, tol<E>(1));
    expect_close("rmsnorm_backward dw" + tag, download(ddw), rdw, tol<E>(1, 2));
  }
}

// ---------------------------------------------------------------- RoPE

TYPED_TEST(GpuLlamaKernels, RopeMatchesCpu) {
  REMAT_REQUIRE_GPU();
  using E = TypeParam;
  struct Case {
    int B, T, NH, NKV, HD;
  };
  // HD / 2 a multiple of 8: the 16-byte path in both types; HD = 8 (half 4): vectors in fp32
  // only; HD = 10: scalar; T = 4100: large angles (positions up to 4099).
  for (const Case& c : sizes<Case>({{1, 1, 2, 1, 64},
                                    {2, 7, 4, 2, 64},
                                    {1, 5, 2, 2, 8},
                                    {2, 33, 3, 1, 10},
                                    {1, 130, 8, 2, 128},
                                    {1, 4100, 1, 1, 64}},
                                   3)) {
    for (size_t off : {0, 1}) {  // off = 1: unaligned, scalar path
      const std::string tag = " B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) +
                              " NH=" + std::to_string(c.NH) + " NKV=" + std::to_string(c.NKV) +
                              " HD=" + std::to_string(c.HD) + " off=" + std::to_string(off);
      const float theta = 10000.f;
      const size_t W = static_cast<size_t>(c.NH + 2 * c.NKV) * c.HD;
      const size_t rows = static_cast<size_t>(c.B) * c.T, n = rows * W;
      const Vec x = random_elems<E>(n, -2.f, 2.f, 141 + c.T);
      DeviceArray<E> dx(n + 1), dout(n + 1);
      upload(dx, x, off);
      dout.poison();
      cuda::rope_forward(dout.get() + off, dx.get() + off, c.B, c.T, c.NH, c.NKV, c.HD, theta,
                         this->stream_);
      Vec ref(n);
      cpu::rope_forward(ref.data(), x.data(), c.B, c.T, c.NH, c.NKV, c.HD, theta);
      const Vec got = download(dout, n, off);
      // q and k: identical fp32 angles; sincosf against double cos/sin rounded (about an fp32
      // ulp), then one bf16 rounding. v: a copy (bitwise).
      const size_t qk = static_cast<size_t>(c.NH + c.NKV) * c.HD;
      expect_close("rope_forward q,k" + tag, columns(got, rows, W, 0, qk),
                   columns(ref, rows, W, 0, qk), tol<E>(1));
      expect_close("rope_forward v" + tag, columns(got, rows, W, qk, W - qk),
                   columns(ref, rows, W, qk, W - qk), kExact);

      dout.poison();
      cuda::rope_backward(dout.get() + off, dx.get() + off, c.B, c.T, c.NH, c.NKV, c.HD, theta,
                          this->stream_);
      cpu::rope_backward(ref.data(), x.data(), c.B, c.T, c.NH, c.NKV, c.HD, theta);
      const Vec gotb = download(dout, n, off);
      expect_close("rope_backward q,k" + tag, columns(gotb, rows, W, 0, qk),
                   columns(ref, rows, W, 0, qk), tol<E>(1));
      expect_close("rope_backward v" + tag, columns(gotb, rows, W, qk, W - qk),
                   columns(ref, rows, W, qk, W - qk), kExact);
    }
  }
}

// ---------------------------------------------------------------- SwiGLU

TYPED_TEST(GpuLlamaKernels, SwigluMatchesCpu) {
  REMAT_REQUIRE_GPU();
  using E = TypeParam;
  struct Case {
    int N, I;
  };
  // I = 4: vectors in fp32 only; I = 13: scalar; I = 1000 and 2752: the 16-byte path.
  for (const Case& c :
       sizes<Case>({{1, 8}, {3, 4}, {5, 13}, {7, 64}, {130, 1000}, {65, 2752}}, 3)) {
    for (size_t off : {0, 1}) {  // off = 1: unaligned, scalar path
      const std::string tag =
          " N=" + std::to_string(c.N) + " I=" + std::to_string(c.I) + " off=" + std::to_string(off);
      const size_t n_in = static_cast<size_t>(c.N) * 2 * c.I, n_out = n_in / 2;
      Vec x = random_elems<E>(n_in, -6.f, 6.f, 151 + c.I);
      // Saturated gates (exp overflows to inf on one side): finite results, no NaN.
      const float extreme[] = {-100.f, 100.f, -88.f, 88.f};
      for (int k = 0; k < 4 && k < c.I; ++k) x[k] = extreme[k];
      const Vec dy = random_elems<E>(n_out, -1.f, 1.f, 152 + c.I);
      DeviceArray<E> dx(n_in + 1), ddy(n_out + 1), dout(n_out + 1), ddinp(n_in + 1);
      upload(dx, x, off);
      upload(ddy, dy, off);
      dout.poison();
      cuda::swiglu_forward(dout.get() + off, dx.get() + off, c.N, c.I, this->stream_);
      Vec ref(n_out);
      cpu::swiglu_forward(ref.data(), x.data(), c.N, c.I);
      // Same fp32 formula (expf against the device's expf, <= 2 fp32 ulps), one rounding.
      expect_close("swiglu_forward" + tag, download(dout, n_out, off), ref, tol<E>(1));

      ddinp.poison();
      cuda::swiglu_backward(ddinp.get() + off, dx.get() + off, ddy.get() + off, c.N, c.I,
                            this->stream_);
      Vec rdinp(n_in);
      cpu::swiglu_backward(rdinp.data(), x.data(), dy.data(), c.N, c.I);
      const Vec got = download(ddinp, n_in, off);
      const size_t rows = c.N, I = c.I;
      expect_close("swiglu_backward dgate" + tag, columns(got, rows, 2 * I, 0, I),
                   columns(rdinp, rows, 2 * I, 0, I), tol<E>(1));
      expect_close("swiglu_backward dup" + tag, columns(got, rows, 2 * I, I, I),
                   columns(rdinp, rows, 2 * I, I, I), tol<E>(1));
    }
  }
}

// ---------------------------------------------------------------- encoder without wpe

TYPED_TEST(GpuLlamaKernels, EncoderWithoutPositionEmbeddingMatchesCpu) {
  REMAT_REQUIRE_GPU();
  using E = TypeParam;
  const int V = 97, Vp = 104;
  struct Case {
    int B, T, C;
  };
  for (const Case& c : sizes<Case>({{1, 1, 64}, {2, 7, 64}, {3, 130, 200}}, 2)) {
    const int N = c.B * c.T;
    const std::string tag = " B=" + std::to_string(c.B) + " T=" + std::to_string(c.T);
    const Vec wte = random_elems<E>(static_cast<size_t>(Vp) * c.C, -1.f, 1.f, 161);
    const std::vector<int> tokens = random_ints(N, V, 162 + N);
    DeviceArray<E> d_wte(wte.size()), d_out(static_cast<size_t>(N) * c.C);
    DeviceArray<int> d_tok(N);
    upload(d_wte, wte);
    d_tok.upload_raw(tokens);
    d_out.poison();
    cuda::encoder_forward(d_out.get(), d_tok.get(), d_wte.get(), static_cast<const E*>(nullptr),
                          c.B, c.T, c.C, this->stream_);
    Vec ref(static_cast<size_t>(N) * c.C);
    cpu::encoder_forward(ref.data(), tokens.data(), wte.data(), nullptr, c.B, c.T, c.C);
    expect_close("encoder_forward (no wpe)" + tag, download(d_out), ref, kExact);  // a gather

    const Vec dout = random_elems<E>(ref.size(), -1.f, 1.f, 163);
    const Vec dwte0 = random_elems<E>(wte.size(), -1.f, 1.f, 164);
    DeviceArray<E> d_dout(dout.size()), d_dwte(wte.size());
    DeviceArray<char> ws(cuda::encoder_backward_workspace_bytes(c.B, c.T, Vp));
    upload(d_dout, dout);
    upload(d_dwte, dwte0);
    ws.poison();
    cuda::encoder_backward(d_dwte.get(), static_cast<E*>(nullptr), d_dout.get(), d_tok.get(), c.B,
                           c.T, c.C, Vp, ws.get(), this->stream_);
    Vec rwte = dwte0;
    cpu::encoder_backward(rwte.data(), nullptr, dout.data(), tokens.data(), c.B, c.T, c.C);
    // fp32 sums per token; bf16 adds one rounding of (old + sum): 2 ulps as in the GPT-2 test.
    expect_close("encoder_backward dwte (no wpe)" + tag, download(d_dwte), rwte, tol<E>(2));
  }
}

// ---------------------------------------------------------------- grouped-query attention

struct GqaCase {
  int B, T, NH, NKV, HD;
};
std::string gqa_tag(const GqaCase& c) {
  return " B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) + " NH=" + std::to_string(c.NH) +
         " NKV=" + std::to_string(c.NKV) + " HD=" + std::to_string(c.HD);
}

TYPED_TEST(GpuLlamaKernels, GroupedQueryAttentionMatchesCpuAndBackwardIsDeterministic) {
  REMAT_REQUIRE_GPU();
  using E = TypeParam;
  // NH = 8 with NKV 1, 2, 8 (groups 8, 4, 1); HD 64 and 128 (bf16: tensor cores; fp32: the
  // plain kernels); T = 1 and 7 (one ragged tile) and 130 (three tiles, ragged end); HD = 32:
  // the plain kernels in bf16 too.
  std::vector<GqaCase> cases = {{1, 1, 8, 1, 64}, {2, 7, 8, 2, 64}, {1, 7, 8, 8, 128}};
  for (int HD : {64, 128})
    for (int NKV : {1, 2, 8}) cases.push_back({1, 130, 8, NKV, HD});
  cases.push_back({2, 7, 8, 1, 128});
  cases.push_back({1, 70, 8, 2, 32});
  for (const GqaCase& c : sizes<GqaCase>(cases, 3)) {
    const int C = c.NH * c.HD, KV = c.NKV * c.HD, N = c.B * c.T;
    const size_t ld = static_cast<size_t>(C) + 2 * KV;
    const std::string tag = gqa_tag(c);
    const Vec qkv = random_elems<E>(N * ld, -1.5f, 1.5f, 171 + c.T + c.NKV);
    DeviceArray<E> d_qkv(qkv.size()), d_out(static_cast<size_t>(N) * C);
    DeviceArray<float> d_lse(static_cast<size_t>(c.B) * c.NH * c.T);
    upload(d_qkv, qkv);
    d_out.poison();
    d_lse.poison();
    cuda::attention_forward(d_out.get(), d_lse.get(), d_qkv.get(), c.B, c.T, C, c.NH, this->stream_,
                            c.NKV);
    Vec out(d_out.size()), lse(d_lse.size());
    cpu::attention_forward(out.data(), lse.data(), qkv.data(), c.B, c.T, C, c.NH, c.NKV);
    // As in the GPT-2 attention test: scores are exact bf16 products summed in fp32 on both
    // sides (lse to fp32 order differences); out: P rounded to bf16 for P V, then out: 4 ulps.
    expect_close("gqa lse" + tag, download(d_lse), lse, tol<float>(0));
    expect_close("gqa out" + tag, download(d_out), out, tol<E>(4));

    const Vec dout = random_elems<E>(out.size(), -1.f, 1.f, 181 + c.T + c.NKV);
    DeviceArray<E> d_dout(dout.size()), d_dqkv(qkv.size());
    DeviceArray<float> ws(cuda::attention_backward_workspace_floats(c.B, c.T, c.NH));
    upload(d_dout, dout);
    std::vector<E> first;
    for (int run = 0; run < 2; ++run) {
      d_dqkv.poison();
      ws.poison();
      cuda::attention_backward(d_dqkv.get(), d_dout.get(), d_qkv.get(), d_out.get(), d_lse.get(),
                               c.B, c.T, C, c.NH, ws.get(), this->stream_, c.NKV);
      if (run == 0) {
        first = d_dqkv.download_raw();
      } else {
        EXPECT_TRUE(bitwise_equal(first, d_dqkv.download_raw()))
            << "attention_backward not deterministic" << tag;
      }
    }
    Vec dqkv(qkv.size());
    cpu::attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), c.B, c.T,
                            C, c.NH, c.NKV);
    // Each part against its own scale: dk and dv of a kv head sum group x T terms, dq T terms.
    // P and dS enter the tensor-core products rounded to bf16, D comes from the bf16 out, and
    // each gradient is rounded once: 4 ulps (fp32: the sums of up to group x T terms, x2).
    const Vec got = download(d_dqkv);
    const size_t rows = N;
    expect_close("gqa dq" + tag, columns(got, rows, ld, 0, C), columns(dqkv, rows, ld, 0, C),
                 tol<E>(4, 2));
    expect_close("gqa dk" + tag, columns(got, rows, ld, C, KV), columns(dqkv, rows, ld, C, KV),
                 tol<E>(4, 2));
    expect_close("gqa dv" + tag, columns(got, rows, ld, C + KV, KV),
                 columns(dqkv, rows, ld, C + KV, KV), tol<E>(4, 2));
  }
}

// Independent of the CPU reference: a query head sees exactly the keys and values of its kv
// head, so GQA's out, lse and dq are bitwise those of multi-head attention on qkv with each kv
// head repeated for its group (same kernels, same values, same order); NKV = NH and NKV = 0 are
// one code path (bitwise equal everywhere).
TYPED_TEST(GpuLlamaKernels, GroupedQueryAttentionIsMultiHeadOnRepeatedKeysAndValues) {
  REMAT_REQUIRE_GPU();
  using E = TypeParam;
  for (const GqaCase& c : sizes<GqaCase>(
           {{1, 7, 8, 2, 64}, {2, 130, 8, 1, 128}, {1, 130, 8, 4, 64}, {1, 33, 4, 2, 32}}, 1)) {
    const int C = c.NH * c.HD, KV = c.NKV * c.HD, N = c.B * c.T, group = c.NH / c.NKV;
    const size_t ld = static_cast<size_t>(C) + 2 * KV, ld_mha = 3 * static_cast<size_t>(C);
    const std::string tag = gqa_tag(c);
    const Vec qkv = random_elems<E>(N * ld, -1.5f, 1.5f, 191 + c.T);
    Vec mha(N * ld_mha);
    for (int r = 0; r < N; ++r) {
      const float* src = qkv.data() + r * ld;
      float* dst = mha.data() + r * ld_mha;
      std::copy(src, src + C, dst);
      for (int h = 0; h < c.NH; ++h) {
        const int hk = h / group;
        std::copy(src + C + hk * c.HD, src + C + (hk + 1) * c.HD, dst + C + h * c.HD);
        std::copy(src + C + KV + hk * c.HD, src + C + KV + (hk + 1) * c.HD, dst + 2 * C + h * c.HD);
      }
    }
    const Vec dout = random_elems<E>(static_cast<size_t>(N) * C, -1.f, 1.f, 192 + c.T);
    DeviceArray<E> d_qkv(qkv.size()), d_mha(mha.size()), d_dout(dout.size());
    upload(d_qkv, qkv);
    upload(d_mha, mha);
    upload(d_dout, dout);
    DeviceArray<float> ws(cuda::attention_backward_workspace_floats(c.B, c.T, c.NH));
    const size_t n_lse = static_cast<size_t>(c.B) * c.NH * c.T;

    // (out, lse, dqkv) of a forward and backward on `in` (row width `width`) with nkv kv heads.
    struct Result {
      std::vector<E> out, dqkv;
      std::vector<float> lse;
    };
    auto run = [&](const DeviceArray<E>& in, size_t width, int nkv) {
      DeviceArray<E> o(static_cast<size_t>(N) * C), dq(N * width);
      DeviceArray<float> l(n_lse);
      o.poison();
      l.poison();
      dq.poison();
      cuda::attention_forward(o.get(), l.get(), in.get(), c.B, c.T, C, c.NH, this->stream_, nkv);
      cuda::attention_backward(dq.get(), d_dout.get(), in.get(), o.get(), l.get(), c.B, c.T, C,
                               c.NH, ws.get(), this->stream_, nkv);
      return Result{o.download_raw(), dq.download_raw(), l.download_raw()};
    };
    const Result g = run(d_qkv, ld, c.NKV);
    const Result m = run(d_mha, ld_mha, c.NH);
    EXPECT_TRUE(bitwise_equal(g.out, m.out)) << "gqa out differs from mha on repeated kv" << tag;
    EXPECT_TRUE(bitwise_equal(g.lse, m.lse)) << "gqa lse differs from mha on repeated kv" << tag;
    bool dq_same = true;
    for (int r = 0; r < N && dq_same; ++r)
      dq_same = std::memcmp(g.dqkv.data() + r * ld, m.dqkv.data() + r * ld_mha, C * sizeof(E)) == 0;
    EXPECT_TRUE(dq_same) << "gqa dq differs from mha on repeated kv" << tag;

    // NKV = NH spelled out and NKV = 0 (the default): one code path, identical bits.
    const Result a = run(d_mha, ld_mha, 0);
    EXPECT_TRUE(bitwise_equal(a.out, m.out) && bitwise_equal(a.lse, m.lse) &&
                bitwise_equal(a.dqkv, m.dqkv))
        << "NKV = 0 differs from NKV = NH" << tag;
  }
}

}  // namespace
}  // namespace remat
