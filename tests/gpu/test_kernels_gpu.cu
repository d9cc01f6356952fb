// Every CUDA kernel against the CPU reference (remat::cpu::...) on fresh random inputs, at
// several sizes including ragged ones, in fp32 and bf16. Outputs are poisoned (NaN) before
// each launch and NaN never passes a comparison.
//
// Tolerances, from principle:
// - fp32: the device and the reference sum in different orders (and the device may fuse a
//   multiply-add); for the reduction lengths used here (<= a few hundred terms per output)
//   that stays near 1e-6 relative, and 1e-5 is asserted.
// - bf16: the reference runs in fp32 on the same bf16-rounded inputs, so what is left is the
//   device's rounding of what it stores in bf16. One rounding is at most half a bf16 ulp
//   (ulp = 2^-7 of the magnitude, 8 significant bits). A check allows `k` ulps relative to
//   each element plus `k` ulps of the array's rms (a rounded intermediate contributes error
//   in units of the terms, not of a result that cancels to near zero); k counts the bf16
//   roundings on the path (derived at each call site).
// Tests need a device and skip without one (saying so); REMAT_GPU_TEST_SMALL=1 keeps only the
// smallest sizes (for compute-sanitizer runs).
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

#include "kernels/adamw.h"
#include "kernels/attention.h"
#include "kernels/classifier.h"
#include "kernels/cuda_common.cuh"
#include "kernels/encoder.h"
#include "kernels/gelu.h"
#include "kernels/gradnorm.h"
#include "kernels/layernorm.h"
#include "kernels/matmul.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/require_gpu.h"

namespace remat {
namespace {

// The shared helpers: element types, sizes(), tolerances, expect_close, DeviceArray, ...
using namespace test;  // NOLINT(build/namespaces): a test file, not a header

// ---------------------------------------------------------------- fixture

template <typename E>
class GpuKernels : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_present()) REMAT_CUDA_CHECK(cudaStreamCreate(&stream_));
  }
  // The stream's cuBLASLt workspace goes with it (a later stream may get the same handle).
  void TearDown() override {
    if (stream_) {
      cuda::matmul_release_workspace(stream_);
      cudaStreamDestroy(stream_);
    }
  }
  cudaStream_t stream_ = nullptr;
};

TYPED_TEST_SUITE(GpuKernels, ElemTypes, ElemNames);

// ---------------------------------------------------------------- checks without a device

TEST(GpuKernelChecks, CheckMacrosThrowWithStatementAndLocation) {
  try {
    REMAT_CUDA_CHECK(cudaErrorInvalidValue);
    FAIL() << "no exception";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("cudaErrorInvalidValue"), std::string::npos) << msg;
    EXPECT_NE(msg.find("test_kernels_gpu.cu:"), std::string::npos) << msg;
  }
  EXPECT_THROW(REMAT_CUBLAS_CHECK(CUBLAS_STATUS_NOT_SUPPORTED), Error);
}

TEST(GpuKernelChecks, ShapeErrorsThrowBeforeAnyLaunch) {
  // Host-side shape checks run before any CUDA call: no device needed.
  float* f = nullptr;
  EXPECT_THROW(cuda::layernorm_forward<float>(f, f, f, f, f, f, 1, 7, nullptr), Error);
  EXPECT_THROW(cuda::matmul_forward<float>(f, f, f, f, 1, 0, 8, nullptr), Error);
  EXPECT_THROW(cuda::attention_forward<float>(f, f, f, 1, 4, 10, 3, nullptr), Error);
  EXPECT_THROW(cuda::encoder_forward<float>(f, nullptr, f, f, 1, 1, 12, nullptr), Error);
  EXPECT_THROW(cuda::classifier_logits<float>(f, f, f, 1, 8, 10, 9, nullptr), Error);
}

// ---------------------------------------------------------------- GeLU

TYPED_TEST(GpuKernels, GeluMatchesCpu) {
  REMAT_REQUIRE_GPU();
  using E = TypeParam;
  for (size_t n : sizes<size_t>({1, 7, 1000, 4099}, 2)) {
    for (size_t off : {0, 1}) {  // off = 1: unaligned, scalar path
      const Vec x = random_elems<E>(n, -5.f, 5.f, 11 + n);
      const Vec dy = random_elems<E>(n, -1.f, 1.f, 12 + n);
      DeviceArray<E> dx(n + 1), ddy(n + 1), dout(n + 1);
      upload(dx, x, off);
      upload(ddy, dy, off);
      dout.poison();
      cuda::gelu_forward(dout.get() + off, dx.get() + off, n, this->stream_);
      Vec ref(n);
      cpu::gelu_forward(ref.data(), x.data(), n);
      // One rounding of the output (<= 1/2 ulp); 1 ulp asserted.
      expect_close("gelu_forward n=" + std::to_string(n), download(dout, n, off), ref, tol<E>(1));

      dout.poison();
      cuda::gelu_backward(dout.get() + off, dx.get() + off, ddy.get() + off, n, this->stream_);
      cpu::gelu_backward(ref.data(), x.data(), dy.data(), n);
      expect_close("gelu_backward n=" + std::to_string(n), download(dout, n, off), ref, tol<E>(1));
    }
  }
}

