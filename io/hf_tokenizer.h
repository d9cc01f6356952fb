// A Hugging Face tokenizer.json for byte-level BPE (GPT-2's, Llama-3's, Qwen2's): encode and
// decode as the `tokenizers` library (0.23) does, without a post-processor.
//
// What a file may hold (anything else is an Error naming the file and the field):
// - model: type "BPE" with vocab (token -> id), merges ("a b" strings or [a, b] pairs; rank =
//   position, a pair listed twice takes its last rank), ignore_merges, unk_token, fuse_unk;
//   dropout null or 0; no continuing_subword_prefix, end_of_word_suffix or byte_fallback.
// - pre_tokenizer: null, ByteLevel (add_prefix_space, use_regex: GPT-2's regex), Split (pattern
//   {"Regex": ...} or {"String": ...}, any behavior, invert), or a Sequence of these.
// - normalizer: null or NFC (or a Sequence of NFC). NFC is NOT applied: encode() assumes its
//   text is already NFC (without a normalization library there is no honest way to do it).
// - added_tokens: matched literally in the text before pre-tokenization, leftmost-longest, with
//   single_word, lstrip and rstrip as tokenizers applies them; first the tokens with
//   normalized = false, then those with normalized = true. Each id must be the one tokenizers
//   gives it (its id in the vocab, else the next one past the vocab): a file saved by
//   tokenizers always agrees.
// - decoder: null (tokens joined by spaces) or ByteLevel.
// - post_processor: only read to find a BOS token (below); encode() never adds tokens.
// truncation and padding are ignored.
//
// Regexes run through PCRE2 (UTF, UCP, multiline so that ^ and $ are line anchors as in the
// Oniguruma syntax tokenizers uses; JIT when available; \C refused). \s, \S, \h and \H are
// rewritten to Oniguruma's meaning (White_Space; hex digit), and empty matches are taken as
// Oniguruma's iterator takes them (none right after the previous match). Other Oniguruma-only
// syntax is not translated (\w and \W are PCRE2's). Unicode classes follow PCRE2's tables.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

namespace remat {

class HfTokenizer {
 public:
  // Reads a tokenizer.json. Error naming the path when it is missing, not JSON, has no model,
  // a model other than BPE, merges naming tokens not in the vocab, a regex PCRE2 refuses (with
  // PCRE2's message and the offset), or anything outside the list above.
  static HfTokenizer load(const std::string& path);
  // The same from the file's text; `name` stands for the file in errors.
  static HfTokenizer parse(const std::string& json_text, const std::string& name);

  // Token ids of `text`, which must be UTF-8 (Error naming the byte offset otherwise): what
  // tokenizers' encode(text, add_special_tokens=False).ids gives. Added tokens in the text
  // become their ids. Safe to call from several threads.
  std::vector<int> encode(const std::string& text) const;

  // Text of `ids` as tokenizers' decode(ids, skip_special_tokens) gives it: the ByteLevel
  // decoder maps each token's characters back to bytes (a token with a character outside the
  // byte map contributes its own UTF-8), and bytes that are not valid UTF-8 (a character cut
  // between tokens) become U+FFFD, one per maximal invalid sequence. Error naming the id and
  // the vocabulary size for an id outside [0, vocab_size()) or one without a token.
  std::string decode(const std::vector<int>& ids, bool skip_special_tokens = false) const;

  // The token's string as the file writes it (byte-level characters); Error as decode().
  const std::string& token(int id) const;
  // The id of a token string (added tokens first, then the vocab); -1 if there is none.
  int token_id(const std::string& token) const;
  // Whether the id is an added token marked special.
  bool is_special(int id) const;

  // 1 + the largest id of the vocab and the added tokens.
  int vocab_size() const;
  // The token the post-processor puts before a text (Llama-3's <|begin_of_text|>): the first
  // item of a TemplateProcessing's `single` template (alone or in a Sequence of processors)
  // when it is a special token; -1 if none.
  int bos_token() const;
  // The end-of-text token: the first special added token among <|endoftext|> (GPT-2, Qwen2),
  // <|end_of_text|> (Llama-3) and </s>; -1 if none.
  int eot_token() const;
  // Whether the file names an NFC normalizer (which encode() does not apply).
  bool nfc_normalizer() const;
  // The file it was read from (or the name given to parse()).
  const std::string& name() const;

  HfTokenizer();
  ~HfTokenizer();
  HfTokenizer(const HfTokenizer&);
  HfTokenizer& operator=(const HfTokenizer&);
  HfTokenizer(HfTokenizer&&) noexcept;
  HfTokenizer& operator=(HfTokenizer&&) noexcept;

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;  // immutable after parse, so copies share it
};

// The byte offset of the first byte of `s` that is not part of well-formed UTF-8 (overlong
// forms, surrogates and code points past U+10FFFF are not), or std::string::npos.
size_t find_invalid_utf8(const std::string& s);
// `s` with every maximal ill-formed subsequence replaced by U+FFFD (as Rust's
// String::from_utf8_lossy and Python's errors="replace" do).
std::string to_valid_utf8(const std::string& s);

}  // namespace remat
