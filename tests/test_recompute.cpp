// The memory runtime driving GPT-2: every checkpoint policy trains bitwise like `none`, the
// dry-run prediction equals the measured arena, peaks are ordered, budget plans fit and are
// no costlier than brute force, and a broken schedule is caught.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "base/error.h"
#include "kernels/common.h"
#include "models/model.h"
#include "models/trainer.h"
#include "runtime/fit.h"
#include "tests/tiny_model.h"

#if defined(__SANITIZE_THREAD__)
#define REMAT_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define REMAT_TSAN 1
#endif
#endif

namespace remat {
namespace {

using test::tiny_config;

struct Trace {
  std::vector<float> losses;
  std::vector<std::vector<float>> grads;  // per step
  std::vector<float> params;              // after the last step
};

Trace train_plan(const std::string& shard, const Plan& plan, int steps, int lookahead = 1,
                 bool verify = false, int layers = 3, bool offload_optimizer = false) {
  ModelConfig c = tiny_config(layers);
  const int B = 2, T = 8;
  DataLoader data(shard, B, T, c.vocab_size, false, 1);
  Hyper h;
  h.lr = 3e-3f;
  h.total_steps = steps;
  ScheduleOptions so;
  so.lookahead = lookahead;
  so.verify_recompute = verify;
  so.offload_optimizer = offload_optimizer;
  Trainer tr(c, B, T, 2, h, plan, so, test::init(c, 3));
  Trace t;
  for (int s = 0; s < steps; s++) {
    t.losses.push_back(tr.step(data).loss);
    t.grads.push_back(tr.grads());
  }
  t.params = tr.params();
  return t;
}

Trace train(const std::string& shard, const std::string& policy, int steps, int lookahead = 1,
            bool verify = false, int layers = 3, const std::string& offload = "none") {
  ScheduleOptions so;
  so.lookahead = lookahead;
  Plan plan = make_plan(policy, tiny_config(layers), 2, 8, ActDType::kFP32, so, CostModel{});
  apply_offload(plan, offload);
  return train_plan(shard, plan, steps, lookahead, verify, layers);
}

void expect_bitwise_equal(const Trace& a, const Trace& b, const std::string& what) {
  ASSERT_EQ(a.losses.size(), b.losses.size());
  for (size_t s = 0; s < a.losses.size(); s++) {
    EXPECT_EQ(std::memcmp(&a.losses[s], &b.losses[s], 4), 0)
        << what << ": loss of step " << s << " " << a.losses[s] << " vs " << b.losses[s];
    ASSERT_EQ(a.grads[s].size(), b.grads[s].size());
    EXPECT_EQ(std::memcmp(a.grads[s].data(), b.grads[s].data(), a.grads[s].size() * 4), 0)
        << what << ": gradients of step " << s << " differ";
  }
  EXPECT_EQ(std::memcmp(a.params.data(), b.params.data(), a.params.size() * 4), 0)
      << what << ": parameters differ";
}

class Policies : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir;
    test::write_random_shard(*dir_ / "d.bin", 4000, 67, 21);
    none_ = new Trace(train(*dir_ / "d.bin", "none", 5));
  }
  static void TearDownTestSuite() {
    delete none_;
    delete dir_;
  }
  static test::TempDir* dir_;
  static Trace* none_;
};
test::TempDir* Policies::dir_ = nullptr;
Trace* Policies::none_ = nullptr;

TEST_F(Policies, EveryPresetTrainsBitwiseLikeNone) {
  for (const char* p : {"selective", "attention", "full", "every:1", "every:2", "qkv+r2", "r2",
                        "fch+gelu", "none,1=full", "full,0-1=selective"}) {
    SCOPED_TRACE(p);
    expect_bitwise_equal(train(*dir_ / "d.bin", p, 5), *none_, p);
  }
}

