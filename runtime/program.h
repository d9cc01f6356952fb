// The program: a model's forward pass recorded once as ops over named tensors. A model family
// writes its forward on a ProgramBuilder (`h = b.matmul(ln1, w.qkv, w.qkv_b, 3 * C, "qkv")`);
// the runtime alone executes the recording: forward, backward (ops in reverse), recompute
// (a replay of the forward's own ops) and the dry run (runtime/executor.h). Nothing here
// knows a model; the op kinds are the kernels of kernels/ and runtime/backend.h.
//
// Tensors have a name (what plans and error messages use), the block they belong to (-1:
// outside the transformer blocks), a main part of rows x cols elements of the backend's
// element type and an optional fp32 part stored after it in the same arena block (LayerNorm
// mean and rstd, the attention log-sum-exp): a named view of one activation.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace remat {

// The kernels an op may run (runtime/backend.h has their contracts).
enum class OpKind {
  kEmbedding,          // out = wte[tokens] + wpe[t] (no wpe: out = wte[tokens])
  kLayerNorm,          // out (+ mean, rstd) = LayerNorm(x; w, b)
  kResidualLayerNorm,  // res = x + y; out (+ mean, rstd) = LayerNorm(res; w, b)
  kRMSNorm,            // out (+ rstd) = RMSNorm(x; w)
  kResidualRMSNorm,    // res = x + y; out (+ rstd) = RMSNorm(res; w)
  kMatmul,             // out = x @ w^T + bias
  kGelu,               // out = GeLU(x) (tanh form)
  kSwiGLU,             // out = silu(gate) * up from x = [gate | up]
  kRope,               // out = x with its q and k heads rotated (rotary position embedding)
  kAttention,          // out (+ lse) = causal softmax(q k^T / sqrt(HD)) v, from packed qkv
  kClassifier,         // loss = cross-entropy(x @ wte^T, targets), chunked; no tensor output
};
// A fused residual add + normalization (its sum may be stored and the norm replayed alone).
inline bool is_residual_norm(OpKind k) {
  return k == OpKind::kResidualLayerNorm || k == OpKind::kResidualRMSNorm;
}
const char* op_kind_name(OpKind k);

// What kind of value an op output is; the plan's presets are defined by these classes, so
// `selective` means the same in every family (../shared/DESIGN.md "The plan").
enum class TensorClass {
  kEmbedding,   // embedding lookups
  kNorm,        // normalization outputs (memory-bound)
  kResidual,    // residual sums
  kMatmul,      // GEMM outputs, and the rotary embedding of one (it rotates the projection)
  kActivation,  // activation-function outputs (memory-bound)
  kAttention,   // attention outputs
};
const char* tensor_class_name(TensorClass c);

using TensorId = int;
using ParamId = int;
constexpr int kNoBlock = -1;

struct TensorDesc {
  std::string name;      // "ln1", "qkv", ...
  int block = kNoBlock;  // transformer block, or kNoBlock
  size_t rows = 0, cols = 0;
  size_t extra = 0;        // fp32 elements after the main part (0: none)
  std::string extra_name;  // "ln1.mean_rstd"
  TensorClass cls = TensorClass::kMatmul;
  int producer = -1;  // op index
  // A block input: kept by every plan (recompute starts from it). Set by the model.
  bool checkpoint = false;

  // Filled by ProgramBuilder::finish().
  std::vector<int> consumers;  // op indices that read it in the forward pass, ascending
  bool saved = false;          // some op's backward reads it
  int slot = -1;               // index in Program::slots when a plan decides about it
  size_t elems() const { return rows * cols; }
};

struct ParamDesc {
  std::string name;   // Hugging Face style: "h.3.attn.c_attn.weight"
  size_t offset = 0;  // elements from the start of the flat parameter buffer
  size_t count = 0;
  bool decay = false;  // AdamW weight decay applies
};

struct OpDesc {
  OpKind kind = OpKind::kMatmul;
  std::string name;  // "qkv", "residual_ln2", ...
  int block = kNoBlock;
  std::vector<TensorId> in, out;
  std::vector<ParamId> params;  // kind's order (w, b); -1 = absent (no bias)
  // Shapes: N = B*T rows; C in-features (attention: the query width; SwiGLU: its output
  // width; rope: the packed row width); OC out-features (matmul); NH query heads, NKV
  // key/value heads, HD head dimension (attention, rope); V, Vp vocab.
  int B = 0, T = 0, N = 0, C = 0, OC = 0, NH = 0, NKV = 0, HD = 0, V = 0, Vp = 0;
  float eps = 1e-5f;            // RMSNorm epsilon
  std::vector<float> inv_freq;  // rope: the HD/2 rotation frequencies
  // Trace and NVTX labels (filled by finish()): "fwd.qkv", "bwd.qkv", "recompute.qkv", and
  // the zeroing of a new accumulated gradient, "bwd.zero_dx".
  std::string fwd_label, bwd_label, rc_label, zero_label;
};

