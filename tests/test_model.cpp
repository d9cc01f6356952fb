// The GPT-2 model on the CPU backend: whole-model gradients, initial loss, overfitting,
// determinism.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>

#include "io/params.h"
#include "io/train_state.h"
#include "models/model.h"
#include "models/trainer.h"
#include "tests/gradient_check.h"
#include "tests/tiny_model.h"

namespace remat {
namespace {

using test::tiny_config;

float loss_of(ModelRunner& r, const std::vector<float>& p, const std::vector<int>& in,
              const std::vector<int>& tg) {
  return r.forward_loss(p.data(), in.data(), tg.data());
}

TEST(Model, InitialLossNearLogVocab) {
  ModelConfig c = tiny_config();
  auto p = test::init(c);
  const int B = 2, T = 8;
  auto in = test::random_tokens(B * T, c.vocab_size, 1),
       tg = test::random_tokens(B * T, c.vocab_size, 2);
  ModelRunner r(c, B, T, parse_plan("none", c), ActDType::kFP32, {}, false);
  const float loss = loss_of(r, p, in, tg);
  // Logits of a freshly initialised model are small, so the softmax is near uniform over V
  // (never over the padded Vp).
  EXPECT_NEAR(loss, std::log(float(c.vocab_size)), 0.05);
}

TEST(Model, ForwardBackwardLossEqualsForwardLoss) {
  ModelConfig c = tiny_config();
  auto p = test::init(c);
  const int B = 3, T = 5;
  auto in = test::random_tokens(B * T, c.vocab_size, 3),
       tg = test::random_tokens(B * T, c.vocab_size, 4);
  ModelRunner r(c, B, T, parse_plan("none", c), ActDType::kFP32, {}, false);
  std::vector<float> g(p.size(), 0.0f);
  const float a = r.forward_backward(p.data(), g.data(), in.data(), tg.data(), 1.0f / (B * T));
  const float b = loss_of(r, p, in, tg);
  EXPECT_EQ(a, b);
}

// Whole-model gradient check: for every parameter tensor, its largest-gradient element
// against a central difference; and the directional derivative along the gradient.
TEST(Model, GradientMatchesFiniteDifferences) {
  ModelConfig c = tiny_config();
  auto p = test::init(c, 11);
  // Larger weights than GPT-2's init so every path carries signal.
  for (auto& x : p) x *= 4.0f;
  test::expect_gradient_matches_finite_differences(c, p, 2, 6);
}

// Trains on one batch repeatedly (a shard holding exactly one batch).
TEST(Model, OverfitsOneBatch) {
  test::TempDir dir;
  ModelConfig c = tiny_config();
  const int B = 2, T = 8;
  test::write_random_shard(dir / "one.bin", B * T + 1, c.vocab_size, 9);
  DataLoader data(dir / "one.bin", B, T, c.vocab_size, false, 1);
  Hyper h;
  h.lr = 1e-2f;
  h.beta2 = 0.99f;
  h.total_steps = 150;
  Trainer tr(c, B, T, 1, h, parse_plan("none", c), {}, test::init(c));
  float first = 0, last = 0;
  for (int s = 0; s < 150; s++) {
    StepResult r = tr.step(data);
    if (s == 0) first = r.loss;
    last = r.loss;
  }
  EXPECT_GT(first, 3.5f);
  EXPECT_LT(last, 0.3f) << "a 2-layer model should memorise 16 tokens";
}

std::vector<float> run_losses(uint64_t seed, const std::string& shard, int steps,
                              std::vector<float>* final_params) {
  ModelConfig c = tiny_config();
  DataLoader data(shard, 2, 8, c.vocab_size, true, seed);
  Hyper h;
  h.lr = 3e-3f;
  h.total_steps = steps;
  Trainer tr(c, 2, 8, 2, h, parse_plan("none", c), {}, test::init(c, seed));
  std::vector<float> losses;
  for (int s = 0; s < steps; s++) losses.push_back(tr.step(data).loss);
  *final_params = tr.params();
  return losses;
}

TEST(Model, SameSeedGivesBitwiseIdenticalLosses) {
  test::TempDir dir;
  test::write_random_shard(dir / "d.bin", 2000, 67, 3);
  std::vector<float> pa, pb, pc;
  auto a = run_losses(5, dir / "d.bin", 6, &pa);
  auto b = run_losses(5, dir / "d.bin", 6, &pb);
  auto d = run_losses(6, dir / "d.bin", 6, &pc);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); i++) EXPECT_EQ(a[i], b[i]) << "step " << i;
  EXPECT_EQ(0, std::memcmp(pa.data(), pb.data(), pa.size() * sizeof(float)));
  EXPECT_NE(a, d) << "another seed must give other losses";
}

TEST(Model, LearningRateSchedule) {
  Hyper h;
  h.lr = 1.0f;
  h.warmup = 10;
  h.total_steps = 110;
  EXPECT_FLOAT_EQ(learning_rate(h, 0), 0.1f);
  EXPECT_FLOAT_EQ(learning_rate(h, 9), 1.0f);
  EXPECT_FLOAT_EQ(learning_rate(h, 50), 1.0f);  // constant
  h.cosine = true;
  h.final_frac = 0.1f;
  EXPECT_FLOAT_EQ(learning_rate(h, 10), 1.0f);
  EXPECT_NEAR(learning_rate(h, 60), 0.55f, 1e-6);
  EXPECT_NEAR(learning_rate(h, 110), 0.1f, 1e-6);
}

}  // namespace
}  // namespace remat

namespace remat {
namespace {

// Save after 3 steps, restore into a fresh trainer and loader, continue: bit for bit the same
// as 6 uninterrupted steps, shuffle and gradient accumulation included.
TEST(Model, ResumeContinuesBitForBit) {
  test::TempDir dir;
  test::write_random_shard(dir / "d.bin", 3000, 67, 4);
  ModelConfig c = tiny_config();
  Hyper h;
  h.lr = 3e-3f;
  h.warmup = 2;
  h.cosine = true;
  h.total_steps = 6;
  auto make = [&] {
    return std::make_unique<Trainer>(c, 2, 8, 2, h, parse_plan("selective", c), ScheduleOptions{},
                                     test::init(c, 5));
  };
  DataLoader d1(dir / "d.bin", 2, 8, c.vocab_size, true, 5);
  auto t1 = make();
  std::vector<float> straight;
  for (int s = 0; s < 6; s++) straight.push_back(t1->step(d1).loss);

  DataLoader d2(dir / "d.bin", 2, 8, c.vocab_size, true, 5);
  auto t2 = make();
  std::vector<float> resumed;
  for (int s = 0; s < 3; s++) resumed.push_back(t2->step(d2).loss);
  save_train_state(dir / "state.bin", t2->state(d2));
  TrainState st = load_train_state(dir / "state.bin");
  DataLoader d3(dir / "d.bin", 2, 8, c.vocab_size, true, 5);
  auto t3 = make();
  t3->restore(st);
  d3.restore(st.loader);
  for (int s = 0; s < 3; s++) resumed.push_back(t3->step(d3).loss);
  ASSERT_EQ(straight.size(), resumed.size());
  for (size_t i = 0; i < straight.size(); i++)
    EXPECT_EQ(std::memcmp(&straight[i], &resumed[i], 4), 0) << "step " << i;
  EXPECT_EQ(std::memcmp(t1->params().data(), t3->params().data(), t1->params().size() * 4), 0);
}

}  // namespace
}  // namespace remat