// Offloaded tensors come back from host memory unchanged: every combination with a recompute
// policy trains bitwise like none (a build that drops the copy-ready waits fails here).
TEST_F(Policies, OffloadTrainsBitwiseLikeNone) {
  struct Case {
    const char* recompute;
    const char* offload;
  };
  for (const Case& k : {Case{"none", "input"}, Case{"none", "input+qkv+gelu"},
                        Case{"none", "ln1+qkv+attn+r2+ln2+fch+gelu"}, Case{"full", "input"},
                        Case{"selective", "input+qkv+attn"}, Case{"attention", "input+fch"},
                        Case{"every:2", "input"}, Case{"selective", "input+kept"}}) {
    const std::string what = std::string(k.recompute) + " + offload " + k.offload;
    SCOPED_TRACE(what);
    expect_bitwise_equal(train(*dir_ / "d.bin", k.recompute, 5, 1, false, 3, k.offload), *none_,
                         what);
  }
  for (int la : {0, 2}) {
    SCOPED_TRACE(la);
    expect_bitwise_equal(train(*dir_ / "d.bin", "full", 5, la, false, 3, "input"), *none_,
                         "full + offload input, lookahead");
  }
}

TEST_F(Policies, VerifyRecomputeCoversFetchedTensors) {
  for (const char* off : {"input", "input+qkv+r2"}) {
    SCOPED_TRACE(off);
    EXPECT_NO_THROW(train(*dir_ / "d.bin", "none", 2, 1, /*verify=*/true, 3, off));
  }
  EXPECT_NO_THROW(train(*dir_ / "d.bin", "full", 2, 1, /*verify=*/true, 3, "input"));
}

// --fit: the chosen plan's device total (state + arena peak, by a dry run) is at most the
// budget, tighter budgets choose more recompute and offload, it trains bitwise like none, and
// an infeasible budget names the smallest feasible one.
TEST_F(Policies, FitPlansFitAndTrainBitwiseLikeNone) {
  const ModelConfig c = tiny_config(3);
  auto prog = model_program(c, 2, 8);
  const CostModel m;
  const FitChoice loose = fit_plan(1ull << 30, prog, ActDType::kFP32, {}, m);
  EXPECT_FALSE(loose.plan.any_recompute());
  EXPECT_FALSE(loose.plan.any_offload());
  EXPECT_FALSE(loose.offload_optimizer);
  FitChoice smallest;
  try {
    fit_plan(1000, prog, ActDType::kFP32, {}, m);
    ADD_FAILURE() << "a 1000-byte device fits nothing";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("smallest feasible"), std::string::npos) << msg;
    const size_t at = msg.rfind("--fit ");
    const uint64_t min_bytes = std::stoull(msg.substr(at + 6));
    smallest = fit_plan(min_bytes, prog, ActDType::kFP32, {}, m);
    EXPECT_LE(smallest.device_bytes, min_bytes);
    EXPECT_THROW(fit_plan(min_bytes - 1, prog, ActDType::kFP32, {}, m), Error);
  }
  const uint64_t lo = smallest.device_bytes, hi = loose.device_bytes;
  double last_seconds = 0;
  for (uint64_t budget : {lo, lo + (hi - lo) / 4, lo + (hi - lo) / 2, hi}) {
    SCOPED_TRACE(budget);
    const FitChoice f = fit_plan(budget, prog, ActDType::kFP32, {}, m);
    EXPECT_LE(f.device_bytes, budget);
    EXPECT_EQ(
        f.device_bytes,
        evaluate_choice(f.plan, f.offload_optimizer, prog, ActDType::kFP32, {}, m).device_bytes);
    if (last_seconds > 0) EXPECT_LE(f.seconds(), last_seconds) << "a looser budget costs more";
    last_seconds = f.seconds();
    expect_bitwise_equal(train_plan(*dir_ / "d.bin", f.plan, 5, 1, false, 3, f.offload_optimizer),
                         *none_, f.describe());
  }
}

