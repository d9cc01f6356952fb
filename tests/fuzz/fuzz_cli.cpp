// libFuzzer target: the command line of `remat train` and the parsers behind its values:
// Options (app/cli.h) with the train option set, preset_config (io/config.h), and the
// recompute policy parsers parse_plan / parse_budget / parse_bytes (runtime/plan.h).
//
// Input: argv split at NUL bytes (a trailing NUL-free rest is the last argument).
// Contract checked: each parser either succeeds or throws remat::Error -- any other exception
// (std::out_of_range from std::stoi, ...) escapes this function and libFuzzer reports it as a
// crash, as it does UB and leaks. A preset with any --vocab gives a config that check_config
// accepts; a parsed plan has one entry per block; a parsed byte count prints.
#include <string>
#include <vector>

#include "app/cli.h"
#include "io/config.h"
#include "io/llmc_model.h"
#include "kernels/common.h"
#include "runtime/plan.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

// The option set of `remat train` (app/train.cpp cmd_train), names and defaults; the
// help texts do not matter here. Keep in step with cmd_train.
remat::Options train_options() {
  remat::Options o("train", "fuzz");
  const char* valued[][2] = {{"model", "mini"},
                             {"data", ""},
                             {"val-data", ""},
                             {"tokenizer", ""},
                             {"vocab", "0"},
                             {"batch", "8"},
                             {"seq", "64"},
                             {"total-batch", "0"},
                             {"steps", "500"},
                             {"lr", "3e-4"},
                             {"warmup", "0"},
                             {"schedule", "constant"},
                             {"lr-final-frac", "0.1"},
                             {"weight-decay", "0"},
                             {"beta1", "0.9"},
                             {"beta2", "0.95"},
                             {"eps", "1e-8"},
                             {"grad-clip", "1.0"},
                             {"seed", "1337"},
                             {"eval-every", "100"},
                             {"eval-batches", "8"},
                             {"sample-every", "0"},
                             {"sample-tokens", "48"},
                             {"out", "out"},
                             {"ckpt-every", "0"},
                             {"resume", ""},
                             {"device", "auto"},
                             {"log", ""},
                             {"recompute", "none"},
                             {"lookahead", "1"},
                             {"max-bad-steps", "5"},
                             {"trace", ""},
                             {"trace-steps", "2:3"}};
  for (auto& v : valued) o.add(v[0], v[1], "");
  o.flag("shuffle", "").flag("verify-recompute", "");
  return o;
}

const char* kIntOptions[] = {"vocab",        "batch",        "seq",           "total-batch",
                             "steps",        "warmup",       "seed",          "eval-every",
                             "eval-batches", "sample-every", "sample-tokens", "ckpt-every",
                             "lookahead",    "max-bad-steps"};
const char* kDoubleOptions[] = {"lr",    "lr-final-frac", "weight-decay", "beta1",
                                "beta2", "eps",           "grad-clip"};

template <typename F>
void expect_error_or_ok(F&& f) {
  try {
    f();
  } catch (const remat::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> args;
  std::string cur;
  for (size_t i = 0; i < size; i++) {
    if (data[i] == 0) {
      args.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(static_cast<char>(data[i]));
    }
  }
  if (!cur.empty()) args.push_back(cur);
  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());

  remat::Options o = train_options();
  bool parsed = false;
  try {
    parsed = o.parse(static_cast<int>(argv.size()), argv.data(), 0);
    if (!parsed) FUZZ_ASSERT(!o.help().empty());
  } catch (const remat::Error&) {
    return 0;
  }
  if (!parsed) return 0;

  for (const char* name : kIntOptions) expect_error_or_ok([&] { o.get_int(name); });
  for (const char* name : kDoubleOptions) expect_error_or_ok([&] { o.get_double(name); });
  FUZZ_ASSERT(o.get_bool("shuffle") == o.given("shuffle"));

  // The model preset with the vocabulary as cmd_train passes it.
  expect_error_or_ok([&] {
    const int vocab = static_cast<int>(o.get_int("vocab"));
    const remat::ModelConfig c = remat::preset_config(o.get("model"), vocab);
    remat::check_config(c, "preset");  // presets are valid models, or preset_config threw
    FUZZ_ASSERT(c.padded_vocab % 128 == 0 && c.padded_vocab >= c.vocab_size);
  });

  // The recompute policy for a few block counts.
  const std::string spec = o.get("recompute");
  static const std::vector<remat::PlanSchema> schemas = [] {
    std::vector<remat::PlanSchema> out;
    // GPT-2's schema (models/model.h), written out so the target needs no model code.
    using C = remat::TensorClass;
    for (int L : {1, 2, 12, 48})
      out.push_back(remat::PlanSchema{L,
                                      {"ln1", "qkv", "attn", "r2", "ln2", "fch", "gelu"},
                                      {C::kNorm, C::kMatmul, C::kAttention, C::kResidual, C::kNorm,
                                       C::kMatmul, C::kActivation}});
    return out;
  }();
  for (const remat::PlanSchema& schema : schemas) {
    const int L = schema.num_blocks;
    expect_error_or_ok([&] {
      uint64_t bytes = 0;
      if (remat::parse_budget(spec, &bytes)) {
        FUZZ_ASSERT(!remat::format_bytes(bytes).empty());
        return;
      }
      const remat::Plan p = remat::parse_plan(spec, schema);
      FUZZ_ASSERT(static_cast<int>(p.recompute.size()) == L);
      FUZZ_ASSERT(p.num_recomputed() >= 0 &&
                  p.num_recomputed() <= L * static_cast<int>(schema.slots.size()));
    });
  }
  // Every positional argument, and --out (any string), as a byte count.
  for (const std::string& a : o.positional())
    expect_error_or_ok([&] { remat::format_bytes(remat::parse_bytes(a)); });
  expect_error_or_ok([&] { remat::format_bytes(remat::parse_bytes(o.get("out"))); });
  return 0;
}
