// A byte-level BPE tokenizer: trained on a text corpus, saved in llm.c's tokenizer format
// (so llm.c's decoders read it) plus remat's merge list (so it can encode again).
//
// Vocabulary: tokens 0..255 are the bytes, then one token per merge in training order, and
// the last token is the end-of-text token "<|endoftext|>" (eot).
//
// File layout (little endian): a header of 256 uint32 -- [0] 20240328 magic, [1] version 2,
// [2] vocab size, [3] eot id -- then per token a uint8 length (1..255) and that many bytes.
// After that (llm.c readers stop after vocab-size entries) remat appends: uint32 0x52454D54
// ('REMT'), uint32 merge count, then count pairs of uint32 (left, right). load() also reads
// llm.c's own files (GPT-2's 50257-token vocabulary, version 1 or 2; version 1 has no eot
// field and eot = 50256), which have no merges: such a tokenizer decodes but cannot encode.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace remat {

constexpr uint32_t kTokenizerMagic = 20240328;
constexpr uint32_t kMergesMagic = 0x52454D54;  // 'REMT'

class Tokenizer {
 public:
  // Learns vocab_size - 257 merges from `text` (257 <= vocab_size <= 65536). The text is
  // pre-split into chunks that merges never cross: a run of letters (ASCII letters and every
  // byte >= 0x80, so UTF-8 characters stay whole), a run of digits, or a run of other
  // non-space bytes, each with at most one leading space attached (as GPT-2 does); other
  // whitespace forms its own chunks. Each step merges the most frequent adjacent pair
  // (counted over all chunks), ties going to the smallest (left, right) ids; pairs whose
  // merged token would exceed 255 bytes are never merged. Deterministic. Error if the text
  // runs out of pairs before the vocabulary is full.
  static Tokenizer train(const std::string& text, int vocab_size);

  // Tokens of `text` (any bytes): merges applied lowest rank first within each chunk.
  // "<|endoftext|>" in the text is encoded as ordinary text, never as eot. Error if this
  // tokenizer was loaded without merges. Safe to call from several threads.
  std::vector<int> encode(const std::string& text) const;
  // Bytes of one token / of a sequence; Error for an id outside [0, vocab_size).
  std::string decode(int token) const;
  std::string decode(const std::vector<int>& tokens) const;

  int vocab_size() const { return static_cast<int>(pieces_.size()); }
  int eot_token() const { return eot_; }
  bool can_encode() const { return has_merges_; }
  // Merges in rank order (token 256 + i is merges()[i]).
  const std::vector<std::pair<int, int>>& merges() const { return merges_; }

  // Writes the file atomically (io/atomic_file.h).
  void save(const std::string& path) const;
  // Error naming the path for: a missing file, a wrong magic or version, a truncated or
  // zero-length entry (naming the token index), or a malformed merges section.
  static Tokenizer load(const std::string& path);

  Tokenizer();
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

 private:
  struct Cache;  // per-chunk encodings, guarded by a mutex
  void build_ranks();
  std::vector<int> encode_chunk(const std::string& chunk) const;

  std::vector<std::string> pieces_;  // bytes of each token
  std::vector<std::pair<int, int>> merges_;
  std::unordered_map<uint64_t, int> rank_;  // (left << 32 | right) -> merge rank
  int eot_ = -1;
  bool has_merges_ = false;
  std::unique_ptr<Cache> cache_;
};

// Splits text into the chunks described at Tokenizer::train; concatenated they give text.
std::vector<std::string> pretokenize(const std::string& text);

}  // namespace remat
