// Training on the CUDA backend through the same runner, arena and recompute scheduler as the
// CPU: 10 steps against the CPU reference (fp32 to 1e-4 relative, bf16 to 2e-2), every
// recompute preset bitwise equal to `none`, --verify-recompute, and the dry run's peak equal
// to the measured one. Skips without a device, saying so.
//
// Tolerances: in fp32 (TF32 off) the device and the CPU sum in different orders, a few ulps
// per op that 10 AdamW steps carry into the loss near 1e-6 relative; 1e-4 leaves room for the
// accumulation over steps without hiding a wrong op (a wrong op moves the loss by > 1e-2).
// In bf16 the weights the forward reads are rounded to 8 significant bits (2^-9 relative per
// element) and activations are stored in bf16, so losses move by ~1e-3 relative; 2e-2 is the
// issue's bound.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "io/params.h"
#include "io/shards.h"
#include "models/model.h"
#include "models/trainer.h"
#include "runtime/cuda/cuda_backend.h"
#include "tests/gpu/require_gpu.h"
#include "tests/tiny_model.h"

namespace remat {
namespace {

// Head dim 64 (the tensor-core attention path in bf16), C % 8 == 0, ragged B*T.
ModelConfig gpu_config() {
  ModelConfig c;
  c.num_layers = 3;
  c.channels = 128;
  c.num_heads = 2;
  c.vocab_size = 301;
  c.padded_vocab = 384;
  c.max_seq_len = 64;
  return c;
}

struct TrainRun {
  std::vector<float> losses;
  std::vector<float> params;
  uint64_t arena_peak = 0;
};

TrainRun train(Backend* be, const std::string& shard, const std::string& policy, int steps,
               bool verify = false, const std::string& offload = "none",
               bool offload_optimizer = false) {
  const ModelConfig c = gpu_config();
  const int B = 3, T = 37;
  DataLoader data(shard, B, T, c.vocab_size, false, 5);
  Hyper h;
  h.lr = 1e-3f;
  h.total_steps = steps;
  ScheduleOptions so;
  so.verify_recompute = verify;
  so.offload_optimizer = offload_optimizer;
  Plan plan = parse_plan(policy, c);
  apply_offload(plan, offload);
  Trainer tr(c, B, T, 1, h, plan, so, test::init(c, 3), be);
  TrainRun r;
  for (int s = 0; s < steps; s++) {
    const StepResult sr = tr.step(data);
    EXPECT_FALSE(sr.skipped) << policy << " step " << s;
    r.losses.push_back(sr.loss);
  }
  r.params = tr.params();
  r.arena_peak = tr.runner().stats().peak_bytes;
  return r;
}

// A learnable shard: one random cycle of 97 tokens repeated, so the loss falls within a few
// steps (uniform random tokens leave nothing to learn, and a broken update would go unseen).
void write_cycle_shard(const std::string& path, size_t n, int V) {
  const std::vector<int> cycle = test::random_tokens(97, V, 17);
  std::vector<uint16_t> tokens(n);
  for (size_t i = 0; i < n; i++) tokens[i] = static_cast<uint16_t>(cycle[i % cycle.size()]);
  write_shard(path, tokens.data(), tokens.size());
}

class GpuTrain : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::cuda_device_present()) return;
    write_cycle_shard(dir_ / "train.bin", 20000, gpu_config().vocab_size);
  }
  test::TempDir dir_;
  std::string shard() const { return dir_ / "train.bin"; }
};

void expect_close(const std::vector<float>& a, const std::vector<float>& b, double rtol,
                  const char* what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); i++) {
    ASSERT_TRUE(std::isfinite(a[i]) && std::isfinite(b[i])) << what << " step " << i;
    EXPECT_NEAR(a[i], b[i], rtol * std::fabs(b[i])) << what << " step " << i;
  }
}

TEST_F(GpuTrain, Fp32MatchesTheCpuTo1e4) {
  REMAT_REQUIRE_GPU();
  auto be = make_cuda_backend(ActDType::kFP32);
  const TrainRun gpu = train(be.get(), shard(), "none", 10);
  const TrainRun cpu = train(cpu_backend(), shard(), "none", 10);
  expect_close(gpu.losses, cpu.losses, 1e-4, "fp32 loss");
  EXPECT_LT(gpu.losses.back(), 0.9f * gpu.losses.front()) << "the loss should fall in 10 steps";
}

TEST_F(GpuTrain, Bf16MatchesTheCpuTo2e2) {
  REMAT_REQUIRE_GPU();
  auto be = make_cuda_backend(ActDType::kBF16);
  const TrainRun gpu = train(be.get(), shard(), "none", 10);
  const TrainRun cpu = train(cpu_backend(), shard(), "none", 10);
  expect_close(gpu.losses, cpu.losses, 2e-2, "bf16 loss");
  EXPECT_LT(gpu.losses.back(), 0.9f * gpu.losses.front()) << "the loss should fall in 10 steps";
  // The update itself: the weights moved the way the CPU's did (cosine of the two changes).
  // AdamW moves every weight by about lr whatever its gradient's size, so weights whose
  // gradient is near zero move in a direction bf16 rounding may flip: the bound is 0.5, far
  // from the ~0 of an update that is missing or lands on the wrong tensors.
  const std::vector<float> start = test::init(gpu_config(), 3);
  double dot = 0, ng = 0, nc = 0;
  for (size_t i = 0; i < start.size(); i++) {
    const double g = double(gpu.params[i]) - start[i], c = double(cpu.params[i]) - start[i];
    dot += g * c;
    ng += g * g;
    nc += c * c;
  }
  ASSERT_GT(ng, 0.0) << "bf16 training did not change the weights";
  EXPECT_GT(dot / std::sqrt(ng * nc), 0.5) << "the bf16 update differs from the CPU's";
}