// ---------------------------------------------------------------- encoder

TYPED_TEST(GpuKernels, EncoderMatchesCpuAndBackwardIsDeterministic) {
  REMAT_REQUIRE_GPU();
  using E = TypeParam;
  struct Case {
    int B, T, C;
    int V, Vp;       // vocabulary, padded: Vp - 1 of 7, 16 and 17 bits (1, 2, 3 sort passes)
    bool one_token;  // every position the same token: one big bucket
  };
  // B T = 65536 of one token: the issue's case (seconds when the sort was quadratic).
  for (const Case& c : sizes<Case>({{1, 1, 64, 97, 104, false},
                                    {2, 7, 64, 97, 104, false},
                                    {3, 130, 200, 97, 104, false},
                                    {2, 130, 64, 97, 104, true},
                                    {4, 1024, 64, 50257, 50304, false},
                                    {2, 300, 64, 70001, 70008, false},
                                    {64, 1024, 64, 50257, 50304, true}},
                                   2)) {
    const int N = c.B * c.T, V = c.V, Vp = c.Vp;
    const std::string tag = " B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) +
                            " Vp=" + std::to_string(Vp) + (c.one_token ? " one token" : "");
    const Vec wte = random_elems<E>(static_cast<size_t>(Vp) * c.C, -1.f, 1.f, 21);
    const Vec wpe = random_elems<E>(static_cast<size_t>(c.T) * c.C, -1.f, 1.f, 22);
    std::vector<int> tokens = random_ints(N, V, 23 + N);
    if (c.one_token) std::fill(tokens.begin(), tokens.end(), 5);
    DeviceArray<E> d_wte(wte.size()), d_wpe(wpe.size()), d_out(static_cast<size_t>(N) * c.C);
    DeviceArray<int> d_tok(N);
    upload(d_wte, wte);
    upload(d_wpe, wpe);
    d_tok.upload_raw(tokens);
    d_out.poison();
    cuda::encoder_forward(d_out.get(), d_tok.get(), d_wte.get(), d_wpe.get(), c.B, c.T, c.C,
                          this->stream_);
    Vec ref(static_cast<size_t>(N) * c.C);
    cpu::encoder_forward(ref.data(), tokens.data(), wte.data(), wpe.data(), c.B, c.T, c.C);
    // fp32: the same single add (bitwise); bf16: one rounding.
    const Tol exact_in_fp32 = std::is_same_v<E, float> ? kExact : tol<E>(1);
    expect_close("encoder_forward" + tag, download(d_out), ref, exact_in_fp32);

    const Vec dout = random_elems<E>(ref.size(), -1.f, 1.f, 24);
    const Vec dwte0 = random_elems<E>(wte.size(), -1.f, 1.f, 25);
    const Vec dwpe0 = random_elems<E>(wpe.size(), -1.f, 1.f, 26);
    DeviceArray<E> d_dout(dout.size()), d_dwte(wte.size()), d_dwpe(wpe.size());
    DeviceArray<char> ws(cuda::encoder_backward_workspace_bytes(c.B, c.T, Vp));
    upload(d_dout, dout);
    std::vector<E> first_wte, first_wpe;
    for (int run = 0; run < 2; ++run) {
      upload(d_dwte, dwte0);
      upload(d_dwpe, dwpe0);
      ws.poison();
      cuda::encoder_backward(d_dwte.get(), d_dwpe.get(), d_dout.get(), d_tok.get(), c.B, c.T, c.C,
                             Vp, ws.get(), this->stream_);
      if (run == 0) {
        first_wte = d_dwte.download_raw();
        first_wpe = d_dwpe.download_raw();
      } else {
        EXPECT_TRUE(bitwise_equal(first_wte, d_dwte.download_raw())) << "dwte not deterministic";
        EXPECT_TRUE(bitwise_equal(first_wpe, d_dwpe.download_raw())) << "dwpe not deterministic";
      }
    }
    Vec rwte = dwte0, rwpe = dwpe0;
    cpu::encoder_backward(rwte.data(), rwpe.data(), dout.data(), tokens.data(), c.B, c.T, c.C);
    // fp32: the CPU reference's additions in its order (contract): bitwise. bf16: the fp32
    // sum (old value first) rounded once; the reference keeps fp32: 2 ulps asserted.
    const Tol bwd_tol = std::is_same_v<E, float> ? kExact : tol<E>(2);
    expect_close("encoder_backward dwte" + tag, download(d_dwte), rwte, bwd_tol);
    expect_close("encoder_backward dwpe" + tag, download(d_dwpe), rwpe, bwd_tol);
  }
}

