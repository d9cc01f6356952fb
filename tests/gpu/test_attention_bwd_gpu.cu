// cuda::attention_backward_fused (one pass; dQ summed over key blocks in a fixed order under
// per-query-block semaphores) against the CPU reference, against itself (bitwise, two runs)
// and against the two-pass cuda::attention_backward (dK, dV: the same code, so bitwise; dQ:
// another summation order, so within rounding). bf16 at HD 64 and 128, multi-head and
// grouped-query, causal, T from 7 to 1024 (ragged tails included).
//
// Written without a GPU: the fused path is UNVERIFIED until this program passes on one, with
// and without compute-sanitizer (racecheck matters for the semaphores). REMAT_GPU_TEST_SMALL=1
// keeps the small cases (T <= 130: several key and query blocks, so the semaphore chain runs).
// Tests that need a device skip without one, saying so; the argument checks need none.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cuda_common.cuh"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/require_gpu.h"

namespace remat {
namespace {

using namespace test;  // NOLINT(build/namespaces): a test file, not a header

TEST(AttentionBackwardFused, ChecksArgumentsBeforeLaunching) {
  bf16* e = nullptr;
  float* f = nullptr;
  // C % NH != 0, then NH % NKV != 0: thrown before anything is enqueued (no device needed).
  EXPECT_THROW(cuda::attention_backward_fused<bf16>(e, e, e, e, f, 1, 4, 10, 3, f, nullptr), Error);
  EXPECT_THROW(cuda::attention_backward_fused<bf16>(e, e, e, e, f, 1, 4, 384, 6, f, nullptr, 4),
               Error);
  // The fused workspace holds at least the two-pass one (the fallback uses its start as D).
  EXPECT_GE(cuda::attention_backward_fused_workspace_floats(2, 130, 256, 4),
            cuda::attention_backward_workspace_floats(2, 130, 4));
}

class AttentionBackwardFusedGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_present()) REMAT_CUDA_CHECK(cudaStreamCreate(&stream_));
  }
  void TearDown() override {
    if (stream_) cudaStreamDestroy(stream_);
  }
  cudaStream_t stream_ = nullptr;
};