TEST_F(GpuTrain, EveryPresetIsBitwiseEqualToNone) {
  REMAT_REQUIRE_GPU();
  for (ActDType dt : {ActDType::kBF16, ActDType::kFP32}) {
    auto be = make_cuda_backend(dt);
    const TrainRun none = train(be.get(), shard(), "none", 4);
    for (const char* p : {"selective", "attention", "full", "every:2", "ln1+gelu,1-1=full"}) {
      const TrainRun r = train(be.get(), shard(), p, 4);
      ASSERT_EQ(r.losses.size(), none.losses.size());
      EXPECT_EQ(std::memcmp(r.losses.data(), none.losses.data(), r.losses.size() * 4), 0)
          << dtype_name(dt) << " " << p << ": losses differ from none";
      EXPECT_EQ(std::memcmp(r.params.data(), none.params.data(), r.params.size() * 4), 0)
          << dtype_name(dt) << " " << p << ": weights differ from none";
      EXPECT_LT(r.arena_peak, none.arena_peak) << p << " should store less than none";
    }
  }
}

// Offloaded activations (pinned host arena, copy stream) and optimizer state (pinned host
// memory the update kernel reads across PCIe) train bitwise like keeping them on the device.
TEST_F(GpuTrain, OffloadIsBitwiseEqualToNone) {
  REMAT_REQUIRE_GPU();
  for (ActDType dt : {ActDType::kBF16, ActDType::kFP32}) {
    auto be = make_cuda_backend(dt);
    const TrainRun none = train(be.get(), shard(), "none", 4);
    struct Case {
      const char* recompute;
      const char* offload;
      bool optimizer;
    };
    for (const Case& k : {Case{"none", "input+qkv", false}, Case{"full", "input", false},
                          Case{"selective", "input+attn", true}, Case{"none", "none", true}}) {
      const std::string what = std::string(dtype_name(dt)) + " " + k.recompute + " offload " +
                               k.offload + (k.optimizer ? " + optimizer" : "");
      const TrainRun r = train(be.get(), shard(), k.recompute, 4, false, k.offload, k.optimizer);
      EXPECT_EQ(std::memcmp(r.losses.data(), none.losses.data(), r.losses.size() * 4), 0)
          << what << ": losses differ from none";
      EXPECT_EQ(std::memcmp(r.params.data(), none.params.data(), r.params.size() * 4), 0)
          << what << ": weights differ from none";
    }
    TrainRun v;
    ASSERT_NO_THROW(v = train(be.get(), shard(), "full", 2, /*verify=*/true, "input"));
  }
}

TEST_F(GpuTrain, VerifyRecomputePassesForFullAndSelective) {
  REMAT_REQUIRE_GPU();
  auto be = make_cuda_backend(ActDType::kBF16);
  for (const char* p : {"full", "selective"}) {
    TrainRun r;
    ASSERT_NO_THROW(r = train(be.get(), shard(), p, 2, /*verify=*/true)) << p;
    EXPECT_EQ(r.losses.size(), 2u);
  }
}

TEST_F(GpuTrain, DryRunPredictsTheMeasuredPeak) {
  REMAT_REQUIRE_GPU();
  auto be = make_cuda_backend(ActDType::kBF16);
  const ModelConfig c = gpu_config();
  const int B = 3, T = 37;
  for (const char* p : {"none", "selective", "full"}) {
    const Plan plan = parse_plan(p, c);
    ModelRunner dry(c, B, T, plan, ActDType::kBF16, {}, /*dry=*/true);
    dry.forward_backward(nullptr, nullptr, nullptr, nullptr, 1.0f);
    ModelRunner real(c, B, T, plan, ActDType::kBF16, {}, /*dry=*/false, be.get());
    const size_t n = num_params(c);
    void* w = be->alloc(n * 2, "weights");
    void* g = be->alloc(n * 2, "gradients");
    be->upload_elems(w, test::init(c, 3).data(), n);
    const auto in = test::random_tokens(B * T, c.vocab_size, 1);
    const auto tg = test::random_tokens(B * T, c.vocab_size, 2);
    const float loss = real.forward_backward(w, g, in.data(), tg.data(), 1.0f / (B * T));
    EXPECT_NEAR(loss, std::log(float(c.vocab_size)), 0.1) << p;
    EXPECT_EQ(real.stats().peak_bytes, dry.stats().peak_bytes) << p;
    EXPECT_EQ(real.stats().peak_by_usage[0], dry.stats().peak_by_usage[0]) << p;
    be->release(g);
    be->release(w);
  }
}

}  // namespace
}  // namespace remat
