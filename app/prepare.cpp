// `remat prepare`: text files -> llm.c token shards and a tokenizer.
#include "io/prepare.h"

#include <chrono>
#include <cstdio>

#include "app/cli.h"
#include "app/commands.h"
#include "base/error.h"

namespace remat {

int cmd_prepare(int argc, const char* const* argv) {
  Options o("prepare",
            "Turn text files (or directories of them) into llm.c token shards and a tokenizer.\n"
            "usage: remat prepare [options] [INPUT...]   (default input: " +
                std::string(kDefaultCorpusDir) + ")");
  o.add("out", kDefaultDataDir, "output directory")
      .add("vocab", "512", "vocabulary size")
      .add("val-fraction", "0.05", "share of documents kept for validation")
      .add("tokenizer", "",
           "a Hugging Face tokenizer.json to encode with instead of training a tokenizer (BOS "
           "before each document, or end-of-text after; uint32 shards past 65536 ids)");
  if (!o.parse(argc, argv, 0)) {
    std::printf("%s", o.help().c_str());
    return 0;
  }
  const std::string hf = o.get("tokenizer");
  // Checked here to name the options (the library's own messages name its parameters).
  const int vocab = o.get_count("vocab");
  if (hf.empty())
    REMAT_REQUIRE(vocab >= 257 && vocab <= 65536,
                  "--vocab must be between 257 and 65536 (256 bytes, the merges and end-of-text; "
                  "ids fit 16 bits), got " +
                      o.get("vocab"));
  else
    REMAT_REQUIRE(!o.given("vocab"),
                  "--vocab cannot go with --tokenizer (" + hf + " brings its own vocabulary)");
  const double val_fraction = o.get_double("val-fraction");
  REMAT_REQUIRE(val_fraction >= 0 && val_fraction < 1,
                "--val-fraction must be at least 0 and below 1, got " + o.get("val-fraction"));
  std::vector<std::string> inputs = o.positional();
  if (inputs.empty()) inputs.push_back(kDefaultCorpusDir);
  auto t0 = std::chrono::steady_clock::now();
  PrepareResult r = hf.empty() ? prepare_corpus(inputs, o.get("out"), vocab, val_fraction)
                               : prepare_corpus_hf(inputs, o.get("out"), hf, val_fraction);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "prepared %lld documents: %lld train tokens (%s), %lld val tokens (%s), "
      "tokenizer %s (vocab %d%s) in %.1f s\n",
      (long long)r.documents, (long long)r.train_tokens, r.train_pattern.c_str(),
      (long long)r.val_tokens, r.val_pattern.c_str(), r.tokenizer_path.c_str(), r.vocab_size,
      r.uint32_tokens ? ", uint32 shards" : "", s);
  if (r.nfc_assumed)
    std::printf(
        "note: %s names an NFC normalizer, which remat does not apply: the text is taken "
        "as NFC already\n",
        hf.c_str());
  return 0;
}

}  // namespace remat