TEST(Offload, RefusesWhatItCannotDo) {
  const ModelConfig c = tiny_config(3);
  Plan p = parse_plan("full", c);
  EXPECT_THROW(apply_offload(p, "input+qkv"), Error);  // qkv is recomputed
  Plan q = parse_plan("none", c);
  EXPECT_THROW(apply_offload(q, "input+nonsense"), Error);
  apply_offload(q, "input+qkv");
  EXPECT_EQ(q.offload_input[0], 0) << "block 0's input is the embedding's output";
  EXPECT_EQ(q.offload_input[1], 1);
  EXPECT_TRUE(q.any_offload());
}

TEST_F(Policies, LookaheadDoesNotChangeResults) {
  for (int la : {0, 2, 5}) {
    SCOPED_TRACE(la);
    expect_bitwise_equal(train(*dir_ / "d.bin", "full", 5, la), *none_, "full, lookahead");
  }
}

TEST_F(Policies, BudgetPlanTrainsBitwiseLikeNone) {
  ModelConfig c = tiny_config(3);
  const uint64_t none =
      dry_run_activation_peak(c, 2, 8, parse_plan("none", tiny_config(3)), ActDType::kFP32, {});
  const uint64_t full =
      dry_run_activation_peak(c, 2, 8, parse_plan("full", tiny_config(3)), ActDType::kFP32, {});
  const std::string spec = "budget:" + std::to_string((none + full) / 2);
  expect_bitwise_equal(train(*dir_ / "d.bin", spec, 5), *none_, spec);
}

TEST_F(Policies, VerifyRecomputePassesForEveryPreset) {
  for (const char* p : {"selective", "attention", "full", "r2", "qkv+r2"}) {
    SCOPED_TRACE(p);
    EXPECT_NO_THROW(train(*dir_ / "d.bin", p, 2, 1, /*verify=*/true));
  }
}

// The dry run's predictions equal what a real run measures, for every preset.
TEST(Arena, PredictedPeakEqualsMeasured) {
  ModelConfig c = tiny_config(3);
  const int B = 2, T = 8;
  auto p = test::init(c);
  auto in = test::random_tokens(B * T, c.vocab_size, 1),
       tg = test::random_tokens(B * T, c.vocab_size, 2);
  for (const char* spec : {"none", "selective", "attention", "full", "every:2", "r2", "qkv+fch",
                           "none/input+qkv", "full/input", "selective/input+fch"}) {
    for (int la : {0, 1, 2}) {
      SCOPED_TRACE(std::string(spec) + " lookahead " + std::to_string(la));
      ScheduleOptions so;
      so.lookahead = la;
      const std::string sp = spec;
      const size_t slash = sp.find('/');
      Plan plan = parse_plan(sp.substr(0, slash), c);
      if (slash != std::string::npos) apply_offload(plan, sp.substr(slash + 1));
      ModelRunner dry(c, B, T, plan, ActDType::kFP32, so, true);
      dry.forward_backward(nullptr, nullptr, nullptr, nullptr, 1.0f);
      ModelRunner real(c, B, T, plan, ActDType::kFP32, so, false);
      std::vector<float> g(p.size(), 0.0f);
      real.reset_peaks();
      real.forward_backward(p.data(), g.data(), in.data(), tg.data(), 1.0f / (B * T));
      const ArenaStats &a = dry.stats(), &b = real.stats();
      EXPECT_EQ(a.peak_bytes, b.peak_bytes);
      EXPECT_EQ(a.peak_by_usage, b.peak_by_usage);
      EXPECT_EQ(a.activation_peak_in_phase, b.activation_peak_in_phase);
      EXPECT_EQ(a.extent_peak, b.extent_peak);
      EXPECT_EQ(a.allocs, b.allocs);
      EXPECT_EQ(dry.host_stats().peak_bytes, real.host_stats().peak_bytes);
      EXPECT_EQ(dry.host_stats().extent_peak, real.host_stats().extent_peak);
      EXPECT_EQ(real.host_stats().live_bytes, 0u);
      if (slash != std::string::npos) EXPECT_GT(real.host_stats().peak_bytes, 0u);
      EXPECT_EQ(b.live_bytes, 0u) << "everything allocated in a step is freed by its end";
      EXPECT_LE(b.extent_peak, real.arena().capacity());
    }
  }
}

