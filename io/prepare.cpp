#include "io/prepare.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <system_error>

#include "base/error.h"
#include "io/atomic_file.h"
#include "io/hf_tokenizer.h"
#include "io/shards.h"
#include "io/tokenizer.h"

namespace remat {
namespace {

namespace fs = std::filesystem;

constexpr size_t kTokenizerTextCap = 2u << 20;  // bytes of text the tokenizer trains on
constexpr int64_t kMinValTokens = 16384;

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The "%"-separated entries of a fortune file, each with its own lines' newlines.
void split_fortunes(const std::string& text, std::vector<std::string>& docs) {
  std::string entry;
  size_t i = 0;
  while (i < text.size()) {
    size_t eol = text.find('\n', i);
    const size_t end = eol == std::string::npos ? text.size() : eol + 1;
    std::string line = text.substr(i, end - i);
    std::string bare = line;
    while (!bare.empty() && (bare.back() == '\n' || bare.back() == '\r')) bare.pop_back();
    if (bare == "%") {
      docs.push_back(std::move(entry));
      entry.clear();
    } else {
      entry += line;
    }
    i = end;
  }
  docs.push_back(std::move(entry));
}

bool blank(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char ch) {
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\v' || ch == '\f';
  });
}

// Appends the documents of one file; binary files (holding a NUL byte) add none.
void read_documents(const std::string& path, std::vector<std::string>& docs) {
  std::vector<uint8_t> bytes = read_file_bytes(path);
  if (std::find(bytes.begin(), bytes.end(), uint8_t{0}) != bytes.end()) return;
  std::string text(bytes.begin(), bytes.end());
  std::error_code ec;
  std::vector<std::string> found;
  if (fs::is_regular_file(path + ".dat", ec))
    split_fortunes(text, found);
  else
    found.push_back(std::move(text));
  for (std::string& d : found)
    if (!blank(d)) docs.push_back(std::move(d));
}

std::vector<std::string> list_files(const std::vector<std::string>& inputs) {
  std::vector<std::string> files;
  for (const std::string& in : inputs) {
    std::error_code ec;
    const fs::file_status st = fs::status(in, ec);
    if (ec || !fs::exists(st)) throw Error(in + ": input not found");
    if (!fs::is_directory(st)) {
      files.push_back(in);
      continue;
    }
    std::vector<std::string> found;
    fs::recursive_directory_iterator it(in, fs::directory_options::skip_permission_denied, ec);
    if (ec) throw Error(in + ": cannot list directory: " + ec.message());
    for (; it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (ec) throw Error(in + ": cannot list directory: " + ec.message());
      const std::string p = it->path().string();
      if (ends_with(p, ".dat") || ends_with(p, ".u8")) continue;
      std::error_code fec;
      if (it->is_regular_file(fec)) found.push_back(p);
    }
    std::sort(found.begin(), found.end());
    files.insert(files.end(), found.begin(), found.end());
  }
  return files;
}

// Writes the tokens as shards `prefix`_000.bin ... of at most max_tokens each, cut into equal
// parts: uint32 shards when `wide`, else uint16 ones (every token then fits 16 bits).
void write_shards(const std::vector<uint32_t>& tokens, const std::string& prefix,
                  int64_t max_tokens, bool wide) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t count = std::max<int64_t>(1, (n + max_tokens - 1) / max_tokens);
  if (count > 999) throw Error(prefix + "_*.bin: " + std::to_string(count) + " shards exceed 999");
  for (int64_t i = 0; i < count; i++) {
    const int64_t b = i * n / count, e = (i + 1) * n / count;
    char name[16];
    std::snprintf(name, sizeof(name), "_%03d.bin", static_cast<int>(i));
    if (wide) {
      write_shard_u32(prefix + name, tokens.data() + b, static_cast<size_t>(e - b));
    } else {
      const std::vector<uint16_t> narrow(tokens.begin() + b, tokens.begin() + e);
      write_shard(prefix + name, narrow.data(), narrow.size());
    }
  }
}

// Removes older shards and, unless empty, `stale_tokenizer` (a tokenizer file that would no
// longer describe the shards).
void remove_old_outputs(const std::string& out_dir, const std::string& stale_tokenizer) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(out_dir, ec)) {
    const std::string name = e.path().filename().string();
    const bool shard =
        (name.rfind("train_", 0) == 0 || name.rfind("val_", 0) == 0) && ends_with(name, ".bin");
    const bool stale = !stale_tokenizer.empty() && name == stale_tokenizer;
    if ((shard || stale) && !fs::remove(e.path(), ec))
      throw Error(e.path().string() + ": cannot remove old " + (shard ? "shard: " : "tokenizer: ") +
                  ec.message());
  }
  if (ec) throw Error(out_dir + ": cannot list directory: " + ec.message());
}

std::string join_inputs(const std::vector<std::string>& inputs) {
  std::string names;
  for (const std::string& in : inputs) names += (names.empty() ? "" : ", ") + in;
  return names;
}

void check_prepare_args(double val_fraction, int max_shard_tokens) {
  if (!(val_fraction >= 0.0 && val_fraction < 1.0))
    throw Error("prepare: val_fraction " + std::to_string(val_fraction) + " outside [0, 1)");
  if (max_shard_tokens <= 0)
    throw Error("prepare: max_shard_tokens must be positive, got " +
                std::to_string(max_shard_tokens));
}

