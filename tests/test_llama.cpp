// The Llama family on the runtime: the whole model's gradient against finite differences,
// every recompute preset bitwise equal to none (Llama with grouped-query attention, Qwen2
// with q/k/v biases and a separate output embedding), the dry run's peaks equal to the
// measured ones, the true parameter counts of the real-model presets, and the training state
// of the family saved, loaded and resumed bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "base/error.h"
#include "io/params.h"
#include "io/train_state.h"
#include "models/llama.h"
#include "models/model.h"
#include "models/trainer.h"
#include "tests/gradient_check.h"
#include "tests/tiny_model.h"

namespace remat {
namespace {

// Llama with GQA (NH=4, NKV=2, HD=8), a ragged vocabulary, tied embedding.
ModelConfig llama_config(int layers = 3) {
  ModelConfig c = preset_config("llama-tiny", 67);
  c.num_layers = layers;
  c.max_seq_len = 16;
  return c;
}
// Qwen2: q/k/v biases, separate lm_head, NKV = 1 (multi-query), theta 1e6, eps 1e-6.
ModelConfig qwen_config(int layers = 3) {
  ModelConfig c = preset_config("qwen2-tiny", 67);
  c.num_layers = layers;
  c.num_kv_heads = 1;
  c.max_seq_len = 16;
  return c;
}

float loss_of(ModelRunner& r, const std::vector<float>& p, const std::vector<int>& in,
              const std::vector<int>& tg) {
  return r.forward_loss(p.data(), in.data(), tg.data());
}

// Random weights with every path carrying signal: larger matrices, norm weights and biases
// away from their initial 1 and 0.
std::vector<float> lively_params(const ModelConfig& c, uint64_t seed) {
  auto p = test::init(c, seed);
  Philox rng(seed, 5);
  for (const ParamTensor& t : param_table(c)) {
    for (size_t i = t.offset; i < t.offset + t.count(); i++) {
      if (t.init == ParamTensor::Init::kNormal)
        p[i] *= 4.0f;
      else
        p[i] += 0.3f * rng.normal();
    }
  }
  return p;
}

class LlamaFamily : public ::testing::TestWithParam<const char*> {
 protected:
  ModelConfig config(int layers = 3) const {
    return std::string(GetParam()) == "llama" ? llama_config(layers) : qwen_config(layers);
  }
};

// The whole model's gradient against finite differences (tests/gradient_check.h).
TEST_P(LlamaFamily, GradientMatchesFiniteDifferences) {
  const ModelConfig c = config(2);
  test::expect_gradient_matches_finite_differences(c, lively_params(c, 11), 2, 6);
}

TEST_P(LlamaFamily, InitialLossNearLogVocab) {
  const ModelConfig c = config();
  auto p = test::init(c);
  const int B = 2, T = 8;
  auto in = test::random_tokens(B * T, c.vocab_size, 1),
       tg = test::random_tokens(B * T, c.vocab_size, 2);
  ModelRunner r(c, B, T, parse_plan("none", c), ActDType::kFP32, {}, false);
  EXPECT_NEAR(loss_of(r, p, in, tg), std::log(float(c.vocab_size)), 0.05);
}

struct Trace {
  std::vector<float> losses;
  std::vector<std::vector<float>> grads;
  std::vector<float> params;
};

Trace train(const ModelConfig& c, const std::string& shard, const std::string& policy, int steps,
            int lookahead = 1, bool verify = false, const std::string& offload = "none") {
  const int B = 2, T = 8;
  DataLoader data(shard, B, T, c.vocab_size, false, 1);
  Hyper h;
  h.lr = 3e-3f;
  h.total_steps = steps;
  ScheduleOptions so;
  so.lookahead = lookahead;
  so.verify_recompute = verify;
  Plan plan = make_plan(policy, c, B, T, ActDType::kFP32, so, CostModel{});
  apply_offload(plan, offload);
  Trainer tr(c, B, T, 2, h, plan, so, lively_params(c, 3));
  Trace t;
  for (int s = 0; s < steps; s++) {
    t.losses.push_back(tr.step(data).loss);
    t.grads.push_back(tr.grads());
  }
  t.params = tr.params();
  return t;
}

void expect_bitwise_equal(const Trace& a, const Trace& b, const std::string& what) {
  ASSERT_EQ(a.losses.size(), b.losses.size());
  for (size_t s = 0; s < a.losses.size(); s++) {
    EXPECT_EQ(std::memcmp(&a.losses[s], &b.losses[s], 4), 0)
        << what << ": loss of step " << s << " " << a.losses[s] << " vs " << b.losses[s];
    EXPECT_EQ(std::memcmp(a.grads[s].data(), b.grads[s].data(), a.grads[s].size() * 4), 0)
        << what << ": gradients of step " << s << " differ";
  }
  EXPECT_EQ(std::memcmp(a.params.data(), b.params.data(), a.params.size() * 4), 0)
      << what << ": parameters differ";
}

TEST_P(LlamaFamily, EveryPresetTrainsBitwiseLikeNone) {
  const ModelConfig c = config();
  test::TempDir dir;
  test::write_random_shard(dir / "d.bin", 4000, c.vocab_size, 21);
  const Trace none = train(c, dir / "d.bin", "none", 4);
  // The loss moves: a test of equality between runs that do nothing would prove nothing.
  EXPECT_LT(none.losses.back(), none.losses.front());
  const uint64_t lo = dry_run_activation_peak(c, 2, 8, parse_plan("full", c), ActDType::kFP32, {});
  const uint64_t hi = dry_run_activation_peak(c, 2, 8, parse_plan("none", c), ActDType::kFP32, {});
  const std::string budget = "budget:" + std::to_string((lo + hi) / 2);
  for (const std::string p : {"selective", "attention", "full", "every:2", "qkvr+swiglu", "r2",
                              "gate_up", "none,1=full", "full,0-1=selective", budget.c_str()}) {
    SCOPED_TRACE(p);
    expect_bitwise_equal(train(c, dir / "d.bin", p, 4), none, p);
  }
  for (int la : {0, 2}) {
    SCOPED_TRACE(la);
    expect_bitwise_equal(train(c, dir / "d.bin", "full", 4, la), none, "full, lookahead");
  }
  // Offloaded tensors come back unchanged.
  for (const auto& [rc, off] : std::vector<std::pair<std::string, std::string>>{
           {"none", "input+qkvr+swiglu"}, {"full", "input"}, {"selective", "input+attn+gate_up"}}) {
    SCOPED_TRACE(rc + " + offload " + off);
    expect_bitwise_equal(train(c, dir / "d.bin", rc, 4, 1, false, off), none, "offload " + off);
  }
  EXPECT_NO_THROW(train(c, dir / "d.bin", "full", 2, 1, /*verify=*/true, "input"));
}

TEST_P(LlamaFamily, VerifyRecomputePassesForEveryPreset) {
  const ModelConfig c = config();
  test::TempDir dir;
  test::write_random_shard(dir / "d.bin", 2000, c.vocab_size, 22);
  for (const char* p : {"selective", "attention", "full", "r2+ln1"}) {
    SCOPED_TRACE(p);
    EXPECT_NO_THROW(train(c, dir / "d.bin", p, 2, 1, /*verify=*/true));
  }
}

TEST_P(LlamaFamily, PredictedPeakEqualsMeasured) {
  const ModelConfig c = config();
  const int B = 2, T = 8;
  auto p = test::init(c);
  auto in = test::random_tokens(B * T, c.vocab_size, 1),
       tg = test::random_tokens(B * T, c.vocab_size, 2);
  for (const char* spec : {"none", "selective", "attention", "full", "every:2"}) {
    for (int la : {0, 1}) {
      SCOPED_TRACE(std::string(spec) + " lookahead " + std::to_string(la));
      ScheduleOptions so;
      so.lookahead = la;
      Plan plan = parse_plan(spec, c);
      ModelRunner dry(c, B, T, plan, ActDType::kFP32, so, true);
      dry.forward_backward(nullptr, nullptr, nullptr, nullptr, 1.0f);
      ModelRunner real(c, B, T, plan, ActDType::kFP32, so, false);
      std::vector<float> g(p.size(), 0.0f);
      real.reset_peaks();
      real.forward_backward(p.data(), g.data(), in.data(), tg.data(), 1.0f / (B * T));
      EXPECT_EQ(dry.stats().peak_bytes, real.stats().peak_bytes);
      EXPECT_EQ(dry.stats().peak_by_usage, real.stats().peak_by_usage);
      EXPECT_EQ(dry.stats().extent_peak, real.stats().extent_peak);
      EXPECT_EQ(real.stats().live_bytes, 0u);
    }
  }
}

TEST_P(LlamaFamily, TrainingStateResumesBitForBit) {
  const ModelConfig c = config(2);
  test::TempDir dir;
  test::write_random_shard(dir / "d.bin", 3000, c.vocab_size, 23);
  const int B = 2, T = 8;
  Hyper h;
  h.lr = 3e-3f;
  h.total_steps = 6;
  auto run = [&](int steps, const TrainState* from, TrainState* save_after) {
    DataLoader data(dir / "d.bin", B, T, c.vocab_size, false, 1);
    Trainer tr(c, B, T, 1, h, parse_plan("selective", c), {}, lively_params(c, 4));
    if (from) {
      tr.restore(*from);
      data.restore(from->loader);
    }
    std::vector<float> losses;
    while (tr.steps_done() < steps) losses.push_back(tr.step(data).loss);
    if (save_after) *save_after = tr.state(data);
    return std::make_pair(losses, tr.params());
  };
  const auto whole = run(6, nullptr, nullptr);
  TrainState mid;
  run(3, nullptr, &mid);
  save_train_state(dir / "state.bin", mid);
  const TrainState loaded = load_train_state(dir / "state.bin");
  EXPECT_EQ(loaded.config.family, Family::kLlama);
  EXPECT_EQ(loaded.config.model_type, c.model_type);
  EXPECT_EQ(loaded.config.kv_heads(), c.kv_heads());
  EXPECT_EQ(loaded.config.mlp_width(), c.mlp_width());
  EXPECT_EQ(loaded.config.qkv_bias, c.qkv_bias);
  EXPECT_EQ(loaded.config.tied_embeddings, c.tied_embeddings);
  EXPECT_EQ(loaded.config.norm_eps, c.norm_eps);
  EXPECT_EQ(loaded.config.rope_theta, c.rope_theta);
  const auto rest = run(6, &loaded, nullptr);
  ASSERT_EQ(rest.first.size(), 3u);
  for (int s = 0; s < 3; s++)
    EXPECT_EQ(std::memcmp(&rest.first[s], &whole.first[3 + s], 4), 0) << "step " << 4 + s;
  EXPECT_EQ(std::memcmp(rest.second.data(), whole.second.data(), whole.second.size() * 4), 0);
}

INSTANTIATE_TEST_SUITE_P(LlamaAndQwen2, LlamaFamily, ::testing::Values("llama", "qwen2"));

// The true shapes of released models: parameter counts as their Hugging Face model cards and
// safetensors files give them (embedding counted once when tied).
TEST(LlamaPresets, TrueParameterCounts) {
  struct Known {
    const char* name;
    size_t params;
  };
  for (const Known& k :
       {Known{"llama-3.2-1b", 1235814400ull}, Known{"llama-3.2-3b", 3212749824ull},
        Known{"llama-3.1-8b", 8030261248ull}, Known{"tinyllama-1.1b", 1100048384ull},
        Known{"qwen2.5-0.5b", 494032768ull}, Known{"qwen2.5-1.5b", 1543714304ull},
        Known{"mistral-7b", 7248023552ull}}) {
    SCOPED_TRACE(k.name);
    EXPECT_EQ(num_params(preset_config(k.name)), k.params);
  }
}

// Llama 3's rope scaling: frequencies of short wavelength kept, long ones divided by the
// factor, a blend between; the training state and a Hugging Face directory keep it.
TEST(LlamaPresets, Llama3RopeScaling) {
  ModelConfig c = llama_config();
  c.channels = 64;  // HD = 16: wavelengths 6.3, 19.9, 62.8, ... reach all three bands
  const std::vector<float> plain = llama_inv_freq(c);
  c.rope_scaling = "llama3";
  c.rope_factor = 8;
  c.rope_low_freq_factor = 1;
  c.rope_high_freq_factor = 4;
  c.rope_original_max_pos = 32;
  ASSERT_NO_THROW(check_config(c, "x"));
  const std::vector<float> scaled = llama_inv_freq(c);
  ASSERT_EQ(plain.size(), scaled.size());
  int kept = 0, divided = 0, blended = 0;
  for (size_t i = 0; i < plain.size(); i++) {
    const double wavelen = 2 * M_PI / plain[i];
    if (wavelen < 8) {
      EXPECT_EQ(scaled[i], plain[i]);
      kept++;
    } else if (wavelen > 32) {
      EXPECT_FLOAT_EQ(scaled[i], plain[i] / 8);
      divided++;
    } else {
      EXPECT_LT(scaled[i], plain[i]);
      EXPECT_GT(scaled[i], plain[i] / 8);
      blended++;
    }
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(blended, 0);
  TrainState st;
  st.config = c;
  st.params = test::init(c, 2);
  test::TempDir dir;
  save_train_state(dir / "s.bin", st);
  const ModelConfig back = load_train_state(dir / "s.bin").config;
  EXPECT_EQ(back.rope_scaling, "llama3");
  EXPECT_EQ(back.rope_factor, 8.0f);
  EXPECT_EQ(back.rope_original_max_pos, 32);
  EXPECT_EQ(llama_inv_freq(back), scaled);
  c.rope_scaling = "yarn";
  EXPECT_THROW(check_config(c, "x"), Error);
}

TEST(LlamaPresets, ConfigChecks) {
  ModelConfig c = llama_config();
  c.num_kv_heads = 3;  // 4 heads do not split into 3 groups
  EXPECT_THROW(check_config(c, "x"), Error);
  c = llama_config();
  c.channels = 36;  // HD = 9: odd, no rotate-half
  c.num_heads = 4;
  c.num_kv_heads = 4;
  EXPECT_THROW(check_config(c, "x"), Error);
  EXPECT_NO_THROW(check_config(llama_config(), "x"));
}

}  // namespace
}  // namespace remat