// How an op's backward delivers the gradient of each of its inputs.
enum class GradMode {
  kAssign,       // the kernel writes d(input)
  kAccumulate,   // the kernel adds into d(input) (zeroed when it is new)
  kPassThrough,  // d(input) is d(output 0) itself (residual sums): one shared buffer
};
GradMode grad_mode(OpKind k, int input);
// The output classes of an op kind, by output index.
TensorClass output_class(OpKind k, int output);
// Tensors the op's backward reads: inputs (by index) and outputs (by index).
bool backward_reads_input(OpKind k, int input);
bool backward_reads_output(OpKind k, int output);

// FLOPs and bytes of one forward run of an op (the planner's cost of replaying it). The
// norm-only replay of a kResidualLayerNorm (its normalized output rebuilt from the stored
// sum) costs what a kLayerNorm does.
struct OpWork {
  double flops = 0, bytes = 0;
};
OpWork op_work(const OpDesc& op, int elem_bytes, bool norm_only = false);

struct Program {
  std::vector<TensorDesc> tensors;
  std::vector<OpDesc> ops;
  std::vector<ParamDesc> params;
  int num_blocks = 0;
  size_t num_params = 0;  // elements of the flat parameter buffer
  int B = 0, T = 0;
  // The saved tensors a plan decides about, by name, in forward order of first appearance:
  // every saved block tensor that is not a checkpoint. slot_class[i] is the class of the op
  // output that made slots[i].
  std::vector<std::string> slots;
  std::vector<TensorClass> slot_class;
  // slot_tensor[block][slot]: the tensor, or -1 when that block has none of that name.
  std::vector<std::vector<TensorId>> slot_tensor;
  std::vector<std::vector<int>> block_ops;  // op indices of each block, ascending

  TensorId find(const std::string& name, int block) const;  // -1 when absent
  ParamId find_param(const std::string& name) const;        // -1 when absent
  // Arena bytes of a tensor at an element size (main and extra parts aligned).
  size_t tensor_bytes(TensorId t, int elem_bytes) const;
  // Where the fp32 part starts within the tensor's arena block.
  size_t extra_offset(TensorId t, int elem_bytes) const;
};

// Records a forward pass. Calls return the new tensors; `begin_block(l)` puts what follows in
// block l, `end_blocks()` outside any block again.
class ProgramBuilder {
 public:
  ProgramBuilder(int B, int T);

  // A parameter view of the flat buffer (the model decides the layout).
  ParamId param(const std::string& name, size_t offset, size_t count, bool decay);
  void set_num_params(size_t n) { p_.num_params = n; }

  void begin_block(int l);
  void end_blocks();
  // Marks a block input: every plan keeps it.
  void checkpoint(TensorId t);

  // wpe -1: no position embedding.
  TensorId embedding(ParamId wte, ParamId wpe, int C, const std::string& name);
  TensorId layernorm(TensorId x, ParamId w, ParamId b, const std::string& name);
  // Returns {x + y, LayerNorm(x + y)}.
  std::pair<TensorId, TensorId> residual_layernorm(TensorId x, TensorId y, ParamId w, ParamId b,
                                                   const std::string& res_name,
                                                   const std::string& ln_name,
                                                   const std::string& op_name);
  TensorId rmsnorm(TensorId x, ParamId w, float eps, const std::string& name);
  // Returns {x + y, RMSNorm(x + y)}.
  std::pair<TensorId, TensorId> residual_rmsnorm(TensorId x, TensorId y, ParamId w, float eps,
                                                 const std::string& res_name,
                                                 const std::string& ln_name,
                                                 const std::string& op_name);
  TensorId matmul(TensorId x, ParamId w, ParamId bias, int OC, const std::string& name);
  TensorId gelu(TensorId x, const std::string& name);
  // x (N, 2I) = [gate | up] -> (N, I).
  TensorId swiglu(TensorId x, const std::string& name);
  // Packed qkv with NH query and NKV key/value heads -> the same with q and k rotated by the
  // HD/2 frequencies inv_freq (kernels/rope.h).
  TensorId rope(TensorId qkv, int NH, int NKV, std::vector<float> inv_freq,
                const std::string& name);
  // Packed qkv (C + 2 NKV C / NH columns) -> (N, C); NKV = NH without grouped-query attention.
  TensorId attention(TensorId qkv, int NH, int NKV, const std::string& name);
  void classifier(TensorId x, ParamId wte, int V, int Vp, const std::string& name);

  // Checks the recording (one loss op, last; every tensor produced once) and derives uses,
  // saved tensors and plan slots.
  Program finish();

 private:
  TensorId add_tensor(const std::string& name, size_t rows, size_t cols, size_t extra,
                      const std::string& extra_name);
  // A normalization of x (stats_per_row fp32 statistics per row, named name + stats_name),
  // and the same fused with the residual add x + y.
  TensorId add_norm(OpKind kind, TensorId x, std::vector<ParamId> params, float eps,
                    size_t stats_per_row, const std::string& name, const std::string& stats_name);
  std::pair<TensorId, TensorId> add_residual_norm(OpKind kind, TensorId x, TensorId y,
                                                  std::vector<ParamId> params, float eps,
                                                  size_t stats_per_row, const std::string& res_name,
                                                  const std::string& ln_name,
                                                  const std::string& stats_name,
                                                  const std::string& op_name);
  int add_op(OpDesc op);
  Program p_;
  int block_ = kNoBlock;
};

}  // namespace remat