// ---------------------------------------------------------------- LayerNorm

TYPED_TEST(GpuKernels, LayerNormMatchesCpuAndBackwardIsDeterministic) {
  REMAT_REQUIRE_GPU();
  using E = TypeParam;
  struct Case {
    int N, C;
  };
  // A row is one warp up to C = 1024 (bf16) / 2048 (fp32 forward), a group of warps beyond:
  // C = 8 leaves most lanes idle; 1600 and 4096 take 2 and 4 warps a row (several row groups
  // per block, combined in the backward through shared memory); 12288 and 16384 take 12 and
  // 16 warps (one group per block, 384 and 512 threads); N = 2100 makes the backward's row
  // groups take several rows each. Small mode keeps a 4-warp row so that the sanitizers see
  // the named barriers and the combine.
  for (const Case& c : sizes<Case>({{1, 64},
                                    {7, 64},
                                    {3, 4096},
                                    {9, 8},
                                    {390, 768},
                                    {130, 1600},
                                    {2100, 64},
                                    {33, 4096},
                                    {5, 12288},
                                    {3, 16384}},
                                   3)) {
    const std::string tag = " N=" + std::to_string(c.N) + " C=" + std::to_string(c.C);
    const size_t n = static_cast<size_t>(c.N) * c.C;
    const Vec x = random_elems<E>(n, -2.f, 2.f, 31 + c.C), y = random_elems<E>(n, -1.f, 1.f, 32);
    const Vec w = random_elems<E>(c.C, 0.5f, 1.5f, 33), b = random_elems<E>(c.C, -.5f, .5f, 34);
    DeviceArray<E> dx(n), dy(n), dw(c.C), db(c.C), dout(n), dres(n), dout2(n);
    DeviceArray<float> dmean(c.N), drstd(c.N), dmean2(c.N), drstd2(c.N);
    upload(dx, x);
    upload(dy, y);
    upload(dw, w);
    upload(db, b);
    dout.poison();
    dmean.poison();
    drstd.poison();
    cuda::layernorm_forward(dout.get(), dmean.get(), drstd.get(), dx.get(), dw.get(), db.get(), c.N,
                            c.C, this->stream_);
    Vec out(n), mean(c.N), rstd(c.N);
    cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), c.N,
                           c.C);
    // Statistics are fp32 on both sides; the output takes one rounding after fp32 math.
    expect_close("layernorm mean" + tag, download(dmean), mean, tol<float>(0));
    expect_close("layernorm rstd" + tag, download(drstd), rstd, tol<float>(0));
    expect_close("layernorm out" + tag, download(dout), out, tol<E>(2));

    // Fused residual: the reference LayerNorms the residual as stored (rounded to E).
    dres.poison();
    dout.poison();
    dmean.poison();
    drstd.poison();
    cuda::residual_layernorm_forward(dres.get(), dout.get(), dmean.get(), drstd.get(), dx.get(),
                                     dy.get(), dw.get(), db.get(), c.N, c.C, this->stream_);
    Vec res(n);
    for (size_t i = 0; i < n; ++i) res[i] = Elem<E>::round(x[i] + y[i]);
    cpu::layernorm_forward(out.data(), mean.data(), rstd.data(), res.data(), w.data(), b.data(),
                           c.N, c.C);
    expect_close("residual" + tag, download(dres), res, tol<E>(1));
    expect_close("residual_layernorm out" + tag, download(dout), out, tol<E>(2));
    // Contract (recompute relies on it): bitwise equal to layernorm_forward on the stored
    // residual, statistics included.
    dout2.poison();
    dmean2.poison();
    drstd2.poison();
    cuda::layernorm_forward(dout2.get(), dmean2.get(), drstd2.get(), dres.get(), dw.get(), db.get(),
                            c.N, c.C, this->stream_);
    EXPECT_TRUE(bitwise_equal(dout.download_raw(), dout2.download_raw()))
        << "fused residual LayerNorm differs from the plain one" << tag;
    EXPECT_TRUE(bitwise_equal(dmean.download_raw(), dmean2.download_raw()) &&
                bitwise_equal(drstd.download_raw(), drstd2.download_raw()))
        << "fused residual LayerNorm statistics differ from the plain one's" << tag;

    // Backward, from the reference statistics (so only the backward is compared).
    const Vec g = random_elems<E>(n, -1.f, 1.f, 35);
    const Vec dinp0 = random_elems<E>(n, -1.f, 1.f, 36);
    const Vec dw0 = random_elems<E>(c.C, -1.f, 1.f, 37), db0 = random_elems<E>(c.C, -1.f, 1.f, 38);
    DeviceArray<E> dg(n), ddinp(n), ddw(c.C), ddb(c.C);
    DeviceArray<float> ws(cuda::layernorm_backward_workspace_floats(c.N, c.C));
    upload(dg, g);
    dmean.upload_raw(mean);
    drstd.upload_raw(rstd);
    std::vector<E> first[3];
    for (int run = 0; run < 2; ++run) {
      upload(ddinp, dinp0);
      upload(ddw, dw0);
      upload(ddb, db0);
      ws.poison();
      cuda::layernorm_backward(ddinp.get(), ddw.get(), ddb.get(), dg.get(), dres.get(), dw.get(),
                               dmean.get(), drstd.get(), c.N, c.C, ws.get(), this->stream_);
      std::vector<E> now[3] = {ddinp.download_raw(), ddw.download_raw(), ddb.download_raw()};
      for (int k = 0; k < 3; ++k) {
        if (run == 0) {
          first[k] = now[k];
        } else {
          EXPECT_TRUE(bitwise_equal(first[k], now[k]))
              << "layernorm_backward output " << k << " not deterministic" << tag;
        }
      }
    }
    Vec rdinp = dinp0, rdw = dw0, rdb = db0;
    cpu::layernorm_backward(rdinp.data(), rdw.data(), rdb.data(), g.data(), res.data(), w.data(),
                            mean.data(), rstd.data(), c.N, c.C);
    // One rounding of old + delta; dw/db sum N rows in fp32 (N <= 2100 here: sqrt(N) 2^-24
    // relative, far under 1e-5).
    expect_close("layernorm_backward dinp" + tag, download(ddinp), rdinp, tol<E>(2));
    expect_close("layernorm_backward dw" + tag, download(ddw), rdw, tol<E>(2));
    expect_close("layernorm_backward db" + tag, download(ddb), rdb, tol<E>(2));
  }
}

