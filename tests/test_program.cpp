// The program and its executor, apart from GPT-2:
// - each preset's exact set of rebuilt tensors for GPT-2 (a change to the presets' classes or
//   to the plan parser fails here, not silently);
// - the smallest replay: what each single rebuilt tensor replays;
// - a toy family that exists only here (an MLP-only residual network with two stacked GeLUs,
//   no biases, no attention, its parameters interleaved per block) trains with every
//   recompute policy through the same executor, bitwise equal to no recompute: the proof
//   that runtime/ is model-agnostic.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/rng.h"
#include "models/model.h"
#include "runtime/executor.h"
#include "runtime/program.h"
#include "tests/tiny_model.h"

namespace remat {
namespace {

using test::tiny_config;

std::string rebuilt(const Plan& p, int block) {
  return p.block_set(block);
}

TEST(Presets, GPT2RebuildsExactlyTheseTensors) {
  const ModelConfig c = tiny_config(4);
  EXPECT_EQ(model_plan_schema(c).slots,
            (std::vector<std::string>{"ln1", "qkv", "attn", "r2", "ln2", "fch", "gelu"}));
  const std::pair<const char*, const char*> expect[] = {
      {"none", ""},
      {"selective", "ln1+ln2+gelu"},
      {"attention", "ln1+attn+ln2+gelu"},
      {"full", "ln1+qkv+attn+r2+ln2+fch+gelu"},
      {"qkv+gelu", "qkv+gelu"},
  };
  for (auto [spec, set] : expect) {
    const Plan p = parse_plan(spec, c);
    for (int l = 0; l < 4; l++) EXPECT_EQ(rebuilt(p, l), set) << spec << " block " << l;
  }
  const Plan every = parse_plan("every:2", c);
  EXPECT_EQ(rebuilt(every, 0), "ln1+qkv+attn+r2+ln2+fch+gelu");
  EXPECT_EQ(rebuilt(every, 1), "");
  EXPECT_EQ(rebuilt(every, 2), "ln1+qkv+attn+r2+ln2+fch+gelu");
  EXPECT_EQ(rebuilt(every, 3), "");
  const Plan over = parse_plan("selective,1-2=full,3=none", c);
  EXPECT_EQ(rebuilt(over, 0), "ln1+ln2+gelu");
  EXPECT_EQ(rebuilt(over, 1), "ln1+qkv+attn+r2+ln2+fch+gelu");
  EXPECT_EQ(rebuilt(over, 2), "ln1+qkv+attn+r2+ln2+fch+gelu");
  EXPECT_EQ(rebuilt(over, 3), "");
  for (const char* bad : {"every:0", "every:5", "bogus", "ln1+x", "full,4=none", "full,1"})
    EXPECT_THROW(parse_plan(bad, c), Error) << bad;
}

// The ops a block's replay runs, as "name" or "name(norm)" for a norm-only replay.
std::string replay_ops(const Program& p, const Plan& plan, int block) {
  std::string out;
  for (const ReplayStep& st : replay_of(p, plan, block))
    out += (out.empty() ? "" : " ") + p.ops[st.op].name + (st.norm_only ? "(norm)" : "");
  return out;
}

TEST(Replay, GPT2ReplaysTheSmallestSubProgram) {
  const ModelConfig c = tiny_config(3);
  auto prog = model_program(c, 2, 8);
  auto at = [&](const std::string& spec, int block) {
    return replay_ops(*prog, parse_plan(spec, c), block);
  };
  EXPECT_EQ(at("ln1", 0), "ln1");                         // block 0: its own LayerNorm
  EXPECT_EQ(at("ln1", 1), "residual_ln1(norm)");          // from the stored block input
  EXPECT_EQ(at("ln2", 1), "residual_ln2(norm)");          // from the kept r2
  EXPECT_EQ(at("r2", 1), "attproj residual_ln2");         // ln2 kept: written to scratch
  EXPECT_EQ(at("qkv", 1), "qkv");                         // ln1 kept: read
  EXPECT_EQ(at("qkv+ln1", 1), "residual_ln1(norm) qkv");  // ln1 rebuilt first
  EXPECT_EQ(at("gelu", 2), "gelu");
  EXPECT_EQ(at("full", 1), "residual_ln1(norm) qkv attn attproj residual_ln2 fch gelu");
  // The fused op replays once for r2 and ln2 together.
  const Plan both = parse_plan("r2+ln2", c), r2 = parse_plan("r2", c), ln2 = parse_plan("ln2", c);
  const CostModel m;
  EXPECT_LT(recompute_cost(*prog, both, 4, m).seconds,
            recompute_cost(*prog, r2, 4, m).seconds + recompute_cost(*prog, ln2, 4, m).seconds);
  // The planner's exclusive costs are a lower bound for every set.
  const std::vector<SlotCost> costs = slot_costs(*prog, 4, m);
  for (const char* spec : {"r2+ln2", "ln1+qkv", "full", "selective"}) {
    const Plan p = parse_plan(spec, c);
    double lb = 0;
    for (int l = 0; l < 3; l++)
      for (size_t k = 0; k < costs.size(); k++)
        if (p.recompute[l][k]) lb += costs[k].lb_seconds;
    EXPECT_LE(lb, recompute_cost(*prog, p, 4, m).seconds * (1 + 1e-12)) << spec;
  }
}

// ---- the toy family ----
struct Toy {
  int L = 3, C = 16, V = 37, Vp = 64, maxT = 8;
  // Layout: wte, wpe, then per block [norm w, norm b, up (2C x C), down (C x 2C)], final norm.
  size_t block_params() const { return 2 * C + 2 * C * C + 2 * C * C; }
  size_t num_params() const {
    return size_t(Vp) * C + size_t(maxT) * C + L * block_params() + 2 * C;
  }