// Splits the encoded documents into train and val (see prepare_corpus), creates out_dir,
// removes older outputs, calls `save_tokenizer` and writes the shards; fills res's counts and
// patterns.
void split_and_write(std::vector<std::vector<int>>& encoded, double val_fraction,
                     const std::string& out_dir, int64_t max_shard_tokens, bool wide,
                     const std::string& stale_tokenizer,
                     const std::function<void()>& save_tokenizer, PrepareResult& res) {
  int64_t total = 0;
  for (const std::vector<int>& d : encoded) total += static_cast<int64_t>(d.size());
  const int64_t want_val = std::max<int64_t>(static_cast<int64_t>(val_fraction * total),
                                             std::min<int64_t>(kMinValTokens, total / 4));
  std::vector<uint32_t> train, val;
  auto append = [](std::vector<uint32_t>& dst, const int* src, size_t n) {
    for (size_t j = 0; j < n; j++) dst.push_back(static_cast<uint32_t>(src[j]));
  };
  if (encoded.size() == 1) {
    const std::vector<int>& d = encoded[0];
    const size_t cut = d.size() - static_cast<size_t>(std::min<int64_t>(want_val, total / 2));
    append(train, d.data(), cut);
    append(val, d.data() + cut, d.size() - cut);
  } else {
    const int64_t k = want_val > 0 ? std::max<int64_t>(2, total / want_val) : 0;
    for (size_t i = 0; i < encoded.size(); i++) {
      const bool to_val = k > 0 && static_cast<int64_t>(i % k) == k - 1;
      append(to_val ? val : train, encoded[i].data(), encoded[i].size());
    }
  }
  encoded.clear();

  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) throw Error(out_dir + ": cannot create output directory: " + ec.message());
  remove_old_outputs(out_dir, stale_tokenizer);
  const std::string train_prefix = (fs::path(out_dir) / "train").string();
  const std::string val_prefix = (fs::path(out_dir) / "val").string();
  save_tokenizer();
  write_shards(train, train_prefix, max_shard_tokens, wide);
  write_shards(val, val_prefix, max_shard_tokens, wide);
  res.train_pattern = train_prefix + "_*.bin";
  res.val_pattern = val_prefix + "_*.bin";
  res.train_tokens = static_cast<int64_t>(train.size());
  res.val_tokens = static_cast<int64_t>(val.size());
  res.uint32_tokens = wide;
}

}  // namespace

PrepareResult prepare_corpus(const std::vector<std::string>& inputs, const std::string& out_dir,
                             int vocab_size, double val_fraction, int max_shard_tokens) {
  check_prepare_args(val_fraction, max_shard_tokens);
  std::vector<std::string> docs;
  for (const std::string& f : list_files(inputs)) read_documents(f, docs);
  if (docs.empty())
    throw Error("prepare: no text found in the inputs (" + join_inputs(inputs) + ")");

  // Tokenizer training text: every k-th document, the smallest k that fits the cap.
  size_t total_bytes = 0;
  for (const std::string& d : docs) total_bytes += d.size();
  const size_t k_text =
      std::max<size_t>(1, (total_bytes + kTokenizerTextCap - 1) / kTokenizerTextCap);
  std::string train_text;
  for (size_t i = 0; i < docs.size() && train_text.size() < kTokenizerTextCap; i += k_text) {
    train_text += docs[i];
    train_text += '\n';
  }
  const Tokenizer tok = Tokenizer::train(train_text, vocab_size);
  train_text.clear();

  PrepareResult res;
  res.documents = static_cast<int64_t>(docs.size());
  std::vector<std::vector<int>> encoded(docs.size());
  for (size_t i = 0; i < docs.size(); i++) {
    encoded[i] = tok.encode(docs[i]);
    encoded[i].push_back(tok.eot_token());
  }
  docs.clear();
  res.tokenizer_path = (fs::path(out_dir) / "tokenizer.bin").string();
  res.vocab_size = tok.vocab_size();
  split_and_write(
      encoded, val_fraction, out_dir, max_shard_tokens, /*wide=*/false, "",
      [&] { tok.save(res.tokenizer_path); }, res);
  return res;
}

PrepareResult prepare_corpus_hf(const std::vector<std::string>& inputs, const std::string& out_dir,
                                const std::string& tokenizer_json, double val_fraction,
                                int max_shard_tokens) {
  check_prepare_args(val_fraction, max_shard_tokens);
  const std::vector<uint8_t> file = read_file_bytes(tokenizer_json);
  const HfTokenizer tok = HfTokenizer::parse(std::string(file.begin(), file.end()), tokenizer_json);
  const int bos = tok.bos_token(), eot = tok.eot_token();
  if (bos < 0 && eot < 0)
    throw Error(tokenizer_json +
                ": names no token to separate documents: no BOS token (a TemplateProcessing "
                "post-processor that puts a special token first) and no end-of-text token (a "
                "special added token <|endoftext|>, <|end_of_text|> or </s>)");
  std::vector<std::string> docs;
  for (const std::string& f : list_files(inputs)) read_documents(f, docs);
  if (docs.empty())
    throw Error("prepare: no text found in the inputs (" + join_inputs(inputs) + ")");

  PrepareResult res;
  res.documents = static_cast<int64_t>(docs.size());
  std::vector<std::vector<int>> encoded(docs.size());
  for (size_t i = 0; i < docs.size(); i++) {
    if (bos >= 0) encoded[i].push_back(bos);
    const std::vector<int> ids = tok.encode(to_valid_utf8(docs[i]));
    encoded[i].insert(encoded[i].end(), ids.begin(), ids.end());
    if (bos < 0) encoded[i].push_back(eot);
  }
  docs.clear();
  res.tokenizer_path = (fs::path(out_dir) / "tokenizer.json").string();
  res.vocab_size = tok.vocab_size();
  res.nfc_assumed = tok.nfc_normalizer();
  split_and_write(
      encoded, val_fraction, out_dir, max_shard_tokens, tok.vocab_size() > 65536, "tokenizer.bin",
      [&] { write_file_atomic(res.tokenizer_path, file.data(), file.size()); }, res);
  return res;
}

}  // namespace remat
