// `remat sample`: text from a checkpoint.
#include <cstdio>
#include <memory>

#include "app/cli.h"
#include "app/commands.h"
#include "base/error.h"
#include "io/llmc_model.h"
#include "io/tokenizer.h"
#include "models/trainer.h"

namespace remat {

int cmd_sample(int argc, const char* const* argv) {
  Options o("sample", "Generate text from a model checkpoint.");
  o.add("model", "out/model.bin", "llm.c checkpoint file (remat writes out/model.bin)")
      .add("tokenizer", "", "tokenizer file (default: data/fortunes/tokenizer.bin if present)")
      .add("prompt", "", "text to continue (default: start of a document)")
      .add("tokens", "64", "tokens to generate")
      .add("temperature", "1.0", "sampling temperature; 0 = greedy")
      .add("seed", "1337", "random seed");
  if (!o.parse(argc, argv, 0)) {
    std::printf("%s", o.help().c_str());
    return 0;
  }
  REMAT_REQUIRE(o.positional().empty(),
                "unexpected argument '" + o.positional()[0] +
                    "' (every input is an option: see remat sample --help)");
  const int n_tokens = o.get_count("tokens");
  const double temperature = o.get_double("temperature");
  REMAT_REQUIRE(temperature >= 0,
                "--temperature must be >= 0 (0 is greedy), got " + o.get("temperature"));
  const uint64_t seed = o.get_seed("seed");
  ModelFile mf = read_llmc_model(o.get("model"));
  std::string tp = o.get("tokenizer");
  if (tp.empty() && file_exists(std::string(kDefaultDataDir) + "/tokenizer.bin"))
    tp = std::string(kDefaultDataDir) + "/tokenizer.bin";
  std::unique_ptr<Tokenizer> tok;
  if (!tp.empty()) tok = std::make_unique<Tokenizer>(Tokenizer::load(tp));
  std::vector<int> prompt;
  const std::string text = o.get("prompt");
  if (!text.empty()) {
    REMAT_REQUIRE(tok && tok->can_encode(), "--prompt needs a tokenizer with merges (--tokenizer)");
    prompt = tok->encode(text);
  }
  if (prompt.empty()) prompt.push_back(tok && tok->eot_token() >= 0 ? tok->eot_token() : 0);
  for (int t : prompt)
    REMAT_REQUIRE(t >= 0 && t < mf.config.vocab_size,
                  "prompt token " + std::to_string(t) + " is past the model's vocabulary");
  std::vector<int> gen = sample_tokens(mf.config, mf.params.data(), prompt, n_tokens,
                                       static_cast<float>(temperature), seed, 0);
  std::string outtext = text;
  for (int t : gen) outtext += tok ? tok->decode(t) : std::to_string(t) + " ";
  std::printf("%s\n", outtext.c_str());
  return 0;
}

}  // namespace remat