  std::shared_ptr<const Program> program(int B, int T) const {
    ProgramBuilder b(B, T);
    size_t off = 0;
    auto take = [&](const std::string& name, size_t n, bool decay) {
      ParamId id = b.param(name, off, n, decay);
      off += n;
      return id;
    };
    const ParamId wte = take("embed", size_t(Vp) * C, true);
    const ParamId wpe = take("pos", size_t(maxT) * C, true);
    TensorId x = b.embedding(wte, wpe, C, "x");
    b.checkpoint(x);
    TensorId down = -1;
    for (int l = 0; l < L; l++) {
      b.begin_block(l);
      const std::string p = "b" + std::to_string(l) + ".";
      const ParamId nw = take(p + "norm.w", C, false), nb = take(p + "norm.b", C, false);
      const ParamId up = take(p + "up", 2 * size_t(C) * C, true);
      const ParamId dn = take(p + "down", 2 * size_t(C) * C, true);
      TensorId n;
      if (l == 0) {
        n = b.layernorm(x, nw, nb, "n");
      } else {
        std::tie(x, n) = b.residual_layernorm(x, down, nw, nb, "x", "n", "add_norm");
        b.checkpoint(x);
      }
      TensorId u = b.matmul(n, up, -1, 2 * C, "u");
      TensorId v = b.gelu(u, "v");
      TensorId w = b.gelu(v, "w");
      down = b.matmul(w, dn, -1, C, "down");
    }
    b.end_blocks();
    TensorId xf, nf;
    std::tie(xf, nf) = b.residual_layernorm(x, down, take("final.w", C, false),
                                            take("final.b", C, false), "x", "nf", "add_final");
    (void)xf;
    b.classifier(nf, wte, V, Vp, "loss");
    b.set_num_params(off);
    return std::make_shared<const Program>(b.finish());
  }

