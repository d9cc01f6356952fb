// cuDNN's fused attention (kernels/cudnn_attention.h) through cudnn-frontend's graph API: one
// forward and one backward graph per shape, built on first use and kept with their plans.
//
// The packed qkv is read in place through strided views: a head h of q is the [B, H, T, HD]
// tensor at qkv + h HD with strides (T W, HD, W, 1), W = C + 2 NKV HD the row width; k and v
// start at column C and C + NKV HD. out and dout are (B, T, C) seen as [B, NH, T, HD] with
// strides (T C, HD, C, 1); lse (B, NH, T) is cuDNN's [B, NH, T, 1] statistic tensor.
#include "kernels/cudnn_attention.h"

#include <cudnn.h>
#include <cudnn_frontend.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "kernels/cuda_common.cuh"

namespace fe = cudnn_frontend;

// cuDNN's status and cudnn-frontend's error object, checked like CUDA's (kernels/cuda_common.cuh).
#define REMAT_CUDNN_CHECK(stmt)                                  \
  do {                                                           \
    const cudnnStatus_t remat_cudnn_st_ = (stmt);                \
    if (remat_cudnn_st_ != CUDNN_STATUS_SUCCESS)                 \
      ::remat::cuda::fail("cuDNN", #stmt, __FILE__, __LINE__,    \
                          cudnnGetErrorString(remat_cudnn_st_)); \
  } while (0)
#define REMAT_CUDNN_FE_CHECK(stmt)                                     \
  do {                                                                 \
    fe::error_t remat_fe_err_ = (stmt);                                \
    if (remat_fe_err_.is_bad())                                        \
      ::remat::cuda::fail("cudnn-frontend", #stmt, __FILE__, __LINE__, \
                          remat_fe_err_.get_message().c_str());        \
  } while (0)

namespace remat::cuda {
namespace {

using bf16 = __nv_bfloat16;
using Graph = fe::graph::Graph;
using TensorAttr = fe::graph::Tensor_attributes;

// Tensor uids of both graphs (the variant pack's keys).
enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV };

// One attention shape; NKV resolved (never 0).
struct Shape {
  int B, T, C, NH, NKV;
  int64_t HD() const { return C / NH; }
  int64_t W() const { return C + 2 * int64_t(NKV) * HD(); }  // qkv row width
  bool operator<(const Shape& o) const {
    return std::tie(B, T, C, NH, NKV) < std::tie(o.B, o.T, o.C, o.NH, o.NKV);
  }
};

std::string shape_tag(const Shape& s) {
  return "B=" + std::to_string(s.B) + " T=" + std::to_string(s.T) + " C=" + std::to_string(s.C) +
         " NH=" + std::to_string(s.NH) + " NKV=" + std::to_string(s.NKV);
}

// The checks of kernels/attention.h plus cuDNN's head-dim rule; throws before any device work.
Shape checked_shape(int B, int T, int C, int NH, int NKV) {
  REMAT_CHECK(B > 0 && T > 0 && C > 0 && NH > 0,
              "cudnn attention: B, T, C and NH must be positive");
  REMAT_CHECK(C % NH == 0, "cudnn attention: C (" + std::to_string(C) +
                               ") is not a multiple of NH (" + std::to_string(NH) + ")");
  REMAT_CHECK(NKV >= 0, "cudnn attention: NKV must be >= 0 (0 means NH)");
  if (NKV == 0) NKV = NH;
  REMAT_CHECK(NH % NKV == 0, "cudnn attention: NH (" + std::to_string(NH) +
                                 ") is not a multiple of NKV (" + std::to_string(NKV) + ")");
  const int HD = C / NH;
  REMAT_CHECK(HD % 8 == 0 && HD <= 256,
              "cudnn attention: head dim " + std::to_string(HD) +
                  " unsupported (cuDNN needs a multiple of 8, at most 256; --attention remat "
                  "runs any head dim)");
  return Shape{B, T, C, NH, NKV};
}

void check_aligned(const void* p, const char* what) {
  REMAT_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0,
              std::string("cudnn attention: ") + what + " is not 16-byte aligned");
}

// [B, H, T, HD] views of the packed qkv (q, k or v at column `col`) and of (B, T, C) rows.
TensorAttr qkv_view(const Shape& s, const char* name, int64_t uid, int64_t heads) {
  const int64_t T = s.T, W = s.W(), HD = s.HD();
  return TensorAttr()
      .set_name(name)
      .set_uid(uid)
      .set_dim({s.B, heads, T, HD})
      .set_stride({T * W, HD, W, 1});
}
TensorAttr rows_view(const Shape& s, const char* name, int64_t uid) {
  const int64_t T = s.T, C = s.C, HD = s.HD();
  return TensorAttr()
      .set_name(name)
      .set_uid(uid)
      .set_dim({s.B, s.NH, T, HD})
      .set_stride({T * C, HD, C, 1});
}
TensorAttr stats_view(const Shape& s, const char* name, int64_t uid) {
  const int64_t T = s.T, NH = s.NH;
  return TensorAttr()
      .set_name(name)
      .set_uid(uid)
      .set_dim({s.B, NH, T, 1})
      .set_stride({NH * T, T, 1, 1})
      .set_data_type(fe::DataType_t::FLOAT);
}

