#include "runtime/executor.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <limits>
#include <mutex>
#include <set>
#include <thread>

#include "kernels/common.h"
#include "runtime/nvtx.h"

namespace remat {

namespace {

// Labels reach traces that may outlive an executor: keep one copy of each, process-wide.
const char* intern(const std::string& s) {
  static std::mutex mu;
  static std::set<std::string> pool;
  std::lock_guard<std::mutex> lock(mu);
  return pool.insert(s).first->c_str();
}

// Kept by the plan in a training step: a checkpoint, or a saved tensor the plan does not
// recompute.
bool kept(const Program& p, const Plan& plan, TensorId t) {
  const TensorDesc& d = p.tensors[t];
  if (d.checkpoint) return true;
  if (!d.saved) return false;
  return d.slot < 0 || !plan.recompute[d.block][d.slot];
}

bool recomputed(const Program& p, const Plan& plan, TensorId t) {
  const TensorDesc& d = p.tensors[t];
  return d.slot >= 0 && !d.checkpoint && plan.recompute[d.block][d.slot];
}

}  // namespace

double op_seconds(const OpDesc& op, int es, const CostModel& m, bool norm_only) {
  const OpWork w = op_work(op, es, norm_only);
  return std::max(w.flops / m.flops_per_s, w.bytes / m.bytes_per_s);
}

std::vector<ReplayStep> replay_of(const Program& p, const Plan& plan, int block) {
  std::vector<char> need(p.tensors.size(), 0);
  for (size_t k = 0; k < p.slots.size(); k++) {
    const TensorId t = p.slot_tensor[block][k];
    if (t >= 0 && plan.recompute[block][k]) need[t] = 1;
  }
  std::vector<ReplayStep> steps;
  const std::vector<int>& ops = p.block_ops[block];
  for (auto it = ops.rbegin(); it != ops.rend(); ++it) {
    const int i = *it;
    const OpDesc& op = p.ops[i];
    bool any = false;
    for (TensorId o : op.out) any = any || need[o];
    if (!any) continue;
    ReplayStep st;
    st.op = i;
    st.norm_only = is_residual_norm(op.kind) && !need[op.out[0]] && kept(p, plan, op.out[0]);
    const std::vector<TensorId> reads = st.norm_only ? std::vector<TensorId>{op.out[0]} : op.in;
    for (TensorId t : reads) {
      if (kept(p, plan, t) || need[t]) continue;
      const TensorDesc& d = p.tensors[t];
      if (d.block != block || d.producer < 0)
        throw Error(
            "--recompute '" + plan.spec + "': block " + std::to_string(block) +
            " cannot be rebuilt: it needs '" + d.name + "' of " +
            (d.block < 0 ? std::string("outside the blocks") : "block " + std::to_string(d.block)) +
            ", which the plan does not keep");
      need[t] = 1;
    }
    for (size_t k = 0; k < op.out.size(); k++) {
      const TensorId o = op.out[k];
      if (st.norm_only && k == 0)
        st.roles.push_back(ReplayRole::kSkip);
      else if (recomputed(p, plan, o) && need[o])
        st.roles.push_back(ReplayRole::kTarget);
      else if (need[o])
        st.roles.push_back(ReplayRole::kTemp);
      else
        st.roles.push_back(ReplayRole::kScratch);
    }
    steps.push_back(std::move(st));
  }
  std::reverse(steps.begin(), steps.end());
  // Temps are freed after the last replay step that reads them.
  for (size_t s = 0; s < steps.size(); s++) {
    const OpDesc& op = p.ops[steps[s].op];
    for (size_t k = 0; k < op.out.size(); k++) {
      if (steps[s].roles[k] != ReplayRole::kTemp) continue;
      const TensorId o = op.out[k];
      size_t last = s;
      for (size_t r = s + 1; r < steps.size(); r++) {
        const OpDesc& later = p.ops[steps[r].op];
        const bool reads = steps[r].norm_only
                               ? later.out[0] == o
                               : std::find(later.in.begin(), later.in.end(), o) != later.in.end();
        if (reads) last = r;
      }
      steps[last].free_after.push_back(o);
    }
  }
  return steps;
}

CopyCost copy_cost(const Program& p, const Plan& plan, int es, const CostModel& m) {
  CopyCost c;
  if (plan.offload_input.empty()) return c;
  for (size_t t = 0; t < p.tensors.size(); t++) {
    const TensorDesc& d = p.tensors[t];
    if (d.block < 0 || !d.saved || !kept(p, plan, static_cast<TensorId>(t))) continue;
    const bool off = d.checkpoint ? plan.offload_input[d.block] != 0
                                  : d.slot >= 0 && plan.offload[d.block][d.slot] != 0;
    if (off) c.bytes += 2 * p.tensor_bytes(static_cast<TensorId>(t), es);
  }
  c.seconds = double(c.bytes) / m.link_bytes_per_s;
  return c;
}

RecomputeCost recompute_cost(const Program& p, const Plan& plan, int es, const CostModel& m) {
  RecomputeCost c;
  for (int l = 0; l < p.num_blocks; l++) {
    if (!plan.block_recomputes(l)) continue;
    for (const ReplayStep& st : replay_of(p, plan, l)) {
      const OpDesc& op = p.ops[st.op];
      c.flops += op_work(op, es, st.norm_only).flops;
      c.seconds += op_seconds(op, es, m, st.norm_only);
    }
  }
  return c;
}

std::vector<SlotCost> slot_costs(const Program& p, int es, const CostModel& m) {
  const PlanSchema schema = plan_schema(p);
  const size_t K = p.slots.size();
  std::vector<SlotCost> out(K);
  // Each slot's stand-alone replay in block 0, and the ops it runs.
  std::vector<std::vector<ReplayStep>> steps(K);
  std::vector<std::vector<int>> ops_of(K);
  for (size_t k = 0; k < K; k++) {
    const TensorId t = p.slot_tensor[0][k];
    if (t < 0) continue;
    out[k].bytes = p.tensor_bytes(t, es);
    Plan one = parse_plan("none", schema);
    one.recompute[0][k] = 1;
    steps[k] = replay_of(p, one, 0);
    for (const ReplayStep& st : steps[k]) {
      const OpDesc& op = p.ops[st.op];
      out[k].flops += op_work(op, es, st.norm_only).flops;
      out[k].seconds += op_seconds(op, es, m, st.norm_only);
      ops_of[k].push_back(st.op);
    }
  }
  // The exclusive part: ops no other slot's replay runs (an op two slots may both replay
  // is charged to neither, so the sum over any set stays below the set's true cost).
  for (size_t k = 0; k < K; k++) {
    for (const ReplayStep& st : steps[k]) {
      bool shared = false;
      for (size_t j = 0; j < K; j++)
        if (j != k && std::count(ops_of[j].begin(), ops_of[j].end(), st.op)) shared = true;
      if (!shared) out[k].lb_seconds += op_seconds(p.ops[st.op], es, m, st.norm_only);
    }
  }
  return out;
}

// Outputs of one op at most (a residual LayerNorm has two).
constexpr size_t kMaxOutputs = 4;

// The host arena's memory: the backend's host allocations (pinned on CUDA), one reservation.
class HostMemory : public MemoryResource {
 public:
  explicit HostMemory(Backend* be) : be_(be) {}
  void* reserve(size_t bytes) override { return be_->alloc_host(bytes); }
  void release(void* p) override { be_->release_host(p); }
  void poison(void*, size_t, Stream*) override {}

