// cuDNN's fused attention (kernels/cudnn_attention.h, --attention cudnn) against the CPU
// reference (remat::cpu::attention_*) on fresh random bf16 inputs: causal, MHA and GQA, head
// dims 64 and 128, one query up to several tiles with ragged ends. Outputs and workspaces are
// poisoned (NaN) before each launch and NaN never passes a comparison.
//
// What is asserted, and why:
// - lse: cuDNN's softmax statistic means what remat's lse means (natural log, scaled scores),
//   so it is compared to the reference's lse directly; both sum exact bf16 products in fp32
//   (cuDNN through exp2 with log2(e) folded into the scale): fp32 tolerance, 1e-5.
// - out: P is rounded to bf16 for the P V product and out once to bf16, as in remat's
//   tensor-core kernel: 4 bf16 ulps (2^-7) relative to each element plus 4 of the rms.
// - dq, dk, dv, each on its own scale: P and dS enter tensor-core products in bf16 and each
//   gradient is rounded once (4 ulps, as for remat's kernel); cuDNN's deterministic Hopper
//   path also keeps dP in bf16 in its workspace before dS = P (dP - D) is formed: one more
//   rounding of an input of dS, hence 6.
// - recompute and determinism: a second forward and a second backward are bitwise the first.
// - pairing: the lse contract is shared, so cuDNN's backward on remat's forward and remat's
//   backward on cuDNN's forward match the reference too (6 ulps: the other forward's bf16 out
//   enters D; a different lse convention, log2 or unscaled, would be off by O(1)).
// - the CUDA backend routes attention_forward/backward to cuDNN after set_attention("cudnn").
// Device tests skip without a device (saying so), and without cuDNN in the build;
// REMAT_GPU_TEST_SMALL=1 keeps the smallest cases. The argument checks need no device.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/cuda_common.cuh"
#include "kernels/cudnn_attention.h"
#include "runtime/backend.h"
#include "runtime/cuda/cuda_backend.h"
#include "tests/gpu/require_gpu.h"

#ifdef REMAT_WITH_CUDNN
#define REMAT_REQUIRE_CUDNN() (void)0
#else
#define REMAT_REQUIRE_CUDNN() \
  GTEST_SKIP() << "built without cuDNN attention (no cudnn-frontend headers): test skipped"
#endif