// ---------------------------------------------------------------- matmul (cuBLASLt)

// The GeLU fusion a matmul took (cuBLASLt epilogue or the GEMM + GeLU-kernel fallback): said
// on stdout and recorded as a test property, so a run shows which path its tolerances judged.
// A GeLU-fused call must say which way it went.
const char* report_gelu_fusion(const std::string& what) {
  const cuda::GeluFusion f = cuda::matmul_last_gelu_fusion();
  EXPECT_NE(f, cuda::GeluFusion::kNone) << what << ": no GeLU path recorded";
  const char* name = f == cuda::GeluFusion::kEpilogue   ? "cuBLASLt epilogue"
                     : f == cuda::GeluFusion::kFallback ? "GEMM + GeLU kernel (fallback)"
                                                        : "none";
  std::printf("[  GeLU    ] %s: %s\n", what.c_str(), name);
  ::testing::Test::RecordProperty(what, name);
  return name;
}

// cuBLASLt's GeLU epilogues compute the tanh form of GeLU (the one kernels/gelu.h and the CPU
// reference use) on the fp32 accumulator, with a tanh of unpublished accuracy; assume that of
// the hardware's fast tanh (tanh.approx.f32, PTX ISA: relative error 2^-10.987), rounded up to
// |dtanh| <= 2^-10 (2x margin). Then
//   forward   |d gelu(x)| = 0.5 |x| |dtanh| <= 2^-11 |x|:  asserted 2^-11 max|pre|;
//   backward  gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) u'(x), u' = sqrt(2/pi)(1 + 0.134145 x^2),
//             so |d gelu'| <= 2^-10 (0.5 + |x| u'(|x|)), times |dout @ w|.
// When the epilogue ran, that error is added to the rounding allowance, in both types.
constexpr double kEpilogueTanhErr = 1.0 / 1024;  // 2^-10
double epilogue_dgelu_err(double max_x) {
  const double du = 0.7978845608028654 * (1 + 3 * 0.044715 * max_x * max_x);
  return kEpilogueTanhErr * (0.5 + max_x * du);
}
// t with its abs part in units of `scale`, plus an absolute allowance `extra`: compare with
// scale 1.
Tol plus_abs(Tol t, double scale, double extra) {
  return {t.rel, t.abs * scale + extra};
}