uint64_t act_peak(const ModelConfig& c, int B, int T, const std::string& spec, ActDType dt) {
  return dry_run_activation_peak(c, B, T, parse_plan(spec, c), dt, {});
}

TEST(Plan, PeaksAreOrdered) {
  for (const char* model : {"gpt2", "gpt2-medium"}) {
    ModelConfig c = preset_config(model);
    const uint64_t none = act_peak(c, 4, 1024, "none", ActDType::kBF16),
                   sel = act_peak(c, 4, 1024, "selective", ActDType::kBF16),
                   att = act_peak(c, 4, 1024, "attention", ActDType::kBF16),
                   full = act_peak(c, 4, 1024, "full", ActDType::kBF16);
    EXPECT_GT(none, sel) << model;
    EXPECT_GT(sel, att) << model;
    EXPECT_GT(att, full) << model;
  }
  ModelConfig t = tiny_config(4);
  EXPECT_GT(act_peak(t, 2, 16, "none", ActDType::kFP32),
            act_peak(t, 2, 16, "selective", ActDType::kFP32));
  EXPECT_GT(act_peak(t, 2, 16, "attention", ActDType::kFP32),
            act_peak(t, 2, 16, "full", ActDType::kFP32));
}

TEST(Plan, ParsesPresetsAndOverrides) {
  Plan p = parse_plan("selective,0-1=full,3=none", tiny_config(4));
  EXPECT_EQ(p.recompute[0], parse_plan("full", tiny_config(1)).recompute[0]);
  EXPECT_EQ(p.recompute[1], parse_plan("full", tiny_config(1)).recompute[0]);
  EXPECT_EQ(p.recompute[2], parse_plan("selective", tiny_config(1)).recompute[0]);
  EXPECT_EQ(p.recompute[3], parse_plan("none", tiny_config(1)).recompute[0]);
  EXPECT_EQ(parse_plan("every:2", tiny_config(4)).num_recomputed(), 2 * 7);
  EXPECT_EQ(parse_plan("ln1+gelu", tiny_config(3)).num_recomputed(), 6);
  EXPECT_THROW(parse_plan("bogus", tiny_config(4)), Error);
  EXPECT_THROW(parse_plan("full,7=none", tiny_config(4)), Error);
  EXPECT_THROW(parse_plan("every:9", tiny_config(4)), Error);
  EXPECT_EQ(parse_bytes("2GiB"), 2ull << 30);
  EXPECT_EQ(parse_bytes("1.5KB"), 1500u);
  EXPECT_THROW(parse_bytes("12 parsecs"), Error);
}

// Brute force over every per-block choice of a 2-block model.
struct Brute {
  double cost = INFINITY;
};
Brute brute_force(const ModelConfig& c, int B, int T, uint64_t budget) {
  Brute best;
  auto prog = model_program(c, B, T);
  const int K = static_cast<int>(prog->slots.size());
  const int items = c.num_layers * K;
  Plan p = parse_plan("none", c);
  for (uint64_t mask = 0; mask < (1ull << items); mask++) {
    for (int i = 0; i < items; i++) p.recompute[i / K][i % K] = (mask >> i) & 1;
    const double cost = recompute_cost(*prog, p, 4, CostModel{}).seconds;
    if (cost >= best.cost) continue;
    if (dry_run_activation_peak(c, B, T, p, ActDType::kFP32, {}) <= budget) best.cost = cost;
  }
  return best;
}