namespace remat {
namespace {

using bf16 = __nv_bfloat16;
using Vec = std::vector<float>;

bool small_mode() {
  const char* v = std::getenv("REMAT_GPU_TEST_SMALL");
  return v != nullptr && v[0] == '1';
}

// ---------------------------------------------------------------- host and device arrays

float bf16_round(float x) {
  return __bfloat162float(__float2bfloat16(x));
}
Vec random_bf16(size_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  Vec v(n);
  for (float& x : v) x = bf16_round(d(rng));
  return v;
}

// A device array of T (bf16 or float) that frees itself.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    REMAT_CUDA_CHECK(cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T)));
  }
  ~DeviceArray() { cudaFree(p_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return p_; }
  size_t size() const { return n_; }
  // All bits set: NaN in bf16 and fp32.
  void poison() { REMAT_CUDA_CHECK(cudaMemset(p_, 0xFF, n_ * sizeof(T))); }
  void upload(const Vec& h) {
    ASSERT_EQ(h.size(), n_);
    std::vector<T> t(n_);
    for (size_t i = 0; i < n_; ++i) t[i] = static_cast<T>(h[i]);
    REMAT_CUDA_CHECK(cudaMemcpy(p_, t.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  Vec download() const {
    const std::vector<T> t = raw();
    Vec h(n_);
    for (size_t i = 0; i < n_; ++i) h[i] = static_cast<float>(t[i]);
    return h;
  }
  // The stored bits (after the device has finished).
  std::vector<T> raw() const {
    REMAT_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<T> t(n_);
    REMAT_CUDA_CHECK(cudaMemcpy(t.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return t;
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

template <typename T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Columns [c0, c0 + n) of a (rows, ld) row-major array.
Vec columns(const Vec& v, size_t rows, size_t ld, size_t c0, size_t n) {
  Vec out;
  out.reserve(rows * n);
  for (size_t r = 0; r < rows; ++r)
    out.insert(out.end(), v.begin() + r * ld + c0, v.begin() + r * ld + c0 + n);
  return out;
}

double rms(const Vec& v) {
  double s = 0;
  for (float x : v) s += static_cast<double>(x) * x;
  return v.empty() ? 0.0 : std::sqrt(s / v.size());
}

// |got - ref| <= rel |ref| + abs rms(ref) everywhere; NaN fails.
void expect_close(const std::string& what, const Vec& got, const Vec& ref, double rel, double abs) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  const double scale = rms(ref);
  size_t bad = 0, worst = 0;
  double worst_ratio = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - ref[i]);
    const double lim = rel * std::fabs(ref[i]) + abs * scale;
    if (!(err <= lim)) {
      ++bad;
      const double r =
          std::isnan(err) ? std::numeric_limits<double>::infinity() : err / std::max(lim, 1e-300);
      if (r > worst_ratio) {
        worst_ratio = r;
        worst = i;
      }
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " outside tolerance; worst ["
                     << worst << "] got " << got[worst] << " want " << ref[worst] << " ("
                     << worst_ratio << "x the limit; rms " << scale << ")";
}

constexpr double kUlp = 1.0 / 128;  // bf16: 2^-7
constexpr double kFp32 = 1e-5;

struct Case {
  int B, T, NH, NKV, HD;
  int C() const { return NH * HD; }
  size_t ld() const { return static_cast<size_t>(NH + 2 * NKV) * HD; }  // qkv row width
  size_t rows() const { return static_cast<size_t>(B) * T; }
  std::string tag() const {
    return " B=" + std::to_string(B) + " T=" + std::to_string(T) + " NH=" + std::to_string(NH) +
           " NKV=" + std::to_string(NKV) + " HD=" + std::to_string(HD);
  }
};

// Small to large; the first three in small mode. T = 1 and 7: one ragged tile; 130 and 200:
// several tiles with a ragged end; GQA groups 1, 4 and 8; HD 64 and 128.
std::vector<Case> cases() {
  std::vector<Case> all = {{1, 1, 4, 4, 64},    {2, 7, 8, 2, 64},    {1, 130, 8, 8, 64},
                           {1, 130, 8, 2, 128}, {2, 200, 8, 1, 128}, {2, 256, 12, 12, 64},
                           {1, 1024, 4, 2, 64}};
  if (small_mode()) all.resize(3);
  return all;
}

// The reference for one case: inputs, forward and backward on the CPU.
struct Reference {
  Vec qkv, dout, out, lse, dqkv;
  explicit Reference(const Case& c) {
    qkv = random_bf16(c.rows() * c.ld(), -1.5f, 1.5f, 301 + c.T + c.NKV + c.HD);
    dout = random_bf16(c.rows() * c.C(), -1.f, 1.f, 401 + c.T + c.NKV + c.HD);
    out.resize(dout.size());
    lse.resize(static_cast<size_t>(c.B) * c.NH * c.T);
    dqkv.resize(qkv.size());
    cpu::attention_forward(out.data(), lse.data(), qkv.data(), c.B, c.T, c.C(), c.NH, c.NKV);
    cpu::attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), c.B, c.T,
                            c.C(), c.NH, c.NKV);
  }
};

void expect_forward(const std::string& what, const Case& c, const Vec& out, const Vec& lse,
                    const Reference& r) {
  expect_close(what + " lse" + c.tag(), lse, r.lse, kFp32, kFp32);
  expect_close(what + " out" + c.tag(), out, r.out, 4 * kUlp, 4 * kUlp);
}
void expect_backward(const std::string& what, const Case& c, const Vec& got, const Reference& r,
                     double ulps) {
  const size_t C = c.C(), KV = static_cast<size_t>(c.NKV) * c.HD, rows = c.rows(), ld = c.ld();
  expect_close(what + " dq" + c.tag(), columns(got, rows, ld, 0, C),
               columns(r.dqkv, rows, ld, 0, C), ulps * kUlp, ulps * kUlp);
  expect_close(what + " dk" + c.tag(), columns(got, rows, ld, C, KV),
               columns(r.dqkv, rows, ld, C, KV), ulps * kUlp, ulps * kUlp);
  expect_close(what + " dv" + c.tag(), columns(got, rows, ld, C + KV, KV),
               columns(r.dqkv, rows, ld, C + KV, KV), ulps * kUlp, ulps * kUlp);
}

class CudnnAttentionGpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (test::cuda_device_present())
      REMAT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  void TearDown() override {
    if (stream_) cudaStreamDestroy(stream_);
  }
  cudaStream_t stream_ = nullptr;
};

// ---------------------------------------------------------------- without a device

TEST(CudnnAttentionChecks, ArgumentErrorsThrowBeforeAnyDeviceWork) {
  REMAT_REQUIRE_CUDNN();
#ifdef REMAT_WITH_CUDNN
  cuda::CudnnAttention a;  // makes no handle yet
  bf16* p = reinterpret_cast<bf16*>(uintptr_t{256});
  float* f = reinterpret_cast<float*>(uintptr_t{256});
  // C % NH, NH % NKV, NKV < 0, head dim 12 (not a multiple of 8), head dim 264 (> 256).
  EXPECT_THROW(a.forward(p, f, p, 1, 8, 100, 3, nullptr, 0, nullptr), Error);
  EXPECT_THROW(a.forward(p, f, p, 1, 8, 256, 4, nullptr, 0, nullptr, 3), Error);
  EXPECT_THROW(a.forward(p, f, p, 1, 8, 256, 4, nullptr, 0, nullptr, -1), Error);
  EXPECT_THROW(a.forward(p, f, p, 1, 8, 48, 4, nullptr, 0, nullptr), Error);
  EXPECT_THROW(a.backward(p, p, p, p, f, 1, 8, 264, 1, nullptr, 0, nullptr), Error);
  // Unaligned and null pointers.
  EXPECT_THROW(a.forward(p + 1, f, p, 1, 8, 256, 4, nullptr, 0, nullptr), Error);
  EXPECT_THROW(a.backward(p, nullptr, p, p, f, 1, 8, 256, 4, nullptr, 0, nullptr), Error);
  // The head-dim error points at remat's attention.
  try {
    a.forward(p, f, p, 1, 8, 48, 4, nullptr, 0, nullptr);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--attention remat"), std::string::npos) << e.what();
  }
#endif
}

TEST(CudnnAttentionChecks, CpuBackendRefusesCudnnClearly) {
  cpu_backend()->set_attention("remat");
  try {
    cpu_backend()->set_attention("cudnn");
    ADD_FAILURE() << "the CPU backend accepted --attention cudnn";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--device cuda"), std::string::npos) << e.what();
  }
  EXPECT_THROW(cpu_backend()->set_attention("flash"), Error);
}

// ---------------------------------------------------------------- on a device

TEST_F(CudnnAttentionGpu, MatchesCpuRecomputesBitwiseAndBackwardIsDeterministic) {
  REMAT_REQUIRE_GPU();
  REMAT_REQUIRE_CUDNN();
#ifdef REMAT_WITH_CUDNN
  std::printf("%s\n", cuda::CudnnAttention::version().c_str());
  cuda::CudnnAttention a;
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.tag());
    const Reference r(c);
    DeviceArray<bf16> qkv(r.qkv.size()), out(r.out.size()), dout(r.dout.size()), dqkv(r.qkv.size());
    DeviceArray<float> lse(r.lse.size());
    qkv.upload(r.qkv);
    dout.upload(r.dout);
    const size_t fws = a.forward_workspace_bytes(c.B, c.T, c.C(), c.NH, c.NKV);
    const size_t bws = a.backward_workspace_bytes(c.B, c.T, c.C(), c.NH, c.NKV);
    std::printf("cuDNN attention%s: workspace forward %zu, backward %zu bytes\n", c.tag().c_str(),
                fws, bws);
    DeviceArray<char> fw(fws), bw(bws);

    std::vector<bf16> out1;
    std::vector<float> lse1;
    for (int run = 0; run < 2; ++run) {  // the second run is a recompute
      out.poison();
      lse.poison();
      fw.poison();
      a.forward(out.get(), lse.get(), qkv.get(), c.B, c.T, c.C(), c.NH, fw.get(), fws, stream_,
                c.NKV);
      if (run == 0) {
        out1 = out.raw();
        lse1 = lse.raw();
        expect_forward("cudnn", c, out.download(), lse.download(), r);
      } else {
        EXPECT_TRUE(bitwise_equal(out1, out.raw())) << "recomputed out differs" << c.tag();
        EXPECT_TRUE(bitwise_equal(lse1, lse.raw())) << "recomputed lse differs" << c.tag();
      }
    }
    std::vector<bf16> d1;
    for (int run = 0; run < 2; ++run) {
      dqkv.poison();
      bw.poison();  // the backend's scratch is shared and dirty
      a.backward(dqkv.get(), dout.get(), qkv.get(), out.get(), lse.get(), c.B, c.T, c.C(), c.NH,
                 bw.get(), bws, stream_, c.NKV);
      if (run == 0) {
        d1 = dqkv.raw();
        expect_backward("cudnn", c, dqkv.download(), r, 6);
      } else {
        EXPECT_TRUE(bitwise_equal(d1, dqkv.raw())) << "backward not deterministic" << c.tag();
      }
    }
  }
#endif
}

// remat's flash kernels (bf16, HD 64 and 128) and cuDNN's share the lse contract: each
// backward runs on the other's forward.
TEST_F(CudnnAttentionGpu, PairsWithRematAttention) {
  REMAT_REQUIRE_GPU();
  REMAT_REQUIRE_CUDNN();
#ifdef REMAT_WITH_CUDNN
  cuda::CudnnAttention a;
  std::vector<Case> cs = {{2, 7, 8, 2, 64}, {1, 130, 8, 2, 128}, {2, 200, 12, 12, 64}};
  if (small_mode()) cs.resize(1);
  for (const Case& c : cs) {
    SCOPED_TRACE(c.tag());
    const Reference r(c);
    DeviceArray<bf16> qkv(r.qkv.size()), out_c(r.out.size()), out_r(r.out.size()),
        dout(r.dout.size()), dqkv(r.qkv.size());
    DeviceArray<float> lse_c(r.lse.size()), lse_r(r.lse.size()),
        ws_r(cuda::attention_backward_workspace_floats(c.B, c.T, c.NH));
    qkv.upload(r.qkv);
    dout.upload(r.dout);
    const size_t fws = a.forward_workspace_bytes(c.B, c.T, c.C(), c.NH, c.NKV);
    const size_t bws = a.backward_workspace_bytes(c.B, c.T, c.C(), c.NH, c.NKV);
    DeviceArray<char> fw(fws), bw(bws);
    a.forward(out_c.get(), lse_c.get(), qkv.get(), c.B, c.T, c.C(), c.NH, fw.get(), fws, stream_,
              c.NKV);
    cuda::attention_forward(out_r.get(), lse_r.get(), qkv.get(), c.B, c.T, c.C(), c.NH, stream_,
                            c.NKV);
    // The two forwards' lse agree as each agrees with the reference.
    expect_close("lse remat vs cudnn" + c.tag(), lse_c.download(), lse_r.download(), 2 * kFp32,
                 2 * kFp32);

    dqkv.poison();
    bw.poison();
    a.backward(dqkv.get(), dout.get(), qkv.get(), out_r.get(), lse_r.get(), c.B, c.T, c.C(), c.NH,
               bw.get(), bws, stream_, c.NKV);
    expect_backward("cudnn backward on remat forward", c, dqkv.download(), r, 6);

    dqkv.poison();
    ws_r.poison();
    cuda::attention_backward(dqkv.get(), dout.get(), qkv.get(), out_c.get(), lse_c.get(), c.B, c.T,
                             c.C(), c.NH, ws_r.get(), stream_, c.NKV);
    expect_backward("remat backward on cudnn forward", c, dqkv.download(), r, 6);
  }
#endif
}

// The CUDA backend: set_attention("cudnn") routes attention_forward/backward to cuDNN (bf16),
// and fp32 refuses it naming --attention remat.
TEST_F(CudnnAttentionGpu, BackendRoutesAttentionToCudnn) {
  REMAT_REQUIRE_GPU();
  REMAT_REQUIRE_CUDNN();
  {
    std::unique_ptr<Backend> be32 = make_cuda_backend(ActDType::kFP32);
    try {
      be32->set_attention("cudnn");
      ADD_FAILURE() << "the fp32 CUDA backend accepted --attention cudnn";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--attention remat"), std::string::npos) << e.what();
    }
  }
  const Case c{2, 130, 8, 2, 64};
  SCOPED_TRACE(c.tag());
  const Reference r(c);
  std::unique_ptr<Backend> be = make_cuda_backend(ActDType::kBF16);
  std::unique_ptr<Stream> s = be->make_stream("main", 0);
  void* qkv = be->alloc(r.qkv.size() * 2, "qkv");
  void* dout = be->alloc(r.dout.size() * 2, "dout");
  void* out = be->alloc(r.out.size() * 2, "out");
  void* dqkv = be->alloc(r.qkv.size() * 2, "dqkv");
  float* lse = static_cast<float*>(be->alloc(r.lse.size() * 4, "lse"));
  be->upload_elems(qkv, r.qkv.data(), r.qkv.size());
  be->upload_elems(dout, r.dout.data(), r.dout.size());
  // Runs both implementations; returns out and dqkv as floats, lse as stored.
  auto run = [&](const char* impl, Vec& o, Vec& l, Vec& d) {
    be->set_attention(impl);
    be->reserve_scratch(c.B, c.T, c.C(), c.NH, 128);
    be->attention_forward(s.get(), out, lse, qkv, c.B, c.T, c.C(), c.NH, c.NKV, "fwd.attn", 0);
    be->attention_backward(s.get(), dqkv, dout, qkv, out, lse, c.B, c.T, c.C(), c.NH, c.NKV,
                           "bwd.attn", 0);
    s->synchronize();
    o.resize(r.out.size());
    l.resize(r.lse.size());
    d.resize(r.qkv.size());
    be->download_elems(o.data(), out, o.size());
    be->download(l.data(), lse, l.size() * 4);
    be->download_elems(d.data(), dqkv, d.size());
  };
  Vec o_c, l_c, d_c, o_r, l_r, d_r;
  run("cudnn", o_c, l_c, d_c);
  EXPECT_NE(be->describe().find("cuDNN attention"), std::string::npos) << be->describe();
  expect_forward("backend cudnn", c, o_c, l_c, r);
  expect_backward("backend cudnn", c, d_c, r, 6);
  run("remat", o_r, l_r, d_r);
  expect_forward("backend remat", c, o_r, l_r, r);
  // Routing took place: the two implementations do not produce the same bits.
  EXPECT_FALSE(o_c == o_r && d_c == d_r) << "cudnn and remat gave identical bits: not routed?";
  for (void* p : {qkv, dout, out, dqkv, static_cast<void*>(lse)}) be->release(p);
}

}  // namespace
}  // namespace remat