TYPED_TEST(GpuKernels, MatmulMatchesCpu) {
  REMAT_REQUIRE_GPU();
  using E = TypeParam;
  struct Case {
    int N, C, OC;
  };
  for (const Case& c : sizes<Case>({{1, 64, 192}, {7, 136, 40}, {390, 64, 256}}, 2)) {
    for (bool use_bias : {false, true}) {
      for (bool use_gelu : {false, true}) {
        const std::string tag = " N=" + std::to_string(c.N) + " C=" + std::to_string(c.C) +
                                " OC=" + std::to_string(c.OC) + (use_bias ? " bias" : "") +
                                (use_gelu ? " gelu" : "");
        const float ws = 1.f / std::sqrt(static_cast<float>(c.C));
        const Vec inp = random_elems<E>(static_cast<size_t>(c.N) * c.C, -1.f, 1.f, 41);
        const Vec w = random_elems<E>(static_cast<size_t>(c.OC) * c.C, -ws, ws, 42);
        const Vec bias = random_elems<E>(c.OC, -1.f, 1.f, 43);
        DeviceArray<E> d_inp(inp.size()), d_w(w.size()), d_b(c.OC);
        DeviceArray<E> d_out(static_cast<size_t>(c.N) * c.OC), d_pre(d_out.size());
        upload(d_inp, inp);
        upload(d_w, w);
        upload(d_b, bias);
        d_out.poison();
        d_pre.poison();
        cuda::matmul_forward(d_out.get(), d_inp.get(), d_w.get(), use_bias ? d_b.get() : nullptr,
                             c.N, c.C, c.OC, this->stream_, use_gelu ? d_pre.get() : nullptr);
        Vec pre(d_out.size());
        cpu::matmul_forward(pre.data(), inp.data(), w.data(), use_bias ? bias.data() : nullptr, c.N,
                            c.C, c.OC);
        if (!use_gelu) {
          // fp32 accumulation, one rounding of the output.
          expect_close("matmul_forward" + tag, download(d_out), pre, tol<E>(2));
        } else {
          const bool epilogue = cuda::matmul_last_gelu_fusion() == cuda::GeluFusion::kEpilogue;
          report_gelu_fusion("matmul_forward" + tag);
          Vec out(pre.size());
          cpu::gelu_forward(out.data(), pre.data(), pre.size());
          expect_close("matmul_forward pre_gelu" + tag, download(d_pre), pre, tol<E>(2));
          // gelu of the fp32 (epilogue) or rounded (fallback) pre-activation, then a rounding:
          // |gelu'| <= 1.13, so the pre rounding counts in units of |pre|: scale = rms(pre).
          // Through the epilogue, plus its tanh's error (kEpilogueTanhErr): 2^-11 max|pre|.
          const double extra = epilogue ? kEpilogueTanhErr / 2 * max_abs(pre) : 0.0;
          expect_close("matmul_forward gelu" + tag, download(d_out), out,
                       plus_abs(tol<E>(2), rms(pre), extra), 1.0);
        }

        // Backward; with use_gelu, inp is taken as gelu(pre_in) and dinp goes through GeLU.
        const Vec dout = random_elems<E>(d_out.size(), -1.f, 1.f, 44);
        const Vec pre_in = random_elems<E>(inp.size(), -3.f, 3.f, 45);
        const Vec dw0 = random_elems<E>(w.size(), -1.f, 1.f, 46);
        const Vec db0 = random_elems<E>(c.OC, -1.f, 1.f, 47);
        DeviceArray<E> d_dout(dout.size()), d_prein(inp.size()), d_dinp(inp.size());
        DeviceArray<E> d_dw(w.size()), d_db(c.OC);
        upload(d_dout, dout);
        upload(d_prein, pre_in);
        upload(d_dw, dw0);
        upload(d_db, db0);
        d_dinp.poison();
        cuda::matmul_backward(d_dinp.get(), d_dw.get(), use_bias ? d_db.get() : nullptr,
                              d_dout.get(), d_inp.get(), d_w.get(), c.N, c.C, c.OC, this->stream_,
                              use_gelu ? d_prein.get() : nullptr);
        const bool dgelu_epilogue =
            use_gelu && cuda::matmul_last_gelu_fusion() == cuda::GeluFusion::kEpilogue;
        if (use_gelu) report_gelu_fusion("matmul_backward" + tag);
        Vec rdinp(inp.size()), rdw = dw0, rdb = db0;
        cpu::matmul_backward(rdinp.data(), rdw.data(), use_bias ? rdb.data() : nullptr, dout.data(),
                             inp.data(), w.data(), c.N, c.C, c.OC);
        const double max_g = max_abs(rdinp);  // |dout @ w|, before the GeLU
        if (use_gelu) cpu::gelu_backward(rdinp.data(), pre_in.data(), rdinp.data(), rdinp.size());
        // dinp: one rounding (two on the fallback path); dw, db: one rounding of old + sum.
        // Through the DGELU epilogue, plus its tanh's error (epilogue_dgelu_err) times
        // max|dout @ w|.
        const double extra = dgelu_epilogue ? epilogue_dgelu_err(max_abs(pre_in)) * max_g : 0.0;
        expect_close("matmul_backward dinp" + tag, download(d_dinp), rdinp,
                     plus_abs(tol<E>(2), rms(rdinp), extra), 1.0);
        expect_close("matmul_backward dw" + tag, download(d_dw), rdw, tol<E>(2, 2));
        if (use_bias)
          expect_close("matmul_backward dbias" + tag, download(d_db), rdb, tol<E>(2, 2));
      }
    }
  }
}

