// `remat sample`: text from a checkpoint.
#include <algorithm>
#include <cstdio>
#include <memory>

#include "app/cli.h"
#include "app/commands.h"
#include "base/error.h"
#include "io/hf_tokenizer.h"
#include "io/llmc_model.h"
#include "io/tokenizer.h"
#include "models/trainer.h"

namespace remat {

int cmd_sample(int argc, const char* const* argv) {
  Options o("sample", "Generate text from a model checkpoint.");
  o.add("model", "out/model.bin", "llm.c checkpoint file (remat writes out/model.bin)")
      .add("tokenizer", "",
           "remat's tokenizer.bin or a Hugging Face tokenizer.json (default: "
           "data/fortunes/tokenizer.bin if present)")
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
  const ModelChoice mf = choose_model(o.get("model"), 0, /*want_params=*/true);
  REMAT_REQUIRE(mf.from_file, "--model " + o.get("model") +
                                  ": sample needs trained weights: an llm.c checkpoint (.bin) or "
                                  "a Hugging Face model directory, not a preset");
  std::string tp = o.get("tokenizer");
  if (tp.empty() && file_exists(std::string(kDefaultDataDir) + "/tokenizer.bin"))
    tp = std::string(kDefaultDataDir) + "/tokenizer.bin";
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<HfTokenizer> hf;  // a tokenizer.json
  if (tp.size() >= 5 && tp.compare(tp.size() - 5, 5, ".json") == 0)
    hf = std::make_unique<HfTokenizer>(HfTokenizer::load(tp));
  else if (!tp.empty())
    tok = std::make_unique<Tokenizer>(Tokenizer::load(tp));
  std::vector<int> prompt;
  const std::string text = o.get("prompt");
  if (!text.empty()) {
    REMAT_REQUIRE(hf || (tok && tok->can_encode()),
                  "--prompt needs a tokenizer with merges (--tokenizer)");
    prompt = hf ? hf->encode(text) : tok->encode(text);
  }
  // With no prompt, a document's start: BOS, else end-of-text (which ends the one before).
  if (prompt.empty() && hf)
    prompt.push_back(hf->bos_token() >= 0 ? hf->bos_token() : std::max(hf->eot_token(), 0));
  if (prompt.empty()) prompt.push_back(tok && tok->eot_token() >= 0 ? tok->eot_token() : 0);
  for (int t : prompt)
    REMAT_REQUIRE(t >= 0 && t < mf.config.vocab_size,
                  "prompt token " + std::to_string(t) + " is past the model's vocabulary");
  std::vector<int> gen = sample_tokens(mf.config, mf.params.data(), prompt, n_tokens,
                                       static_cast<float>(temperature), seed, 0);
  std::string outtext = text;
  if (hf)  // all at once, so a character split between tokens comes out whole
    outtext += hf->decode(gen);
  else
    for (int t : gen) outtext += tok ? tok->decode(t) : std::to_string(t) + " ";
  std::printf("%s\n", outtext.c_str());
  return 0;
}

}  // namespace remat