 private:
  Backend* be_;
};

struct Executor::Impl {
  std::shared_ptr<const Program> prog;
  const Program& P;
  Plan plan;
  ActDType dtype;
  ScheduleOptions opt;
  bool dry;
  Backend* be;
  int es;
  int L;
  int last_block_op = -1;  // index of the last op inside a block
  std::unique_ptr<Stream> main, side, copy;
  std::unique_ptr<Arena> arena;
  std::unique_ptr<HostMemory> host_memory;
  std::unique_ptr<Arena> host_arena;  // offloaded activations between forward and backward

  // Derived once.
  std::vector<char> keep;  // kept by the plan in training
  std::vector<char> offl;  // kept in host memory between forward and backward
  std::vector<std::vector<TensorId>> fetch_list;  // per block: its offloaded tensors
  std::vector<int> last_fwd_train;  // last forward use among the ops a training forward runs
  std::vector<std::vector<ParamId>> grads_final_at;  // per op: params whose gradient it finishes
  Executor::GradReadyHook grad_ready_hook;
  std::vector<int> last_fwd_eval;                // last forward use, evaluation (all ops)
  std::vector<int> last_bwd_read;                // lowest op index whose backward reads it, -1 none
  std::vector<std::vector<int>> replay_readers;  // blocks whose replay reads a stored tensor
  std::vector<std::vector<ReplayStep>> replay;   // per block
  std::vector<const char*> fwd_label, bwd_label, rc_label, zero_label;
  std::vector<const char*> tensor_name, extra_name;

  // Per step.
  std::vector<Block> blk;  // activation of each tensor
  struct GradBuf {
    Block b;
    int pending = 0;  // tensors sharing it whose producer's backward has not run
  };
  std::vector<GradBuf> gbufs;   // reused; one entry per live gradient buffer
  std::vector<int> free_gbufs;  // gbufs entries not in use
  std::vector<int> grad_of;     // tensor -> gbufs index, -1 none
  std::vector<Event> ready, fetched;
  std::vector<char> issued, waited;
  std::vector<Block> hblk;  // host copy of each offloaded tensor
  int next_rc = 0;
  std::vector<std::vector<char>> shadow;  // verify-recompute originals, per tensor
  std::vector<int> inputs_host, targets_host;
  int* tokens_dev = nullptr;
  float* loss_host = nullptr;
  const void* Pw = nullptr;  // this step's parameters and gradients
  void* Gw = nullptr;

  Impl(std::shared_ptr<const Program> p, Plan pl, ActDType dt, ScheduleOptions o, bool d,
       Backend* backend)
      : prog(std::move(p)),
        P(*prog),
        plan(std::move(pl)),
        dtype(dt),
        opt(o),
        dry(d),
        be(backend ? backend : cpu_backend()) {
    L = P.num_blocks;
    REMAT_CHECK(static_cast<int>(plan.recompute.size()) == L,
                "plan has " + std::to_string(plan.recompute.size()) + " blocks, model has " +
                    std::to_string(L));
    REMAT_CHECK(plan.slots == P.slots, "the plan was made for another program");
    REMAT_REQUIRE(opt.lookahead >= 0, "--lookahead must be >= 0");
    REMAT_CHECK(dry || dtype == be->dtype(), std::string("the ") + be->name() +
                                                 " backend computes in " + dtype_name(be->dtype()) +
                                                 ", not " + dtype_name(dtype));
#ifdef REMAT_INJECT_MISSING_EVENT
    // Test-only build: the missing-event fault (see CMakeLists.txt) in every executor.
    opt.debug_skip_ready_wait = true;
    opt.debug_recompute_delay_ms = std::max(opt.debug_recompute_delay_ms, 5);
#endif
    es = act_bytes(dtype);
    derive();
    if (dry) {
      main = make_null_stream("main", 0);
      side = make_null_stream("recompute", 1);
      copy = make_null_stream("copy", 2);
      arena = std::make_unique<Arena>(std::numeric_limits<size_t>::max(), nullptr);
      host_arena = std::make_unique<Arena>(std::numeric_limits<size_t>::max(), nullptr);
    } else {
      size_t need = 0, need_host = 0;
      {
        Impl probe(prog, plan, dt, o, true, be);
        probe.forward_backward(nullptr, nullptr, nullptr, nullptr, 1.0f);
        need = probe.arena->stats().extent_peak;
        need_host = probe.host_arena->stats().extent_peak;
        Impl probe_eval(prog, plan, dt, o, true, be);
        probe_eval.forward_loss(nullptr, nullptr, nullptr);
        need = std::max(need, probe_eval.arena->stats().extent_peak);
      }
      main = be->make_stream("remat-main", 0);
      side = be->make_stream("remat-recompute", 1);
      copy = be->make_stream("remat-copy", 2);
      arena = std::make_unique<Arena>(std::max<size_t>(need, Arena::kAlign), be->memory());
      host_memory = std::make_unique<HostMemory>(be);
      // No offload: an arena of one alignment unit (nothing is ever placed in it).
      host_arena =
          std::make_unique<Arena>(std::max<size_t>(need_host, Arena::kAlign), host_memory.get());
      int C = 1, NH = 1, Vp = 1;
      for (const OpDesc& op : P.ops) {
        C = std::max(C, op.C);
        if (op.kind == OpKind::kAttention) NH = std::max(NH, op.NH);
        Vp = std::max(Vp, op.Vp);
      }
      be->reserve_scratch(P.B, P.T, C, NH, Vp);
      const size_t N = size_t(P.B) * P.T;
      tokens_dev = static_cast<int*>(be->alloc(2 * N * sizeof(int), "token ids"));
      loss_host = static_cast<float*>(be->alloc_host(sizeof(float)));
      inputs_host.resize(N);
      targets_host.resize(N);
    }
  }