// ---------------------------------------------------------------- classifier

TYPED_TEST(GpuKernels, ClassifierMatchesCpu) {
  REMAT_REQUIRE_GPU();
  using E = TypeParam;
  const int C = 64, V = 101, Vp = 112;
  for (int N : sizes<int>({1, 7, 130}, 2)) {
    for (int chunk : {4, 64}) {
      const std::string tag = " N=" + std::to_string(N) + " chunk=" + std::to_string(chunk);
      const Vec x = random_elems<E>(static_cast<size_t>(N) * C, -1.f, 1.f, 51);
      Vec wte = random_elems<E>(static_cast<size_t>(Vp) * C, -.5f, .5f, 52);
      // Padded rows must never be read (contract): NaN there would leak into every output.
      std::fill(wte.begin() + static_cast<size_t>(V) * C, wte.end(), NAN);
      Vec dwte0 = random_elems<E>(wte.size(), -1.f, 1.f, 53);
      std::fill(dwte0.begin() + static_cast<size_t>(V) * C, dwte0.end(), NAN);
      const std::vector<int> targets = random_ints(N, V, 54 + N);
      const float dloss = 1.f / N;

      DeviceArray<E> d_x(x.size()), d_wte(wte.size()), d_dx(x.size()), d_dwte(wte.size());
      DeviceArray<E> d_ws(cuda::classifier_workspace_elems(chunk, Vp));
      DeviceArray<int> d_t(N);
      DeviceArray<float> d_loss(N), d_mean(1);
      upload(d_x, x);
      upload(d_wte, wte);
      upload(d_dwte, dwte0);
      d_t.upload_raw(targets);
      d_loss.poison();
      d_mean.poison();
      d_dx.poison();
      d_ws.poison();
      cuda::classifier_forward_backward(d_loss.get(), d_dx.get(), d_dwte.get(), d_x.get(),
                                        d_wte.get(), d_t.get(), N, C, V, Vp, dloss, d_ws.get(),
                                        chunk, this->stream_, d_mean.get());
      Vec loss(N), dx(x.size()), dwte = dwte0, work(static_cast<size_t>(chunk) * Vp);
      const float mean = cpu::classifier_forward_backward(loss.data(), dx.data(), dwte.data(),
                                                          x.data(), wte.data(), targets.data(), N,
                                                          C, V, Vp, dloss, work.data(), chunk);
      Vec logits(static_cast<size_t>(N) * Vp);
      cpu::classifier_logits(logits.data(), x.data(), wte.data(), N, C, V, Vp);
      Vec real_logits;
      for (int r = 0; r < N; ++r)
        for (int v = 0; v < V; ++v) real_logits.push_back(logits[static_cast<size_t>(r) * Vp + v]);
      const double lmax = max_abs(real_logits);
      // bf16 logits are rounded (<= 2^-9 |logit|); the loss moves by at most the rounding of
      // the target logit plus that of the log-sum-exp: 2 x 2^-9 max|logit| <= 1 ulp of lmax.
      const Tol loss_tol =
          std::is_same_v<E, float> ? Tol{kFp32Tol, kFp32Tol} : Tol{0, 2 * kBf16Ulp};
      const double loss_scale = std::is_same_v<E, float> ? rms(loss) : lmax;
      expect_close("classifier loss" + tag, download(d_loss), loss, loss_tol, loss_scale);
      expect_close("classifier mean" + tag, download(d_mean), Vec{mean}, loss_tol, loss_scale);
      // dlogits carry the logit rounding (p x 2^-8 lmax) and their own rounding (2^-9):
      // (2 + lmax) ulps of the magnitude of dx / dwte.
      const Tol grad_tol = tol<E>(2 + lmax, 2);
      expect_close("classifier dx" + tag, download(d_dx), dx, grad_tol);
      const Vec got_dwte = download(d_dwte);
      const size_t real = static_cast<size_t>(V) * C;
      expect_close("classifier dwte" + tag, Vec(got_dwte.begin(), got_dwte.begin() + real),
                   Vec(dwte.begin(), dwte.begin() + real), grad_tol);
      for (size_t i = real; i < got_dwte.size(); ++i)
        ASSERT_TRUE(std::isnan(got_dwte[i])) << "padded dwte row written" << tag;

      // Logits for sampling: padded columns -inf.
      DeviceArray<E> d_logits(logits.size());
      d_logits.poison();
      cuda::classifier_logits(d_logits.get(), d_x.get(), d_wte.get(), N, C, V, Vp, this->stream_);
      const Vec got = download(d_logits);
      Vec got_real;
      for (int r = 0; r < N; ++r) {
        for (int v = 0; v < Vp; ++v) {
          const float g = got[static_cast<size_t>(r) * Vp + v];
          if (v < V) {
            got_real.push_back(g);
          } else {
            ASSERT_TRUE(std::isinf(g) && g < 0) << "padded logit " << v << " = " << g;
          }
        }
      }
      expect_close("classifier_logits" + tag, got_real, real_logits, tol<E>(2));
    }
  }
}

