// `remat prepare`: text files -> a trained tokenizer and token shards in llm.c's format.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace remat {

// The built-in corpus: Debian's `fortunes` package.
inline constexpr const char* kDefaultCorpusDir = "/usr/share/games/fortunes";

struct PrepareResult {
  std::string train_pattern;   // glob of the training shards, e.g. out/train_*.bin
  std::string val_pattern;     // glob of the validation shards, e.g. out/val_*.bin
  std::string tokenizer_path;  // out/tokenizer.bin, or out/tokenizer.json (prepare_corpus_hf)
  int vocab_size = 0;          // the tokenizer's vocabulary, eot included
  bool uint32_tokens = false;  // the shards hold uint32 tokens (llm.c's version 7)
  bool nfc_assumed = false;    // the tokenizer.json names NFC, which is not applied
  int64_t train_tokens = 0;
  int64_t val_tokens = 0;
  int64_t documents = 0;  // documents read (train + val)
};

// Reads every text file among `inputs` (files, or directories searched recursively in sorted
// order), trains a `vocab_size` tokenizer and writes out_dir/tokenizer.bin,
// out_dir/train_000.bin ... and out_dir/val_000.bin ... (out_dir is created if missing; older
// train_*.bin / val_*.bin there are removed first). Deterministic for the same inputs.
//
// - Skipped: files holding a NUL byte (binary), and "*.dat" / "*.u8" files (fortune's index
//   files and their links).
// - Documents: a file "name" with a "name.dat" beside it is a fortune file whose entries,
//   separated by lines holding just "%", are the documents; any other file is one document.
//   Documents that are only whitespace are dropped.
// - The tokenizer trains on at most ~2 MB of text: all of it when it fits, else every k-th
//   document (smallest k that fits) until the cap.
// - Each document is encoded and followed by the eot token. Every k-th document (k from
//   val_fraction and the token counts, at least 2) goes to val, so about val_fraction of the
//   tokens do, and at least min(16384, a quarter of all tokens) where the documents allow;
//   a corpus of a single document gives val the tail of its tokens instead.
// - Shards hold at most max_shard_tokens tokens; the train tokens are cut into equal shards.
// Error naming the inputs if they hold no text, or a missing input path.
PrepareResult prepare_corpus(const std::vector<std::string>& inputs, const std::string& out_dir,
                             int vocab_size, double val_fraction, int max_shard_tokens = 1 << 24);

// The same with a Hugging Face tokenizer.json (io/hf_tokenizer.h) instead of a trained one: the
// documents are read, split and sharded as above, but each is encoded with the file's tokenizer
// (bytes that are not UTF-8 first replaced by U+FFFD) and marked as the tokenizer's model
// expects: its BOS token before each document when it has one (Llama-3's <|begin_of_text|>,
// as llm.c's data scripts do), else its end-of-text token after each (GPT-2's, Qwen2's
// <|endoftext|>). The shards hold uint16 tokens (version 1) when every id of the vocabulary
// fits 16 bits, else uint32 tokens (version 7). The file is copied to out_dir/tokenizer.json and
// an older out_dir/tokenizer.bin removed. Error naming the file if it names neither token.
PrepareResult prepare_corpus_hf(const std::vector<std::string>& inputs, const std::string& out_dir,
                                const std::string& tokenizer_json, double val_fraction,
                                int max_shard_tokens = 1 << 24);

}  // namespace remat