  ~Impl() {
    if (main) main->synchronize();
    if (side) side->synchronize();
    if (copy) copy->synchronize();
    arena.reset();
    host_arena.reset();
    if (tokens_dev) be->release(tokens_dev);
    if (loss_host) be->release_host(loss_host);
  }

  void derive() {
    const size_t nt = P.tensors.size(), no = P.ops.size();
    // The backward pass runs ops in reverse: a parameter's gradient is final after its
    // lowest-indexed user.
    grads_final_at.assign(no, {});
    std::vector<int> last_writer(P.params.size(), -1);
    for (size_t i = 0; i < no; i++)
      for (ParamId q : P.ops[i].params)
        if (q >= 0 && last_writer[q] < 0) last_writer[q] = static_cast<int>(i);
    for (size_t q = 0; q < P.params.size(); q++)
      if (last_writer[q] >= 0) grads_final_at[last_writer[q]].push_back(static_cast<ParamId>(q));
    keep.assign(nt, 0);
    for (size_t t = 0; t < nt; t++) keep[t] = kept(P, plan, static_cast<TensorId>(t));
    // Offloaded: a block input the plan sends to the host, or a kept slot it does.
    offl.assign(nt, 0);
    fetch_list.assign(L, {});
    const bool has_offload = !plan.offload_input.empty();
    for (size_t t = 0; has_offload && t < nt; t++) {
      const TensorDesc& d = P.tensors[t];
      if (d.block < 0 || !keep[t] || !d.saved) continue;
      const bool off = d.checkpoint ? plan.offload_input[d.block] != 0
                                    : d.slot >= 0 && plan.offload[d.block][d.slot] != 0;
      if (!off) continue;
      offl[t] = 1;
      fetch_list[d.block].push_back(static_cast<TensorId>(t));
    }
    last_fwd_train.assign(nt, -1);
    last_fwd_eval.assign(nt, -1);
    last_bwd_read.assign(nt, -1);
    for (size_t i = 0; i < no; i++) {
      const OpDesc& op = P.ops[i];
      for (size_t k = 0; k < op.in.size(); k++) {
        const TensorId t = op.in[k];
        last_fwd_eval[t] = static_cast<int>(i);
        if (op.kind != OpKind::kClassifier) last_fwd_train[t] = static_cast<int>(i);
        if (backward_reads_input(op.kind, static_cast<int>(k)) &&
            (last_bwd_read[t] < 0 || static_cast<int>(i) < last_bwd_read[t]))
          last_bwd_read[t] = static_cast<int>(i);
      }
      for (size_t k = 0; k < op.out.size(); k++) {
        const TensorId t = op.out[k];
        if (backward_reads_output(op.kind, static_cast<int>(k)) &&
            (last_bwd_read[t] < 0 || static_cast<int>(i) < last_bwd_read[t]))
          last_bwd_read[t] = static_cast<int>(i);
      }
      if (op.block >= 0) last_block_op = static_cast<int>(i);
      // A real run's labels live for the process (traces may outlive the executor); a dry
      // run's for the program.
      auto label = [&](const std::string& l) { return dry ? l.c_str() : intern(l); };
      fwd_label.push_back(label(op.fwd_label));
      bwd_label.push_back(label(op.bwd_label));
      rc_label.push_back(label(op.rc_label));
      zero_label.push_back(label(op.zero_label));
    }
    // Arena block names (read in error messages only) and verify-recompute's tensor names.
    for (const TensorDesc& d : P.tensors) {
      tensor_name.push_back(d.name.c_str());
      extra_name.push_back(d.extra_name.c_str());
    }
    replay.assign(L, {});
    replay_readers.assign(nt, {});
    for (int l = 0; l < L; l++) {
      if (!plan.block_recomputes(l)) continue;
      replay[l] = replay_of(P, plan, l);
      for (const ReplayStep& st : replay[l]) {
        const OpDesc& op = P.ops[st.op];
        const std::vector<TensorId> reads = st.norm_only ? std::vector<TensorId>{op.out[0]} : op.in;
        for (TensorId t : reads)
          if (keep[t]) replay_readers[t].push_back(l);
      }
    }
    blk.assign(nt, Block{});
    grad_of.assign(nt, -1);
    gbufs.reserve(nt);
    free_gbufs.reserve(nt);
    ready.assign(L, Event{});
    fetched.assign(L, Event{});
    hblk.assign(nt, Block{});
    issued.assign(L, 0);
    waited.assign(L, 0);
    if (opt.verify_recompute) shadow.assign(nt, {});
  }