// ---------------------------------------------------------------- AdamW

TYPED_TEST(GpuKernels, AdamWMatchesCpu) {
  REMAT_REQUIRE_GPU();
  using E = TypeParam;
  cpu::AdamWParams hp{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 3, 0.8f};
  for (size_t n : sizes<size_t>({1, 7, 1001, 4096}, 2)) {
    for (size_t off : {0, 1}) {  // off = 1: unaligned, scalar path
      const std::string tag = " n=" + std::to_string(n) + " off=" + std::to_string(off);
      const Vec w = random_vec(n, -1.f, 1.f, 61), m = random_vec(n, -.1f, .1f, 62);
      const Vec v = random_vec(n, 0.f, .01f, 63);
      const Vec g = random_elems<E>(n, -1.f, 1.f, 64);
      DeviceArray<float> dw(n + 1), dm(n + 1), dv(n + 1), dscale(1);
      DeviceArray<E> dg(n + 1), dp(n + 1);
      dw.upload_raw(w, off);
      dm.upload_raw(m, off);
      dv.upload_raw(v, off);
      upload(dg, g, off);
      dscale.upload_raw({0.5f});
      dp.poison();
      cuda::adamw_update(dw.get() + off, dm.get() + off, dv.get() + off, dg.get() + off,
                         dp.get() + off, n, hp, dscale.get(), this->stream_);
      Vec rw = w, rm = m, rv = v;
      cpu::AdamWParams rhp = hp;
      rhp.grad_scale = hp.grad_scale * 0.5f;  // the device factor, folded in
      cpu::adamw_update(rw.data(), rm.data(), rv.data(), g.data(), n, rhp);
      // Same formula and order; a fused multiply-add may move the last bit: 1e-5 asserted.
      expect_close("adamw master" + tag, download(dw, n, off), rw, tol<float>(0));
      expect_close("adamw m" + tag, download(dm, n, off), rm, tol<float>(0));
      expect_close("adamw v" + tag, download(dv, n, off), rv, tol<float>(0));
      expect_close("adamw params" + tag, download(dp, n, off), rounded<E>(rw), tol<E>(1));
    }
  }
}

// ---------------------------------------------------------------- gradient norm

TYPED_TEST(GpuKernels, GradNormMatchesCpuAndIsDeterministic) {
  REMAT_REQUIRE_GPU();
  using E = TypeParam;
  DeviceArray<float> ws(cuda::gradnorm_workspace_floats()), d_sum(1), d_scale(1), d_norm(1);
  for (size_t n : sizes<size_t>({1, 7, 100003, 3000017}, 2)) {
    const std::string tag = " n=" + std::to_string(n);
    const Vec g = random_elems<E>(n, -1.f, 1.f, 71), h = random_elems<E>(n, -2.f, 2.f, 72);
    DeviceArray<E> dg(n), dh(n);
    upload(dg, g);
    upload(dh, h);
    d_sum.poison();
    cuda::sum_squares(d_sum.get(), dg.get(), n, ws.get(), false, this->stream_);
    const std::vector<float> first = d_sum.download_raw();
    const double ref = cpu::sum_squares(g.data(), n);
    // fp32 partials of <= 16 squares per thread, fp32 block trees, a double final pass.
    expect_close("sum_squares" + tag, Vec(first), Vec{static_cast<float>(ref)}, {kFp32Tol, 0});
    cuda::sum_squares(d_sum.get(), dg.get(), n, ws.get(), false, this->stream_);
    EXPECT_TRUE(bitwise_equal(first, d_sum.download_raw())) << "sum_squares not deterministic";
    cuda::sum_squares(d_sum.get(), dh.get(), n, ws.get(), true, this->stream_);
    const double ref2 = ref + cpu::sum_squares(h.data(), n);
    expect_close("sum_squares accumulate" + tag, download(d_sum), Vec{static_cast<float>(ref2)},
                 {kFp32Tol, 0});

    const double norm = std::sqrt(ref2);
    for (float max_norm : {0.f, static_cast<float>(norm / 2), static_cast<float>(norm * 2)}) {
      d_scale.poison();
      d_norm.poison();
      cuda::clip_scale(d_scale.get(), d_norm.get(), d_sum.get(), max_norm, this->stream_);
      expect_close("clip_scale" + tag, download(d_scale), Vec{cpu::clip_scale(norm, max_norm)},
                   {kFp32Tol, 0});
      expect_close("clip norm" + tag, download(d_norm), Vec{static_cast<float>(norm)},
                   {kFp32Tol, 0});
    }
  }
  d_sum.upload_raw({std::numeric_limits<float>::infinity()});
  cuda::clip_scale(d_scale.get(), nullptr, d_sum.get(), 1.f, this->stream_);
  EXPECT_EQ(d_scale.download_raw()[0], 1.f) << "non-finite norm must not clip";
}