  std::vector<float> init(uint64_t seed) const {
    std::vector<float> p(num_params());
    Philox r(seed, 5);
    for (float& x : p) x = 0.2f * (static_cast<float>(r.next_u32() % 20001) / 10000.0f - 1.0f);
    return p;
  }
};

struct ToyRun {
  std::vector<float> losses, params;
  std::vector<std::vector<float>> grads;
};

ToyRun train_toy(const std::string& policy, int lookahead, bool verify) {
  const Toy toy;
  const int B = 2, T = 8, N = B * T;
  auto prog = toy.program(B, T);
  ScheduleOptions so;
  so.lookahead = lookahead;
  so.verify_recompute = verify;
  Plan plan = make_plan(policy, prog, ActDType::kFP32, so, CostModel{});
  Executor ex(prog, plan, ActDType::kFP32, so, /*dry=*/false);
  ToyRun run;
  run.params = toy.init(4);
  std::vector<float> g(prog->num_params);
  for (int step = 0; step < 4; step++) {
    const std::vector<int> in = test::random_tokens(N, toy.V, 10);  // one batch: the loss must fall
    const std::vector<int> tg = test::random_tokens(N, toy.V, 20);
    std::fill(g.begin(), g.end(), 0.0f);
    run.losses.push_back(
        ex.forward_backward(run.params.data(), g.data(), in.data(), tg.data(), 1.0f / N));
    for (size_t i = 0; i < g.size(); i++) run.params[i] -= 0.5f * g[i];
    run.grads.push_back(g);
  }
  return run;
}

TEST(ToyFamily, SlotsAndPresetsFollowTheOpClasses) {
  auto prog = Toy().program(2, 8);
  EXPECT_EQ(prog->slots, (std::vector<std::string>{"n", "u", "v", "w"}));
  const PlanSchema s = plan_schema(*prog);
  EXPECT_EQ(parse_plan("selective", s).block_set(1), "n+v+w");  // norm and activations
  EXPECT_EQ(parse_plan("attention", s).block_set(1), "n+v+w");  // it has no attention
  EXPECT_EQ(parse_plan("full", s).block_set(2), "n+u+v+w");
  EXPECT_EQ(replay_ops(*prog, parse_plan("w", s), 1), "w");
  EXPECT_EQ(replay_ops(*prog, parse_plan("n+w", s), 1), "add_norm(norm) w");
}

TEST(ToyFamily, EveryPolicyTrainsBitwiseLikeNone) {
  const ToyRun none = train_toy("none", 1, false);
  for (float l : none.losses) EXPECT_TRUE(std::isfinite(l));
  EXPECT_LT(none.losses.back(), none.losses.front()) << "the toy learns nothing";
  auto prog = Toy().program(2, 8);
  // Half way between the peaks of none and full at a look-ahead.
  auto budget = [&](int la) {
    ScheduleOptions so;
    so.lookahead = la;
    const PlanSchema s = plan_schema(*prog);
    const uint64_t none = dry_run_activation_peak(prog, parse_plan("none", s), ActDType::kFP32, so);
    const uint64_t full = dry_run_activation_peak(prog, parse_plan("full", s), ActDType::kFP32, so);
    EXPECT_LT(full, none);
    return "budget:" + std::to_string((none + full) / 2);
  };
  for (const std::string& name :
       {std::string("selective"), std::string("full"), std::string("u+w"), std::string("every:2"),
        std::string("full,1=none"), std::string("budget")}) {
    for (int la : {0, 1, 2}) {
      const std::string p = name == "budget" ? budget(la) : name;
      SCOPED_TRACE(p + " lookahead " + std::to_string(la));
      const ToyRun r = train_toy(p, la, /*verify=*/la == 1);
      ASSERT_EQ(r.losses.size(), none.losses.size());
      EXPECT_EQ(std::memcmp(r.losses.data(), none.losses.data(), 4 * r.losses.size()), 0);
      for (size_t s = 0; s < r.grads.size(); s++)
        EXPECT_EQ(std::memcmp(r.grads[s].data(), none.grads[s].data(), 4 * r.grads[s].size()), 0)
            << "gradients of step " << s;
      EXPECT_EQ(std::memcmp(r.params.data(), none.params.data(), 4 * r.params.size()), 0);
    }
  }
}

TEST(ToyFamily, DryRunPeakEqualsMeasured) {
  const Toy toy;
  auto prog = toy.program(2, 8);
  std::vector<float> params = toy.init(1), g(prog->num_params);
  const auto in = test::random_tokens(16, toy.V, 1), tg = test::random_tokens(16, toy.V, 2);
  for (const char* spec : {"none", "selective", "full", "u"}) {
    const Plan plan = parse_plan(spec, plan_schema(*prog));
    Executor dry(prog, plan, ActDType::kFP32, {}, true);
    dry.forward_backward(nullptr, nullptr, nullptr, nullptr, 1.0f);
    Executor real(prog, plan, ActDType::kFP32, {}, false);
    real.forward_backward(params.data(), g.data(), in.data(), tg.data(), 1.0f / 16);
    EXPECT_EQ(dry.stats().peak_by_usage, real.stats().peak_by_usage) << spec;
    EXPECT_EQ(dry.stats().extent_peak, real.stats().extent_peak) << spec;
    EXPECT_EQ(real.stats().live_bytes, 0u) << spec;
  }
}

}  // namespace
}  // namespace remat