  // ---- pointers ----
  void* param_ptr(const void* base, ParamId id) const {
    if (!base || id < 0) return nullptr;
    return const_cast<char*>(static_cast<const char*>(base)) + P.params[id].offset * es;
  }
  void* w(const OpDesc& op, int k) const {
    return k < static_cast<int>(op.params.size()) ? param_ptr(Pw, op.params[k]) : nullptr;
  }
  void* g(const OpDesc& op, int k) const {
    return k < static_cast<int>(op.params.size()) ? param_ptr(Gw, op.params[k]) : nullptr;
  }
  float* extra_of(const Block& b, TensorId t) const {
    if (!b.ptr) return nullptr;
    return reinterpret_cast<float*>(static_cast<char*>(b.ptr) + P.extra_offset(t, es));
  }
  // LayerNorm statistics are stored as mean (N) then rstd (N).
  static float* rstd_of(float* mean, int n) {
    return mean ? mean + n : nullptr;
  }
  static const float* rstd_of(const float* mean, int n) {
    return mean ? mean + n : nullptr;
  }
  const int* dev_inputs() const {
    return tokens_dev;
  }
  const int* dev_targets() const {
    return tokens_dev ? tokens_dev + size_t(P.B) * P.T : nullptr;
  }

  Block alloc_act(TensorId t, Stream* s, Phase ph) {
    return arena->alloc(P.tensor_bytes(t, es), s, ph, Usage::kActivation, tensor_name[t]);
  }
  void free_act(TensorId t, Stream* s) {
    if (blk[t].valid()) arena->free(blk[t], s);
  }
  int rows_chunk() const {
    const int N = P.B * P.T;
    if (opt.classifier_chunk > 0) return opt.classifier_chunk;
    int Vp = 1;
    for (const OpDesc& op : P.ops) Vp = std::max(Vp, op.Vp);
    const long rows = (64l << 20) / (long(Vp) * es);
    return static_cast<int>(std::max<long>(1, std::min<long>(N, rows)));
  }

  // ---- forward kernels (forward pass and replay) ----
  // out[k]: the blocks the op's outputs go to (a scratch block for an unneeded output).
  void run_forward(const OpDesc& op, Stream* s, const char* label, Block* const* out,
                   bool norm_only) {
    const int N = op.N, C = op.C;
    auto in = [&](int k) -> const void* { return blk[op.in[k]].ptr; };
    switch (op.kind) {
      case OpKind::kEmbedding:
        be->encoder_forward(s, out[0]->ptr, dev_inputs(), w(op, 0), w(op, 1), op.B, op.T, C);
        break;
      case OpKind::kLayerNorm: {
        float* st = extra_of(*out[0], op.out[0]);
        be->layernorm_forward(s, out[0]->ptr, st, rstd_of(st, N), in(0), w(op, 0), w(op, 1), N, C,
                              label, op.block);
        break;
      }
      case OpKind::kResidualLayerNorm: {
        float* st = extra_of(*out[1], op.out[1]);
        if (norm_only)
          be->layernorm_forward(s, out[1]->ptr, st, rstd_of(st, N), blk[op.out[0]].ptr, w(op, 0),
                                w(op, 1), N, C, label, op.block);
        else
          be->residual_layernorm_forward(s, out[0]->ptr, out[1]->ptr, st, rstd_of(st, N), in(0),
                                         in(1), w(op, 0), w(op, 1), N, C, label, op.block);
        break;
      }
      case OpKind::kRMSNorm:
        be->rmsnorm_forward(s, out[0]->ptr, extra_of(*out[0], op.out[0]), in(0), w(op, 0), N, C,
                            op.eps, label, op.block);
        break;
      case OpKind::kResidualRMSNorm: {
        float* rstd = extra_of(*out[1], op.out[1]);
        if (norm_only)
          be->rmsnorm_forward(s, out[1]->ptr, rstd, blk[op.out[0]].ptr, w(op, 0), N, C, op.eps,
                              label, op.block);
        else
          be->residual_rmsnorm_forward(s, out[0]->ptr, out[1]->ptr, rstd, in(0), in(1), w(op, 0), N,
                                       C, op.eps, label, op.block);
        break;
      }
      case OpKind::kMatmul:
        be->matmul_forward(s, out[0]->ptr, in(0), w(op, 0), w(op, 1), N, C, op.OC, label, op.block);
        break;
      case OpKind::kGelu:
        be->gelu_forward(s, out[0]->ptr, in(0), size_t(N) * C, label, op.block);
        break;
      case OpKind::kSwiGLU:
        be->swiglu_forward(s, out[0]->ptr, in(0), N, C, label, op.block);
        break;
      case OpKind::kRope:
        be->rope_forward(s, out[0]->ptr, in(0), op.B, op.T, op.NH, op.NKV, op.HD,
                         op.inv_freq.data(), label, op.block);
        break;
      case OpKind::kAttention:
        be->attention_forward(s, out[0]->ptr, extra_of(*out[0], op.out[0]), in(0), op.B, op.T, C,
                              op.NH, op.NKV, label, op.block);
        break;
      case OpKind::kClassifier:
        throw Error("internal: the loss op runs through run_loss");
    }
  }

  // ---- forward pass ----
  enum class Mode { kTrain, kLoss, kLogits };
  void release_forward(TensorId t, Mode mode) {
    if (mode == Mode::kTrain && opt.verify_recompute && !dry && recomputed(P, plan, t)) {
      std::vector<char>& dst = shadow[t];
      dst.resize(P.tensor_bytes(t, es));
      be->copy_to_host(main.get(), dst.data(), blk[t].ptr, dst.size(), "verify.save",
                       P.tensors[t].block);
    }
    free_act(t, main.get());
  }

