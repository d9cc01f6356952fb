#include "runtime/program.h"

#include <algorithm>

#include "kernels/common.h"
#include "runtime/arena.h"

namespace remat {

const char* op_kind_name(OpKind k) {
  switch (k) {
    case OpKind::kEmbedding:
      return "embedding";
    case OpKind::kLayerNorm:
      return "layernorm";
    case OpKind::kResidualLayerNorm:
      return "residual_layernorm";
    case OpKind::kRMSNorm:
      return "rmsnorm";
    case OpKind::kResidualRMSNorm:
      return "residual_rmsnorm";
    case OpKind::kMatmul:
      return "matmul";
    case OpKind::kGelu:
      return "gelu";
    case OpKind::kSwiGLU:
      return "swiglu";
    case OpKind::kRope:
      return "rope";
    case OpKind::kAttention:
      return "attention";
    case OpKind::kClassifier:
      return "classifier";
  }
  return "?";
}

const char* tensor_class_name(TensorClass c) {
  switch (c) {
    case TensorClass::kEmbedding:
      return "embedding";
    case TensorClass::kNorm:
      return "norm";
    case TensorClass::kResidual:
      return "residual";
    case TensorClass::kMatmul:
      return "matmul";
    case TensorClass::kActivation:
      return "activation";
    case TensorClass::kAttention:
      return "attention";
  }
  return "?";
}

GradMode grad_mode(OpKind k, int input) {
  switch (k) {
    case OpKind::kLayerNorm:
    case OpKind::kRMSNorm:
      return GradMode::kAccumulate;
    case OpKind::kResidualLayerNorm:
    case OpKind::kResidualRMSNorm:
      return GradMode::kPassThrough;
    default:
      (void)input;
      return GradMode::kAssign;
  }
}

TensorClass output_class(OpKind k, int output) {
  switch (k) {
    case OpKind::kEmbedding:
      return TensorClass::kEmbedding;
    case OpKind::kLayerNorm:
    case OpKind::kRMSNorm:
      return TensorClass::kNorm;
    case OpKind::kResidualLayerNorm:
    case OpKind::kResidualRMSNorm:
      return output == 0 ? TensorClass::kResidual : TensorClass::kNorm;
    case OpKind::kGelu:
    case OpKind::kSwiGLU:
      return TensorClass::kActivation;
    case OpKind::kAttention:
      return TensorClass::kAttention;
    default:
      return TensorClass::kMatmul;
  }
}

bool backward_reads_input(OpKind k, int input) {
  switch (k) {
    case OpKind::kLayerNorm:   // d x needs x
    case OpKind::kRMSNorm:     // d x needs x
    case OpKind::kMatmul:      // d w needs x
    case OpKind::kGelu:        // d x needs x
    case OpKind::kSwiGLU:      // d x needs x
    case OpKind::kAttention:   // needs q, k, v
    case OpKind::kClassifier:  // the logits are rebuilt from x
      (void)input;
      return true;
    default:
      return false;  // embedding reads tokens; residual norms read their sum; rope nothing
  }
}

bool backward_reads_output(OpKind k, int output) {
  switch (k) {
    case OpKind::kLayerNorm:
    case OpKind::kRMSNorm:
      return true;  // mean, rstd / rstd
    case OpKind::kResidualLayerNorm:
    case OpKind::kResidualRMSNorm:
      return true;  // the sum (0) and the statistics (1)
    case OpKind::kAttention:
      return true;  // out and lse
    default:
      (void)output;
      return false;
  }
}

OpWork op_work(const OpDesc& op, int es, bool norm_only) {
  const double N = op.N, C = op.C;
  switch (op.kind) {
    case OpKind::kEmbedding:
      return {N * C, 3 * N * C * es};
    case OpKind::kLayerNorm:
      return {8 * N * C, 2 * N * C * es + 8 * N};
    case OpKind::kResidualLayerNorm:
      if (norm_only) return {8 * N * C, 2 * N * C * es + 8 * N};
      return {9 * N * C, 4 * N * C * es + 8 * N};
    case OpKind::kRMSNorm:
      return {4 * N * C, 2 * N * C * es + 4 * N};
    case OpKind::kResidualRMSNorm:
      if (norm_only) return {4 * N * C, 2 * N * C * es + 4 * N};
      return {5 * N * C, 4 * N * C * es + 4 * N};
    case OpKind::kMatmul:
      return {2 * N * C * op.OC, (N * C + N * op.OC + C * double(op.OC)) * es};
    case OpKind::kGelu:
      return {8 * N * C, 2 * N * C * es};
    case OpKind::kSwiGLU:  // C = I: reads 2I, writes I per row
      return {6 * N * C, 3 * N * C * es};
    case OpKind::kRope:  // C = the packed row width
      return {3 * N * C, 2 * N * C * es};
    case OpKind::kAttention: {  // causal: half of the 4 T^2 C FLOPs per sequence
      const double kv = op.NH > 0 ? 2.0 * C * op.NKV / op.NH : 2 * C;
      return {2.0 * op.B * double(op.T) * op.T * C, (3 * C + kv) * N * es};
    }
    case OpKind::kClassifier:
      return {2 * N * C * op.Vp, (N * C + C * double(op.Vp)) * es};
  }
  return {};
}

TensorId Program::find(const std::string& name, int block) const {
  for (size_t t = 0; t < tensors.size(); t++)
    if (tensors[t].block == block && tensors[t].name == name) return static_cast<TensorId>(t);
  return -1;
}

ParamId Program::find_param(const std::string& name) const {
  for (size_t p = 0; p < params.size(); p++)
    if (params[p].name == name) return static_cast<ParamId>(p);
  return -1;
}

size_t Program::tensor_bytes(TensorId t, int es) const {
  return extra_offset(t, es) + Arena::round_up(tensors[t].extra * 4);
}

size_t Program::extra_offset(TensorId t, int es) const {
  return Arena::round_up(tensors[t].elems() * es);
}

ProgramBuilder::ProgramBuilder(int B, int T) {
  REMAT_REQUIRE(B > 0 && T > 0, "batch and sequence length must be positive");
  p_.B = B;
  p_.T = T;
}

ParamId ProgramBuilder::param(const std::string& name, size_t offset, size_t count, bool decay) {
  p_.params.push_back(ParamDesc{name, offset, count, decay});
  return static_cast<ParamId>(p_.params.size() - 1);
}

void ProgramBuilder::begin_block(int l) {
  REMAT_CHECK(l == p_.num_blocks, "blocks must begin in order: block " + std::to_string(l) +
                                      " after " + std::to_string(p_.num_blocks) + " blocks");
  block_ = l;
  p_.num_blocks = l + 1;
}

void ProgramBuilder::end_blocks() {
  block_ = kNoBlock;
}

void ProgramBuilder::checkpoint(TensorId t) {
  p_.tensors.at(t).checkpoint = true;
}

TensorId ProgramBuilder::add_tensor(const std::string& name, size_t rows, size_t cols, size_t extra,
                                    const std::string& extra_name) {
  TensorDesc d;
  d.name = name;
  d.block = block_;
  d.rows = rows;
  d.cols = cols;
  d.extra = extra;
  d.extra_name = extra_name;
  p_.tensors.push_back(d);
  return static_cast<TensorId>(p_.tensors.size() - 1);
}

int ProgramBuilder::add_op(OpDesc op) {
  op.block = block_;
  op.B = p_.B;
  op.T = p_.T;
  op.N = p_.B * p_.T;
  const int index = static_cast<int>(p_.ops.size());
  for (size_t i = 0; i < op.out.size(); i++) {
    TensorDesc& t = p_.tensors[op.out[i]];
    t.producer = index;
    t.cls = output_class(op.kind, static_cast<int>(i));
  }
  for (TensorId t : op.in) {
    REMAT_CHECK(t >= 0 && t < static_cast<int>(p_.tensors.size()) && p_.tensors[t].producer >= 0,
                "program: op '" + op.name + "' reads a tensor no op has produced");
  }
  p_.ops.push_back(std::move(op));
  return index;
}

TensorId ProgramBuilder::embedding(ParamId wte, ParamId wpe, int C, const std::string& name) {
  const size_t N = size_t(p_.B) * p_.T;
  OpDesc op;
  op.kind = OpKind::kEmbedding;
  op.name = name;
  op.out = {add_tensor(name, N, C, 0, "")};
  op.params = {wte, wpe};
  op.C = C;
  add_op(op);
  return op.out[0];
}

TensorId ProgramBuilder::add_norm(OpKind kind, TensorId x, std::vector<ParamId> params, float eps,
                                  size_t stats_per_row, const std::string& name,
                                  const std::string& stats_name) {
  const TensorDesc in = p_.tensors.at(x);  // a copy: add_tensor may move the vector
  OpDesc op;
  op.kind = kind;
  op.name = name;
  op.in = {x};
  op.out = {add_tensor(name, in.rows, in.cols, stats_per_row * in.rows, name + stats_name)};
  op.params = std::move(params);
  op.C = static_cast<int>(in.cols);
  op.eps = eps;
  add_op(op);
  return op.out[0];
}

std::pair<TensorId, TensorId> ProgramBuilder::add_residual_norm(
    OpKind kind, TensorId x, TensorId y, std::vector<ParamId> params, float eps,
    size_t stats_per_row, const std::string& res_name, const std::string& ln_name,
    const std::string& stats_name, const std::string& op_name) {
  const TensorDesc in = p_.tensors.at(x);
  REMAT_CHECK(p_.tensors.at(y).rows == in.rows && p_.tensors.at(y).cols == in.cols,
              "program: residual '" + res_name + "' adds tensors of different shapes");
  OpDesc op;
  op.kind = kind;
  op.name = op_name;
  op.in = {x, y};
  const TensorId res = add_tensor(res_name, in.rows, in.cols, 0, "");
  const TensorId ln =
      add_tensor(ln_name, in.rows, in.cols, stats_per_row * in.rows, ln_name + stats_name);
  op.out = {res, ln};
  op.params = std::move(params);
  op.C = static_cast<int>(in.cols);
  op.eps = eps;
  add_op(op);
  return {res, ln};
}

// LayerNorm keeps mean and rstd per row, RMSNorm rstd alone.
TensorId ProgramBuilder::layernorm(TensorId x, ParamId w, ParamId b, const std::string& name) {
  return add_norm(OpKind::kLayerNorm, x, {w, b}, 1e-5f, 2, name, ".mean_rstd");
}

std::pair<TensorId, TensorId> ProgramBuilder::residual_layernorm(TensorId x, TensorId y, ParamId w,
                                                                 ParamId b,
                                                                 const std::string& res_name,
                                                                 const std::string& ln_name,
                                                                 const std::string& op_name) {
  return add_residual_norm(OpKind::kResidualLayerNorm, x, y, {w, b}, 1e-5f, 2, res_name, ln_name,
                           ".mean_rstd", op_name);
}

TensorId ProgramBuilder::rmsnorm(TensorId x, ParamId w, float eps, const std::string& name) {
  return add_norm(OpKind::kRMSNorm, x, {w}, eps, 1, name, ".rstd");
}

std::pair<TensorId, TensorId> ProgramBuilder::residual_rmsnorm(TensorId x, TensorId y, ParamId w,
                                                               float eps,
                                                               const std::string& res_name,
                                                               const std::string& ln_name,
                                                               const std::string& op_name) {
  return add_residual_norm(OpKind::kResidualRMSNorm, x, y, {w}, eps, 1, res_name, ln_name, ".rstd",
                           op_name);
}

TensorId ProgramBuilder::matmul(TensorId x, ParamId w, ParamId bias, int OC,
                                const std::string& name) {
  const TensorDesc in = p_.tensors.at(x);  // a copy: add_tensor may move the vector
  OpDesc op;
  op.kind = OpKind::kMatmul;
  op.name = name;
  op.in = {x};
  op.out = {add_tensor(name, in.rows, OC, 0, "")};
  op.params = {w, bias};
  op.C = static_cast<int>(in.cols);
  op.OC = OC;
  add_op(op);
  return op.out[0];
}

TensorId ProgramBuilder::gelu(TensorId x, const std::string& name) {
  const TensorDesc in = p_.tensors.at(x);  // a copy: add_tensor may move the vector
  OpDesc op;
  op.kind = OpKind::kGelu;
  op.name = name;
  op.in = {x};
  op.out = {add_tensor(name, in.rows, in.cols, 0, "")};
  op.C = static_cast<int>(in.cols);
  add_op(op);
  return op.out[0];
}

namespace {
// The head dimension of packed qkv rows of `cols` columns with NH query and NKV kv heads.
int packed_head_dim(size_t cols, int NH, int NKV, const std::string& name) {
  const size_t heads = size_t(NH) + 2 * size_t(NKV);
  REMAT_CHECK(NH > 0 && NKV > 0 && NH % NKV == 0 && cols % heads == 0,
              "program: '" + name + "' needs packed q, k, v split over " + std::to_string(NH) +
                  " query and " + std::to_string(NKV) + " key/value heads");
  return static_cast<int>(cols / heads);
}
}  // namespace

TensorId ProgramBuilder::swiglu(TensorId x, const std::string& name) {
  const TensorDesc in = p_.tensors.at(x);  // a copy: add_tensor may move the vector
  REMAT_CHECK(in.cols % 2 == 0, "program: swiglu '" + name + "' needs [gate | up] rows");
  OpDesc op;
  op.kind = OpKind::kSwiGLU;
  op.name = name;
  op.in = {x};
  op.out = {add_tensor(name, in.rows, in.cols / 2, 0, "")};
  op.C = static_cast<int>(in.cols / 2);
  add_op(op);
  return op.out[0];
}

TensorId ProgramBuilder::rope(TensorId qkv, int NH, int NKV, std::vector<float> inv_freq,
                              const std::string& name) {
  const TensorDesc in = p_.tensors.at(qkv);  // a copy: add_tensor may move the vector
  const int HD = packed_head_dim(in.cols, NH, NKV, name);
  REMAT_CHECK(HD % 2 == 0 && inv_freq.size() == size_t(HD / 2),
              "program: rope '" + name + "' needs an even head dimension and HD/2 frequencies");
  OpDesc op;
  op.kind = OpKind::kRope;
  op.name = name;
  op.in = {qkv};
  op.out = {add_tensor(name, in.rows, in.cols, 0, "")};
  op.C = static_cast<int>(in.cols);
  op.NH = NH;
  op.NKV = NKV;
  op.HD = HD;
  op.inv_freq = std::move(inv_freq);
  add_op(op);
  return op.out[0];
}

TensorId ProgramBuilder::attention(TensorId qkv, int NH, int NKV, const std::string& name) {
  const TensorDesc in = p_.tensors.at(qkv);  // a copy: add_tensor may move the vector
  const int HD = packed_head_dim(in.cols, NH, NKV, name);
  const size_t C = size_t(NH) * HD;
  OpDesc op;
  op.kind = OpKind::kAttention;
  op.name = name;
  op.in = {qkv};
  op.out = {add_tensor(name, in.rows, C, in.rows * NH, name + ".lse")};
  op.C = static_cast<int>(C);
  op.NH = NH;
  op.NKV = NKV;
  op.HD = HD;
  add_op(op);
  return op.out[0];
}

void ProgramBuilder::classifier(TensorId x, ParamId wte, int V, int Vp, const std::string& name) {
  OpDesc op;
  op.kind = OpKind::kClassifier;
  op.name = name;
  op.in = {x};
  op.params = {wte};
  op.C = static_cast<int>(p_.tensors.at(x).cols);
  op.V = V;
  op.Vp = Vp;
  add_op(op);
}

Program ProgramBuilder::finish() {
  Program p = p_;
  REMAT_CHECK(!p.ops.empty() && p.ops.back().kind == OpKind::kClassifier,
              "program: the last op must be the loss");
  for (size_t i = 0; i + 1 < p.ops.size(); i++)
    REMAT_CHECK(p.ops[i].kind != OpKind::kClassifier, "program: one loss op, the last");
  for (size_t i = 0; i < p.ops.size(); i++) {
    const OpDesc& op = p.ops[i];
    REMAT_CHECK(op.out.size() <= 4, "program: an op has at most 4 outputs");
    for (size_t k = 0; k < op.in.size(); k++) {
      TensorDesc& t = p.tensors[op.in[k]];
      t.consumers.push_back(static_cast<int>(i));
      if (backward_reads_input(op.kind, static_cast<int>(k))) t.saved = true;
    }
    for (size_t k = 0; k < op.out.size(); k++)
      if (backward_reads_output(op.kind, static_cast<int>(k))) p.tensors[op.out[k]].saved = true;
  }
  for (OpDesc& op : p.ops) {
    op.fwd_label = "fwd." + op.name;
    op.bwd_label = "bwd." + op.name;
    op.rc_label = "recompute." + op.name;
    op.zero_label = "bwd.zero_d" + (op.out.empty() ? op.name : p.tensors[op.out[0]].name);
  }
  p.block_ops.assign(p.num_blocks, {});
  for (size_t i = 0; i < p.ops.size(); i++)
    if (p.ops[i].block >= 0) p.block_ops[p.ops[i].block].push_back(static_cast<int>(i));
  p.slot_tensor.assign(p.num_blocks, {});
  for (size_t t = 0; t < p.tensors.size(); t++) {
    TensorDesc& d = p.tensors[t];
    if (d.block < 0 || !d.saved || d.checkpoint) continue;
    auto it = std::find(p.slots.begin(), p.slots.end(), d.name);
    if (it == p.slots.end()) {
      p.slots.push_back(d.name);
      p.slot_class.push_back(d.cls);
      it = p.slots.end() - 1;
    }
    d.slot = static_cast<int>(it - p.slots.begin());
  }
  for (int l = 0; l < p.num_blocks; l++) p.slot_tensor[l].assign(p.slots.size(), -1);
  for (size_t t = 0; t < p.tensors.size(); t++) {
    const TensorDesc& d = p.tensors[t];
    if (d.slot < 0) continue;
    REMAT_CHECK(p.slot_tensor[d.block][d.slot] < 0, "program: block " + std::to_string(d.block) +
                                                        " has two tensors named '" + d.name + "'");
    p.slot_tensor[d.block][d.slot] = static_cast<TensorId>(t);
  }
  return p;
}

}  // namespace remat