// ---------------------------------------------------------------- attention

TYPED_TEST(GpuKernels, AttentionMatchesCpuAndBackwardIsDeterministic) {
  REMAT_REQUIRE_GPU();
  using E = TypeParam;
  struct Case {
    int B, T, NH, HD;
  };
  // bf16 with HD 64 / 128 runs the tensor-core kernels; HD 32 the plain fallback. Small mode
  // (the sanitizers) keeps T = 130 at HD 64 and 128 beside the one-tile cases: several Q and
  // K/V tiles, so the double-buffered loads, buffer swaps and partial waits run under
  // memcheck and racecheck too.
  for (const Case& c : sizes<Case>({{1, 1, 2, 64},
                                    {2, 7, 2, 64},
                                    {1, 7, 1, 128},
                                    {1, 130, 2, 64},
                                    {1, 130, 1, 128},
                                    {1, 65, 2, 64},
                                    {2, 257, 2, 64},
                                    {1, 130, 2, 128},
                                    {1, 70, 3, 32}},
                                   5)) {
    const int C = c.NH * c.HD, N = c.B * c.T;
    const std::string tag = " B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) +
                            " NH=" + std::to_string(c.NH) + " HD=" + std::to_string(c.HD);
    const Vec qkv = random_elems<E>(static_cast<size_t>(N) * 3 * C, -1.5f, 1.5f, 81 + c.T);
    DeviceArray<E> d_qkv(qkv.size()), d_out(static_cast<size_t>(N) * C);
    DeviceArray<float> d_lse(static_cast<size_t>(c.B) * c.NH * c.T);
    upload(d_qkv, qkv);
    d_out.poison();
    d_lse.poison();
    cuda::attention_forward(d_out.get(), d_lse.get(), d_qkv.get(), c.B, c.T, C, c.NH,
                            this->stream_);
    Vec out(d_out.size()), lse(d_lse.size());
    cpu::attention_forward(out.data(), lse.data(), qkv.data(), c.B, c.T, C, c.NH);
    // Scores: exact bf16 products summed in fp32 on both sides, so lse agrees to fp32 order
    // differences. out: P is rounded to bf16 for the P V product and out once more: 4 ulps.
    expect_close("attention lse" + tag, download(d_lse), lse, tol<float>(0));
    expect_close("attention out" + tag, download(d_out), out, tol<E>(4));

    const Vec dout = random_elems<E>(out.size(), -1.f, 1.f, 91 + c.T);
    DeviceArray<E> d_dout(dout.size()), d_dqkv(qkv.size());
    DeviceArray<float> ws(cuda::attention_backward_workspace_floats(c.B, c.T, c.NH));
    upload(d_dout, dout);
    std::vector<E> first;
    for (int run = 0; run < 2; ++run) {
      d_dqkv.poison();
      ws.poison();
      cuda::attention_backward(d_dqkv.get(), d_dout.get(), d_qkv.get(), d_out.get(), d_lse.get(),
                               c.B, c.T, C, c.NH, ws.get(), this->stream_);
      if (run == 0) {
        first = d_dqkv.download_raw();
      } else {
        EXPECT_TRUE(bitwise_equal(first, d_dqkv.download_raw()))
            << "attention_backward not deterministic" << tag;
      }
    }
    Vec dqkv(qkv.size());
    cpu::attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), c.B, c.T,
                            C, c.NH);
    // P and dS enter the tensor-core products rounded to bf16, D is formed from the bf16 out,
    // and dq/dk/dv are rounded once: 4 ulps. Each part against its own scale (rms of its own
    // reference): dv is the largest, and a shared scale would hide errors in dq or dk.
    const Vec got = download(d_dqkv);
    const size_t rows = N, ld = 3 * static_cast<size_t>(C);
    const char* part[3] = {"dq", "dk", "dv"};
    for (int k = 0; k < 3; ++k)
      expect_close(std::string("attention ") + part[k] + tag, columns(got, rows, ld, k * C, C),
                   columns(dqkv, rows, ld, k * C, C), tol<E>(4, 2));
  }
}

}  // namespace
}  // namespace remat