  void forward(Mode mode, int pos, float* logits_out) {
    Stream* s = main.get();
    const bool train = mode == Mode::kTrain;
    const std::vector<int>& last = train ? last_fwd_train : last_fwd_eval;
    for (size_t i = 0; i < P.ops.size(); i++) {
      const OpDesc& op = P.ops[i];
      if (op.kind == OpKind::kClassifier) {
        if (train) continue;  // runs fused with its backward at the start of the backward pass
        run_eval_loss(op, mode, pos, logits_out);
      } else {
        std::array<Block*, kMaxOutputs> out{};
        for (size_t k = 0; k < op.out.size(); k++) {
          blk[op.out[k]] = alloc_act(op.out[k], s, Phase::kForward);
          out[k] = &blk[op.out[k]];
        }
        run_forward(op, s, fwd_label[i], out.data(), false);
      }
      for (TensorId t : op.in) {
        if (last[t] != static_cast<int>(i) || !blk[t].valid()) continue;
        if (!(train && keep[t]))
          release_forward(t, mode);
        else if (train && offl[t])
          offload_out(t);
      }
      for (TensorId o : op.out) {
        if (last[o] >= 0) continue;
        if (!(train && keep[o]))
          release_forward(o, mode);
        else if (train && offl[o])
          offload_out(o);
      }
    }
  }

  void run_eval_loss(const OpDesc& op, Mode mode, int pos, float* logits_out) {
    Stream* s = main.get();
    const void* x = blk[op.in[0]].ptr;
    if (mode == Mode::kLogits) {
      const void* row = x ? static_cast<const char*>(x) + size_t(pos) * op.C * es : nullptr;
      be->classifier_logits(s, logits_out, row, w(op, 0), 1, op.C, op.V, op.Vp);
      return;
    }
    const int chunk = rows_chunk();
    Block logits =
        arena->alloc(size_t(chunk) * op.Vp * es, s, Phase::kForward, Usage::kWorkspace, "logits");
    Block losses = arena->alloc(size_t(op.N) * 4, s, Phase::kForward, Usage::kWorkspace, "losses");
    be->classifier(s, losses.f32(), nullptr, nullptr, x, w(op, 0), dev_targets(), op.N, op.C, op.V,
                   op.Vp, 0.0f, logits.ptr, chunk, loss_host);
    arena->free(logits, s);
    arena->free(losses, s);
  }

  // ---- offload: out to the host after the last forward use, back ahead of the backward ----
  void offload_out(TensorId t) {
    const int l = P.tensors[t].block;
    const size_t bytes = P.tensor_bytes(t, es);
    if (opt.verify_recompute && !dry) {
      std::vector<char>& dst = shadow[t];
      dst.resize(bytes);
      be->copy_to_host(main.get(), dst.data(), blk[t].ptr, bytes, "verify.save", l);
    }
    copy->wait(main->record());
    hblk[t] =
        host_arena->alloc(bytes, copy.get(), Phase::kForward, Usage::kActivation, tensor_name[t]);
    be->copy_to_host(copy.get(), hblk[t].ptr, blk[t].ptr, bytes, "offload.copy_out", l);
    // Its device bytes may be reused once the copy has read them.
    arena->free(blk[t], copy.get());
  }

  // Brings block l's offloaded tensors back on the copy stream; fetched[l] marks their arrival.
  void fetch(int l) {
    if (fetch_list[l].empty()) return;
    NvtxRange nvtx_fetch("fetch.block", l);
    if (opt.debug_recompute_delay_ms > 0 && !dry) {
      int ms = opt.debug_recompute_delay_ms;
      be->host_task(
          copy.get(), [ms] { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); },
          "debug.delay", l);
    }
    for (TensorId t : fetch_list[l]) {
      const size_t bytes = P.tensor_bytes(t, es);
      blk[t] =
          arena->alloc(bytes, copy.get(), Phase::kBackward, Usage::kActivation, tensor_name[t]);
      be->upload_async(copy.get(), blk[t].ptr, hblk[t].ptr, bytes, "offload.fetch");
      host_arena->free(hblk[t], copy.get());
    }
    fetched[l] = copy->record();
  }

  // ---- recompute of block l on the side stream ----
  void recompute(int l) {
    NvtxRange nvtx_block("recompute.block", l);
    Stream* s = side.get();
    // A replay may read a tensor that was offloaded (a block input under full recompute).
    if (!fetch_list[l].empty() && !opt.debug_skip_ready_wait) s->wait(fetched[l]);
    if (opt.debug_recompute_delay_ms > 0 && !dry) {
      int ms = opt.debug_recompute_delay_ms;
      be->host_task(
          s, [ms] { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }, "debug.delay",
          l);
    }
    for (const ReplayStep& st : replay[l]) {
      const OpDesc& op = P.ops[st.op];
      std::array<Block, kMaxOutputs> scratch{};
      std::array<Block*, kMaxOutputs> out{};
      for (size_t k = 0; k < op.out.size(); k++) {
        const TensorId o = op.out[k];
        switch (st.roles[k]) {
          case ReplayRole::kTarget:
          case ReplayRole::kTemp:
            blk[o] = alloc_act(o, s, Phase::kRecompute);
            out[k] = &blk[o];
            break;
          case ReplayRole::kScratch:
            scratch[k] = alloc_act(o, s, Phase::kRecompute);
            out[k] = &scratch[k];
            break;
          case ReplayRole::kSkip:
            out[k] = &blk[o];
            break;
        }
      }
      run_forward(op, s, rc_label[st.op], out.data(), st.norm_only);
      for (TensorId t : st.free_after) free_act(t, s);
      for (Block& b : scratch)
        if (b.valid()) arena->free(b, s);
    }
    ready[l] = s->record();
  }