TEST_F(AttentionBackwardFusedGpu, MatchesCpuTwoPassAndIsDeterministic) {
  REMAT_REQUIRE_GPU();
  struct Case {
    int B, T, NH, NKV, HD;
  };
  // Small mode keeps the first five: one-tile, ragged multi-tile (T = 130: 3 key blocks, 3 or
  // 5 query blocks, so contributions chain), MHA and GQA at both head dims.
  for (const Case& c : sizes<Case>({{2, 7, 2, 2, 128},
                                    {1, 130, 2, 2, 64},
                                    {1, 130, 4, 2, 128},
                                    {1, 130, 4, 1, 64},
                                    {2, 65, 2, 2, 128},
                                    {1, 1024, 4, 4, 64},
                                    {1, 1024, 4, 2, 128},
                                    {1, 1024, 8, 2, 64},
                                    {2, 1024, 2, 2, 128},
                                    {2, 1031, 4, 1, 128}},
                                   5)) {
    const int C = c.NH * c.HD, N = c.B * c.T, ld = C + 2 * c.NKV * c.HD;
    const std::string tag = " B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) +
                            " NH=" + std::to_string(c.NH) + " NKV=" + std::to_string(c.NKV) +
                            " HD=" + std::to_string(c.HD);
    const Vec qkv = random_elems<bf16>(static_cast<size_t>(N) * ld, -1.5f, 1.5f, 181 + c.T);
    DeviceArray<bf16> d_qkv(qkv.size()), d_out(static_cast<size_t>(N) * C);
    DeviceArray<float> d_lse(static_cast<size_t>(c.B) * c.NH * c.T);
    upload(d_qkv, qkv);
    d_out.poison();
    d_lse.poison();
    cuda::attention_forward(d_out.get(), d_lse.get(), d_qkv.get(), c.B, c.T, C, c.NH, stream_,
                            c.NKV);
    Vec out(d_out.size()), lse(d_lse.size());
    cpu::attention_forward(out.data(), lse.data(), qkv.data(), c.B, c.T, C, c.NH, c.NKV);

    const Vec dout = random_elems<bf16>(out.size(), -1.f, 1.f, 191 + c.T);
    DeviceArray<bf16> d_dout(dout.size()), d_dqkv(qkv.size());
    DeviceArray<float> ws(cuda::attention_backward_fused_workspace_floats(c.B, c.T, C, c.NH));
    upload(d_dout, dout);

    // Two fused runs on poisoned outputs and workspace: bitwise equal.
    std::vector<bf16> fused;
    for (int run = 0; run < 2; ++run) {
      d_dqkv.poison();
      ws.poison();
      cuda::attention_backward_fused(d_dqkv.get(), d_dout.get(), d_qkv.get(), d_out.get(),
                                     d_lse.get(), c.B, c.T, C, c.NH, ws.get(), stream_, c.NKV);
      REMAT_CUDA_CHECK(cudaStreamSynchronize(stream_));
      if (run == 0) {
        fused = d_dqkv.download_raw();
      } else {
        EXPECT_TRUE(bitwise_equal(fused, d_dqkv.download_raw()))
            << "attention_backward_fused not deterministic" << tag;
      }
    }
    const Vec got = download(d_dqkv);

    // The two-pass backward on the same inputs.
    d_dqkv.poison();
    ws.poison();
    cuda::attention_backward(d_dqkv.get(), d_dout.get(), d_qkv.get(), d_out.get(), d_lse.get(), c.B,
                             c.T, C, c.NH, ws.get(), stream_, c.NKV);
    const std::vector<bf16> two_pass_raw = d_dqkv.download_raw();
    const Vec two_pass = download(d_dqkv);

    const size_t rows = N;
    const size_t off[3] = {0, static_cast<size_t>(C), static_cast<size_t>(C + c.NKV * c.HD)};
    const size_t width[3] = {static_cast<size_t>(C), static_cast<size_t>(c.NKV) * c.HD,
                             static_cast<size_t>(c.NKV) * c.HD};
    const char* part[3] = {"dq", "dk", "dv"};

    // dK, dV: the fused kernel runs the two-pass dK/dV code unchanged: bitwise. dQ: the same
    // bf16 dS and K products, summed over key blocks in fp32 in another order and rounded once
    // to bf16: one rounding apart at most, 2 ulps with margin.
    {
      std::vector<bf16> a, b;
      for (size_t r = 0; r < rows; ++r)
        for (int k = 1; k < 3; ++k) {
          a.insert(a.end(), fused.begin() + r * ld + off[k],
                   fused.begin() + r * ld + off[k] + width[k]);
          b.insert(b.end(), two_pass_raw.begin() + r * ld + off[k],
                   two_pass_raw.begin() + r * ld + off[k] + width[k]);
        }
      EXPECT_TRUE(bitwise_equal(a, b)) << "fused dk/dv differ from the two-pass ones" << tag;
    }
    expect_close("fused vs two-pass dq" + tag, columns(got, rows, ld, 0, C),
                 columns(two_pass, rows, ld, 0, C), tol<bf16>(2));

    // Against the CPU reference, each part on its own scale (as the two-pass test does): P and
    // dS enter the products rounded to bf16, D comes from the bf16 out, results are rounded
    // once: 4 ulps.
    Vec ref(qkv.size());
    cpu::attention_backward(ref.data(), dout.data(), qkv.data(), out.data(), lse.data(), c.B, c.T,
                            C, c.NH, c.NKV);
    for (int k = 0; k < 3; ++k)
      expect_close(std::string("fused attention ") + part[k] + tag,
                   columns(got, rows, ld, off[k], width[k]),
                   columns(ref, rows, ld, off[k], width[k]), tol<bf16>(4, 2));
  }
}

// A fresh process state is not needed between calls: the semaphores and the tile counter are
// zeroed on the stream by every call, so back-to-back calls on one workspace (no host sync in
// between) must agree too.
TEST_F(AttentionBackwardFusedGpu, BackToBackCallsOnOneWorkspaceAgree) {
  REMAT_REQUIRE_GPU();
  const int B = 1, T = 130, NH = 4, NKV = 2, HD = 128, C = NH * HD, ld = C + 2 * NKV * HD;
  const Vec qkv = random_elems<bf16>(static_cast<size_t>(B) * T * ld, -1.5f, 1.5f, 7);
  const Vec dout = random_elems<bf16>(static_cast<size_t>(B) * T * C, -1.f, 1.f, 8);
  DeviceArray<bf16> d_qkv(qkv.size()), d_out(dout.size()), d_dout(dout.size());
  DeviceArray<bf16> d_a(qkv.size()), d_b(qkv.size());
  DeviceArray<float> d_lse(static_cast<size_t>(B) * NH * T);
  DeviceArray<float> ws(cuda::attention_backward_fused_workspace_floats(B, T, C, NH));
  upload(d_qkv, qkv);
  upload(d_dout, dout);
  d_a.poison();
  d_b.poison();
  cuda::attention_forward(d_out.get(), d_lse.get(), d_qkv.get(), B, T, C, NH, stream_, NKV);
  for (bf16* dst : {d_a.get(), d_b.get()})
    cuda::attention_backward_fused(dst, d_dout.get(), d_qkv.get(), d_out.get(), d_lse.get(), B, T,
                                   C, NH, ws.get(), stream_, NKV);
  REMAT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  EXPECT_TRUE(bitwise_equal(d_a.download_raw(), d_b.download_raw()));
}

}  // namespace
}  // namespace remat