std::shared_ptr<Graph> new_graph() {
  auto g = std::make_shared<Graph>();
  g->set_io_data_type(fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  return g;
}

// Lowers, picks the heuristics' first supported plan and builds it.
void build(Graph& g, cudnnHandle_t handle) {
  REMAT_CUDNN_FE_CHECK(g.validate());
  REMAT_CUDNN_FE_CHECK(g.build_operation_graph(handle));
  REMAT_CUDNN_FE_CHECK(g.create_execution_plans({fe::HeurMode_t::A}));
  REMAT_CUDNN_FE_CHECK(g.check_support());
  REMAT_CUDNN_FE_CHECK(g.build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE));
}

float attn_scale(const Shape& s) {
  return 1.0f / std::sqrt(static_cast<float>(s.HD()));
}

std::shared_ptr<Graph> forward_graph(const Shape& s, cudnnHandle_t handle) {
  auto g = new_graph();
  auto q = g->tensor(qkv_view(s, "q", kQ, s.NH));
  auto k = g->tensor(qkv_view(s, "k", kK, s.NKV));
  auto v = g->tensor(qkv_view(s, "v", kV, s.NKV));
  auto opts = fe::graph::SDPA_attributes()
                  .set_name("remat_attention_forward")
                  .set_generate_stats(true)
                  .set_attn_scale(attn_scale(s))
                  .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                  .set_diagonal_band_right_bound(0);  // causal: key j <= query i
  auto [o, stats] = g->sdpa(q, k, v, opts);
  const TensorAttr ov = rows_view(s, "o", kO), sv = stats_view(s, "stats", kStats);
  o->set_output(true).set_uid(kO).set_dim(ov.get_dim()).set_stride(ov.get_stride());
  stats->set_output(true)
      .set_uid(kStats)
      .set_dim(sv.get_dim())
      .set_stride(sv.get_stride())
      .set_data_type(fe::DataType_t::FLOAT);
  build(*g, handle);
  return g;
}

std::shared_ptr<Graph> backward_graph(const Shape& s, cudnnHandle_t handle) {
  auto g = new_graph();
  auto q = g->tensor(qkv_view(s, "q", kQ, s.NH));
  auto k = g->tensor(qkv_view(s, "k", kK, s.NKV));
  auto v = g->tensor(qkv_view(s, "v", kV, s.NKV));
  auto o = g->tensor(rows_view(s, "o", kO));
  auto dO = g->tensor(rows_view(s, "dO", kDO));
  auto stats = g->tensor(stats_view(s, "stats", kStats));
  auto opts = fe::graph::SDPA_backward_attributes()
                  .set_name("remat_attention_backward")
                  .set_attn_scale(attn_scale(s))
                  .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                  .set_diagonal_band_right_bound(0)
                  .set_deterministic_algorithm(true);
  auto [dQ, dK, dV] = g->sdpa_backward(q, k, v, o, dO, stats, opts);
  // The gradients land in dqkv with qkv's own layout.
  const TensorAttr qv = qkv_view(s, "dq", kDQ, s.NH), kv = qkv_view(s, "dk", kDK, s.NKV);
  dQ->set_output(true).set_uid(kDQ).set_dim(qv.get_dim()).set_stride(qv.get_stride());
  dK->set_output(true).set_uid(kDK).set_dim(kv.get_dim()).set_stride(kv.get_stride());
  dV->set_output(true).set_uid(kDV).set_dim(kv.get_dim()).set_stride(kv.get_stride());
  build(*g, handle);
  return g;
}

size_t workspace_of(const Graph& g) {
  int64_t bytes = 0;
  REMAT_CUDNN_FE_CHECK(g.get_workspace_size(bytes));
  return static_cast<size_t>(bytes);
}

}  // namespace

struct CudnnAttention::Impl {
  struct Plans {
    std::shared_ptr<Graph> fwd, bwd;
    size_t fwd_ws = 0, bwd_ws = 0;
  };

  std::mutex mu;                   // guards everything below (handle, stream, cache)
  cudnnHandle_t handle = nullptr;  // made at the first build, on the then-current device
  std::map<Shape, Plans> plans;

  ~Impl() {
    if (handle) cudnnDestroy(handle);  // never throws
  }

  // The plans of s, built if new. Call with mu held.
  const Plans& get(const Shape& s) {
    auto it = plans.find(s);
    if (it != plans.end()) return it->second;
    if (!handle) REMAT_CUDNN_CHECK(cudnnCreate(&handle));
    Plans p;
    try {
      p.fwd = forward_graph(s, handle);
      p.bwd = backward_graph(s, handle);
    } catch (const std::exception& e) {  // remat::Error from the checks, or the frontend's own
      throw Error(std::string("cuDNN attention does not build for ") + shape_tag(s) + " (" +
                  version() + "): " + e.what() + "; --attention remat runs this shape");
    }
    p.fwd_ws = workspace_of(*p.fwd);
    p.bwd_ws = workspace_of(*p.bwd);
    return plans.emplace(s, std::move(p)).first->second;
  }