  // Block l has work ahead of its backward: offloaded tensors to fetch, tensors to rebuild.
  bool prepares(int l) const {
    return plan.block_recomputes(l) || !fetch_list[l].empty();
  }
  void prepare(int l) {
    fetch(l);
    if (plan.block_recomputes(l)) recompute(l);
    issued[l] = 1;
  }
  void issue_down_to(int lowest) {
    for (; next_rc >= std::max(lowest, 0); next_rc--)
      if (prepares(next_rc)) prepare(next_rc);
  }

  // The main stream may read block l's rebuilt tensors after this.
  void ensure_ready(int l) {
    if (l < 0 || l >= L || !prepares(l) || waited[l]) return;
    if (!issued[l]) issue_down_to(l);
    if (!opt.debug_skip_ready_wait) {
      if (plan.block_recomputes(l)) main->wait(ready[l]);
      if (!fetch_list[l].empty()) main->wait(fetched[l]);
    }
    waited[l] = 1;
    verify(l);
  }

  // Compares each rebuilt tensor of block l with its forward original, bit for bit, in the
  // main stream's order after the ready event. Throws, naming block, tensor and index.
  void verify(int l) {
    if (!opt.verify_recompute || dry) return;
    std::vector<TensorId> check = fetch_list[l];
    for (size_t k = 0; k < P.slots.size(); k++) {
      const TensorId t = P.slot_tensor[l][k];
      if (t >= 0 && plan.recompute[l][k]) check.push_back(t);
    }
    for (TensorId t : check) {
      auto now = std::make_shared<std::vector<char>>(P.tensor_bytes(t, es));
      be->copy_to_host(main.get(), now->data(), blk[t].ptr, now->size(), "verify.load", l);
      const std::vector<char>* orig = &shadow[t];
      const size_t main_elems = P.tensors[t].elems(), extra = P.tensors[t].extra;
      const size_t extra_off = P.extra_offset(t, es);
      const char* name = tensor_name[t];
      const char* xname = extra_name[t];
      const int esz = es;
      be->host_task(
          main.get(),
          [orig, now, main_elems, extra, extra_off, l, esz, name, xname] {
            auto check = [&](size_t off, size_t elems, int size, const char* what) {
              const char* a = orig->data() + off;
              const char* r = now->data() + off;
              if (std::memcmp(a, r, elems * size) == 0) return;
              for (size_t i = 0; i < elems; i++) {
                if (std::memcmp(a + i * size, r + i * size, size) != 0) {
                  throw Error("verify-recompute: block " + std::to_string(l) + " tensor " + what +
                              " differs at index " + std::to_string(i) + ": forward " +
                              element_string(a + i * size, size) + ", recompute " +
                              element_string(r + i * size, size));
                }
              }
            };
            check(0, main_elems, esz, name);
            if (extra) check(extra_off, extra, 4, xname);
          },
          "verify.compare", l);
    }
  }
  // One stored element (fp32, or bf16 as the top half of an fp32) as text.
  static std::string element_string(const char* p, int size) {
    uint32_t bits = 0;
    if (size == 2) {
      uint16_t h;
      std::memcpy(&h, p, 2);
      bits = uint32_t(h) << 16;
    } else {
      std::memcpy(&bits, p, 4);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return std::to_string(f);
  }

  // ---- activation gradients ----
  void* grad_ptr(TensorId t) const {
    return grad_of[t] >= 0 ? gbufs[grad_of[t]].b.ptr : nullptr;
  }
  bool has_grad(TensorId t) const {
    return grad_of[t] >= 0;
  }
  int new_grad(TensorId t, bool zero) {
    Stream* s = main.get();
    GradBuf gb;
    gb.b = arena->alloc(Arena::round_up(P.tensors[t].elems() * es), s, Phase::kBackward,
                        Usage::kWorkspace, "activation gradient");
    gb.pending = 1;
    if (zero) be->zero(s, gb.b.ptr, P.tensors[t].elems() * es, zero_label[P.tensors[t].producer]);
    int id;
    if (free_gbufs.empty()) {
      gbufs.push_back(gb);
      id = static_cast<int>(gbufs.size() - 1);
    } else {
      id = free_gbufs.back();
      free_gbufs.pop_back();
      gbufs[id] = gb;
    }
    grad_of[t] = id;
    return id;
  }
  void share_grad(TensorId t, int id) {
    REMAT_CHECK(grad_of[t] < 0, "internal: tensor '" + P.tensors[t].name +
                                    "' gets a second gradient buffer (unsupported fan-out)");
    grad_of[t] = id;
    gbufs[id].pending++;
  }
  // t's producer has run its backward: t's gradient is no longer needed.
  void consume_grad(TensorId t) {
    const int id = grad_of[t];
    if (id < 0) return;
    grad_of[t] = -1;
    if (--gbufs[id].pending == 0) {
      arena->free(gbufs[id].b, main.get());
      free_gbufs.push_back(id);
    }
  }
  // Before the kernel adds into t's gradient on behalf of t: no other tensor may still read it.
  void check_sole(TensorId t) {
    REMAT_CHECK(gbufs[grad_of[t]].pending == 1,
                "internal: gradient of '" + P.tensors[t].name +
                    "' accumulated while another tensor still reads the shared buffer");
  }
  // The gradient buffer an input gets, by its op's grad mode.
  void* input_grad(const OpDesc& op, int k, bool may_reuse_out0) {
    const TensorId t = op.in[k];
    switch (grad_mode(op.kind, k)) {
      case GradMode::kAccumulate:
        if (!has_grad(t)) new_grad(t, /*zero=*/true);
        check_sole(t);
        return grad_ptr(t);
      case GradMode::kAssign:
        REMAT_CHECK(!has_grad(t), "internal: tensor '" + P.tensors[t].name +
                                      "' is read by two ops whose backward writes its gradient "
                                      "(unsupported fan-out)");
        if (may_reuse_out0 && has_grad(op.out[0]) && gbufs[grad_of[op.out[0]]].pending == 1)
          share_grad(t, grad_of[op.out[0]]);  // elementwise: in place
        else
          new_grad(t, /*zero=*/false);
        return grad_ptr(t);
      case GradMode::kPassThrough:
        share_grad(t, grad_of[op.out[0]]);
        return grad_ptr(t);
    }
    return nullptr;
  }

  // Frees the saved tensors whose last backward read was op i, after any replay that reads
  // them has finished.
  void release_backward(int i) {
    const OpDesc& op = P.ops[i];
    auto release = [&](TensorId t) {
      if (last_bwd_read[t] != i || !blk[t].valid()) return;
      for (int l : replay_readers[t]) ensure_ready(l);
      free_act(t, main.get());
    };
    for (TensorId t : op.in) release(t);
    for (TensorId t : op.out) release(t);
  }

  // ---- the backward of op i on the main stream ----
  void backward_op(int i, float dloss) {
    const OpDesc& op = P.ops[i];
    Stream* s = main.get();
    const int N = op.N, C = op.C;
    const char* label = bwd_label[i];
    auto act = [&](TensorId t) -> const void* { return blk[t].ptr; };
    auto read_ready = [&]() {
      for (size_t k = 0; k < op.in.size(); k++)
        if (backward_reads_input(op.kind, static_cast<int>(k)))
          ensure_ready(P.tensors[op.in[k]].block);
      for (size_t k = 0; k < op.out.size(); k++)
        if (backward_reads_output(op.kind, static_cast<int>(k)))
          ensure_ready(P.tensors[op.out[k]].block);
    };
    // Ops after the last block issue the look-ahead as the last block does.
    const int eff = op.block >= 0 ? op.block : (i > last_block_op ? L - 1 : -1);
    switch (op.kind) {
      case OpKind::kClassifier: {
        // Its buffers are taken before the look-ahead recompute allocates, so they come from
        // bytes the main stream freed and the classifier never waits on the side stream.
        void* dx = input_grad(op, 0, false);
        const int chunk = rows_chunk();
        Block logits = arena->alloc(size_t(chunk) * op.Vp * es, s, Phase::kBackward,
                                    Usage::kWorkspace, "logits");
        Block losses =
            arena->alloc(size_t(N) * 4, s, Phase::kBackward, Usage::kWorkspace, "losses");
        issue_down_to(eff - opt.lookahead);
        read_ready();
        NvtxRange nvtx_classifier("classifier");
        be->classifier(s, losses.f32(), dx, g(op, 0), act(op.in[0]), w(op, 0), dev_targets(), N, C,
                       op.V, op.Vp, dloss, logits.ptr, chunk, loss_host);
        arena->free(logits, s);
        arena->free(losses, s);
        break;
      }
      case OpKind::kResidualLayerNorm:
      case OpKind::kResidualRMSNorm: {
        const TensorId res = op.out[0], ln = op.out[1];
        if (!has_grad(res)) new_grad(res, /*zero=*/true);
        issue_down_to(eff - opt.lookahead);
        read_ready();
        if (has_grad(ln)) {
          check_sole(res);
          const float* st = extra_of(blk[ln], ln);
          if (op.kind == OpKind::kResidualLayerNorm)
            be->layernorm_backward(s, grad_ptr(res), g(op, 0), g(op, 1), grad_ptr(ln), act(res),
                                   w(op, 0), st, rstd_of(st, N), N, C, label, op.block);
          else
            be->rmsnorm_backward(s, grad_ptr(res), g(op, 0), grad_ptr(ln), act(res), w(op, 0), st,
                                 N, C, label, op.block);
        }
        consume_grad(ln);
        input_grad(op, 0, false);
        input_grad(op, 1, false);
        consume_grad(res);
        break;
      }
      default: {
        const TensorId out = op.out[0];
        if (!has_grad(out)) {  // nothing downstream: a zero gradient, nothing to do
          issue_down_to(eff - opt.lookahead);
          break;
        }
        if (op.kind == OpKind::kEmbedding) {
          issue_down_to(eff - opt.lookahead);
          be->encoder_backward(s, g(op, 0), g(op, 1), grad_ptr(out), dev_inputs(), op.B, op.T, C,
                               static_cast<int>(P.params[op.params[0]].count / C));
          consume_grad(out);
          break;
        }
        void* dx = input_grad(op, 0, op.kind == OpKind::kGelu);
        issue_down_to(eff - opt.lookahead);
        read_ready();
        const void* dout = grad_ptr(out);
        const void* x = act(op.in[0]);
        switch (op.kind) {
          case OpKind::kLayerNorm: {
            const float* st = extra_of(blk[out], out);
            be->layernorm_backward(s, dx, g(op, 0), g(op, 1), dout, x, w(op, 0), st, rstd_of(st, N),
                                   N, C, label, op.block);
            break;
          }
          case OpKind::kRMSNorm:
            be->rmsnorm_backward(s, dx, g(op, 0), dout, x, w(op, 0), extra_of(blk[out], out), N, C,
                                 label, op.block);
            break;
          case OpKind::kMatmul:
            be->matmul_backward(s, dx, g(op, 0), g(op, 1), dout, x, w(op, 0), N, C, op.OC, label,
                                op.block);
            break;
          case OpKind::kGelu:
            be->gelu_backward(s, dx, x, dout, size_t(N) * C, label, op.block);
            break;
          case OpKind::kSwiGLU:
            be->swiglu_backward(s, dx, x, dout, N, C, label, op.block);
            break;
          case OpKind::kRope:
            be->rope_backward(s, dx, dout, op.B, op.T, op.NH, op.NKV, op.HD, op.inv_freq.data(),
                              label, op.block);
            break;
          case OpKind::kAttention: {
            const float* lse = extra_of(blk[out], out);
            be->attention_backward(s, dx, dout, x, act(out), lse, op.B, op.T, C, op.NH, op.NKV,
                                   label, op.block);
            break;
          }
          default:
            throw Error(std::string("internal: no backward for ") + op_kind_name(op.kind));
        }
        consume_grad(out);
        break;
      }
    }
    release_backward(i);
  }

  void stage_tokens(const int* in, const int* tg) {
    if (dry) return;
    const size_t n = size_t(P.B) * P.T;
    if (in) {
      std::copy(in, in + n, inputs_host.begin());
      be->upload_async(main.get(), tokens_dev, inputs_host.data(), n * sizeof(int),
                       "upload.inputs");
    }
    if (tg) {
      std::copy(tg, tg + n, targets_host.begin());
      be->upload_async(main.get(), tokens_dev + n, targets_host.data(), n * sizeof(int),
                       "upload.targets");
    }
  }

  void begin_step(const void* params, void* grads) {
    arena->rewind();
    host_arena->rewind();
    Pw = params;
    Gw = grads;
    std::fill(blk.begin(), blk.end(), Block{});
    std::fill(grad_of.begin(), grad_of.end(), -1);
    gbufs.clear();
    free_gbufs.clear();
    std::fill(issued.begin(), issued.end(), 0);
    std::fill(waited.begin(), waited.end(), 0);
    next_rc = L - 1;
  }

  float forward_backward(const void* params, void* grads, const int* in, const int* tg,
                         float dloss) {
    begin_step(params, grads);
    stage_tokens(in, tg);
    forward(Mode::kTrain, -1, nullptr);
    // The side stream may start rebuilding once the forward pass has produced its inputs.
    Event fwd_done = main->record();
    side->wait(fwd_done);
    std::unique_ptr<NvtxRange> nvtx_block;  // one range per block's backward
    for (int i = static_cast<int>(P.ops.size()) - 1; i >= 0; i--) {
      const int b = P.ops[i].block;
      if (i + 1 == static_cast<int>(P.ops.size()) || P.ops[i + 1].block != b) {
        nvtx_block.reset();
        if (b >= 0) nvtx_block = std::make_unique<NvtxRange>("backward.block", b);
      }
      backward_op(i, dloss);
      if (grad_ready_hook)
        for (ParamId q : grads_final_at[i]) grad_ready_hook(q, main.get());
    }
    nvtx_block.reset();
    side->synchronize();
    copy->synchronize();
    main->synchronize();
    return loss_host ? *loss_host : 0.0f;
  }

  float forward_loss(const void* params, const int* in, const int* tg) {
    begin_step(params, nullptr);
    stage_tokens(in, tg);
    forward(Mode::kLoss, -1, nullptr);
    main->synchronize();
    return loss_host ? *loss_host : 0.0f;
  }

  void forward_logits(const void* params, const int* in, int pos, float* logits) {
    REMAT_CHECK(pos >= 0 && pos < P.T, "forward_logits: position out of range");
    begin_step(params, nullptr);
    stage_tokens(in, nullptr);
    forward(Mode::kLogits, pos, logits);
    main->synchronize();
  }
};

Executor::Executor(std::shared_ptr<const Program> program, Plan plan, ActDType dtype,
                   ScheduleOptions opt, bool dry, Backend* backend)
    : impl_(std::make_unique<Impl>(std::move(program), std::move(plan), dtype, opt, dry, backend)) {
}
Executor::~Executor() = default;
void Executor::set_grad_ready_hook(GradReadyHook hook) {
  impl_->grad_ready_hook = std::move(hook);
}

float Executor::forward_backward(const void* params, void* grads, const int* inputs,
                                 const int* targets, float dloss) {
  return impl_->forward_backward(params, grads, inputs, targets, dloss);
}
float Executor::forward_loss(const void* params, const int* inputs, const int* targets) {
  return impl_->forward_loss(params, inputs, targets);
}
void Executor::forward_logits(const void* params, const int* inputs, int pos, float* logits) {
  impl_->forward_logits(params, inputs, pos, logits);
}
const ArenaStats& Executor::stats() const {
  return impl_->arena->stats();
}
void Executor::reset_peaks() {
  impl_->arena->reset_peaks();
  impl_->host_arena->reset_peaks();
}
Arena& Executor::arena() {
  return *impl_->arena;
}
Stream* Executor::main_stream() {
  return impl_->main.get();
}
Stream* Executor::side_stream() {
  return impl_->side.get();
}
Stream* Executor::copy_stream() {
  return impl_->copy.get();
}
const ArenaStats& Executor::host_stats() const {
  return impl_->host_arena->stats();
}
Backend& Executor::backend() {
  return *impl_->be;
}
const Plan& Executor::plan() const {
  return impl_->plan;
}
const Program& Executor::program() const {
  return impl_->P;
}

uint64_t dry_run_activation_peak(std::shared_ptr<const Program> p, const Plan& plan, ActDType dt,
                                 const ScheduleOptions& opt) {
  Executor dry(std::move(p), plan, dt, opt, /*dry=*/true);
  dry.forward_backward(nullptr, nullptr, nullptr, nullptr, 1.0f);
  return dry.stats().peak_by_usage[static_cast<int>(Usage::kActivation)];
}

Plan make_plan(const std::string& spec, std::shared_ptr<const Program> p, ActDType dt,
               const ScheduleOptions& opt, const CostModel& m, double* lower_bound_seconds) {
  if (lower_bound_seconds) *lower_bound_seconds = 0;
  const PlanSchema schema = plan_schema(*p);
  uint64_t budget = 0;
  if (!parse_budget(spec, &budget)) {
    Plan plan = parse_plan(spec, schema);
    for (int l = 0; l < schema.num_blocks; l++)
      if (plan.block_recomputes(l)) replay_of(*p, plan, l);  // throws when not rebuildable
    return plan;
  }
  const int es = act_bytes(dt);
  return plan_for_budget(
      spec, budget, schema, slot_costs(*p, es, m),
      [&](const Plan& q) { return dry_run_activation_peak(p, q, dt, opt); },
      [&](const Plan& q) { return recompute_cost(*p, q, es, m).seconds; }, lower_bound_seconds);
}

}  // namespace remat