TEST(Plan, BudgetFitsAndIsNoCostlierThanBruteForce) {
  ModelConfig c = tiny_config(2);
  const int B = 2, T = 16;
  auto prog = model_program(c, B, T);
  const std::vector<SlotCost> costs = slot_costs(*prog, 4, CostModel{});
  auto peak_of = [&](const Plan& p) {
    return dry_run_activation_peak(c, B, T, p, ActDType::kFP32, {});
  };
  auto seconds_of = [&](const Plan& p) { return recompute_cost(*prog, p, 4, CostModel{}).seconds; };
  const uint64_t none = peak_of(parse_plan("none", c)), full = peak_of(parse_plan("full", c));
  for (double f : {0.0, 0.2, 0.5, 0.8, 0.95}) {
    const uint64_t budget = full + static_cast<uint64_t>(f * (none - full));
    Brute b = brute_force(c, B, T, budget);
    for (int limit : {14, 0}) {  // exhaustive, then the knapsack path
      SCOPED_TRACE("budget " + std::to_string(budget) + " exhaustive_limit " +
                   std::to_string(limit));
      double lb = -1;
      Plan p = plan_for_budget("budget", budget, model_plan_schema(c), costs, peak_of, seconds_of,
                               &lb, limit);
      EXPECT_LE(peak_of(p), budget);
      EXPECT_LE(seconds_of(p), b.cost * (1 + 1e-12));
      EXPECT_LE(lb, b.cost * (1 + 1e-12)) << "the bound must not exceed the optimum";
      EXPECT_GE(lb, 0.0);
    }
  }
}

TEST(Plan, InfeasibleBudgetNamesSmallestFeasible) {
  ModelConfig c = tiny_config(2);
  const uint64_t full = act_peak(c, 2, 8, "full", ActDType::kFP32);
  try {
    make_plan("budget:" + std::to_string(full - 1), c, 2, 8, ActDType::kFP32, {}, CostModel{});
    FAIL() << "an infeasible budget must be an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("budget:" + std::to_string(full)), std::string::npos)
        << e.what();
  }
  Plan p = make_plan("budget:" + std::to_string(full), c, 2, 8, ActDType::kFP32, {}, CostModel{});
  EXPECT_LE(act_peak(c, 2, 8, "full", ActDType::kFP32), full);
  EXPECT_EQ(p.recompute.size(), 2u);
}

#ifndef REMAT_TSAN
// A schedule with a missing event (the main stream does not wait for the recompute-ready
// event, and the side stream is slow) must be caught: its gradients differ from `none`, and
// --verify-recompute names the first bad tensor. Proves the tests above can fail.
TEST(BrokenSchedule, MissingReadyEventIsCaught) {
  test::TempDir dir;
  test::write_random_shard(dir / "d.bin", 4000, 67, 21);
  ModelConfig c = tiny_config(3);
  const int B = 2, T = 8;
  auto run = [&](bool broken, bool verify) {
    DataLoader data(dir / "d.bin", B, T, c.vocab_size, false, 1);
    ScheduleOptions so;
    so.debug_skip_ready_wait = broken;
    so.debug_recompute_delay_ms = broken ? 30 : 0;
    so.verify_recompute = verify;
    Hyper h;
    h.total_steps = 2;
    Trainer tr(c, B, T, 1, h, parse_plan(broken ? "full" : "none", tiny_config(3)), so,
               test::init(c, 3));
    tr.step(data);
    return tr.grads();
  };
  auto good = run(false, false);
  auto bad = run(true, false);
  EXPECT_NE(std::memcmp(good.data(), bad.data(), good.size() * 4), 0)
      << "a missing ready event went unnoticed";
  try {
    run(true, true);
    FAIL() << "verify-recompute did not catch the missing event";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("verify-recompute: block"), std::string::npos) << e.what();
  }
}
#endif

}  // namespace
}  // namespace remat