  void execute(const Graph& g, std::unordered_map<int64_t, void*>& pack, void* workspace,
               cudaStream_t stream) {
    REMAT_CUDNN_CHECK(cudnnSetStream(handle, stream));
    REMAT_CUDNN_FE_CHECK(g.execute(handle, pack, workspace));
    REMAT_CUDA_LAUNCH_CHECK(stream);
  }
};

CudnnAttention::CudnnAttention() : impl_(std::make_unique<Impl>()) {}
CudnnAttention::~CudnnAttention() = default;

void CudnnAttention::prepare(int B, int T, int C, int NH, int NKV) {
  const Shape s = checked_shape(B, T, C, NH, NKV);
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->get(s);
}

size_t CudnnAttention::forward_workspace_bytes(int B, int T, int C, int NH, int NKV) {
  const Shape s = checked_shape(B, T, C, NH, NKV);
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->get(s).fwd_ws;
}

size_t CudnnAttention::backward_workspace_bytes(int B, int T, int C, int NH, int NKV) {
  const Shape s = checked_shape(B, T, C, NH, NKV);
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->get(s).bwd_ws;
}

void CudnnAttention::forward(bf16* out, float* lse, const bf16* qkv, int B, int T, int C, int NH,
                             void* workspace, size_t workspace_bytes, cudaStream_t stream,
                             int NKV) {
  const Shape s = checked_shape(B, T, C, NH, NKV);
  REMAT_CHECK(out && lse && qkv, "cudnn attention_forward: null pointer");
  check_aligned(qkv, "qkv");
  check_aligned(out, "out");
  check_aligned(lse, "lse");
  NvtxRange range("attention_forward (cuDNN)");
  std::lock_guard<std::mutex> lock(impl_->mu);
  const Impl::Plans& p = impl_->get(s);
  REMAT_CHECK(workspace_bytes >= p.fwd_ws && (p.fwd_ws == 0 || workspace),
              "cudnn attention_forward: workspace of " + std::to_string(workspace_bytes) +
                  " bytes, needs " + std::to_string(p.fwd_ws));
  bf16* q = const_cast<bf16*>(qkv);
  const int64_t kv = int64_t(s.NKV) * s.HD();
  std::unordered_map<int64_t, void*> pack = {
      {kQ, q}, {kK, q + C}, {kV, q + C + kv}, {kO, out}, {kStats, lse}};
  impl_->execute(*p.fwd, pack, workspace, stream);
}

void CudnnAttention::backward(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out,
                              const float* lse, int B, int T, int C, int NH, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream, int NKV) {
  const Shape s = checked_shape(B, T, C, NH, NKV);
  REMAT_CHECK(dqkv && dout && qkv && out && lse, "cudnn attention_backward: null pointer");
  check_aligned(dqkv, "dqkv");
  check_aligned(dout, "dout");
  check_aligned(qkv, "qkv");
  check_aligned(out, "out");
  check_aligned(lse, "lse");
  NvtxRange range("attention_backward (cuDNN)");
  std::lock_guard<std::mutex> lock(impl_->mu);
  const Impl::Plans& p = impl_->get(s);
  REMAT_CHECK(workspace_bytes >= p.bwd_ws && (p.bwd_ws == 0 || workspace),
              "cudnn attention_backward: workspace of " + std::to_string(workspace_bytes) +
                  " bytes, needs " + std::to_string(p.bwd_ws));
  bf16* q = const_cast<bf16*>(qkv);
  const int64_t kv = int64_t(s.NKV) * s.HD();
  std::unordered_map<int64_t, void*> pack = {{kQ, q},
                                             {kK, q + C},
                                             {kV, q + C + kv},
                                             {kO, const_cast<bf16*>(out)},
                                             {kDO, const_cast<bf16*>(dout)},
                                             {kStats, const_cast<float*>(lse)},
                                             {kDQ, dqkv},
                                             {kDK, dqkv + C},
                                             {kDV, dqkv + C + kv}};
  impl_->execute(*p.bwd, pack, workspace, stream);
}

std::string CudnnAttention::version() {
  const size_t v = cudnnGetVersion();  // major * 10000 + minor * 100 + patch (cuDNN 9)
  auto dotted = [](size_t x) {
    return std::to_string(x / 10000) + "." + std::to_string(x / 100 % 100) + "." +
           std::to_string(x % 100);
  };
  return "cuDNN " + dotted(v) + " (built against " + dotted(CUDNN_VERSION) + "), cudnn-frontend " +
         std::to_string(CUDNN_FRONTEND_MAJOR_VERSION) + "." +
         std::to_string(CUDNN_FRONTEND_MINOR_VERSION) + "." +
         std::to_string(CUDNN_FRONTEND_PATCH_VERSION);
}

}  // namespace remat::cuda
