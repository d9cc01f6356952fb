#include "io/tokenizer.h"

#include <algorithm>
#include <climits>
#include <mutex>
#include <queue>

#include "base/error.h"
#include "io/atomic_file.h"

namespace remat {
namespace {

constexpr int kHeaderInts = 256;
constexpr size_t kMaxPiece = 255;  // llm.c stores a token's length in one byte
constexpr size_t kMaxChunk = 512;  // longer chunks are cut, bounding per-chunk merge work
constexpr size_t kMaxCacheEntries = 1 << 20;
const char kEotText[] = "<|endoftext|>";

enum class ByteClass { kSpace, kLetter, kDigit, kOther };

ByteClass classify(unsigned char b) {
  if (b == ' ' || b == '\t' || b == '\n' || b == '\r' || b == '\v' || b == '\f')
    return ByteClass::kSpace;
  if ((b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z') || b >= 0x80) return ByteClass::kLetter;
  if (b >= '0' && b <= '9') return ByteClass::kDigit;
  return ByteClass::kOther;
}

uint64_t pair_key(int a, int b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

// Merges every occurrence of (a, b) in `s` into z, left to right; returns whether any was.
bool merge_in_place(std::vector<int>& s, int a, int b, int z) {
  size_t out = 0;
  bool any = false;
  for (size_t i = 0; i < s.size();) {
    if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
      s[out++] = z;
      i += 2;
      any = true;
    } else {
      s[out++] = s[i++];
    }
  }
  s.resize(out);
  return any;
}

struct HeapEntry {
  int64_t count;
  uint64_t key;
};
// Highest count first; equal counts: smallest (left, right) first.
struct HeapOrder {
  bool operator()(const HeapEntry& x, const HeapEntry& y) const {
    if (x.count != y.count) return x.count < y.count;
    return x.key > y.key;
  }
};

}  // namespace

struct Tokenizer::Cache {
  std::mutex mu;
  std::unordered_map<std::string, std::vector<int>> map;
};

Tokenizer::Tokenizer() : cache_(std::make_unique<Cache>()) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

std::vector<std::string> pretokenize(const std::string& text) {
  std::vector<std::string> chunks;
  auto emit = [&](size_t begin, size_t end) {
    for (size_t p = begin; p < end; p += kMaxChunk)
      chunks.emplace_back(text, p, std::min(kMaxChunk, end - p));
  };
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    size_t start = i;
    if (classify(text[i]) == ByteClass::kSpace) {
      size_t j = i;
      while (j < n && classify(text[j]) == ByteClass::kSpace) j++;
      if (j == n || text[j - 1] != ' ') {  // whitespace that does not lead into a word
        emit(i, j);
        i = j;
        continue;
      }
      if (j - 1 > i) emit(i, j - 1);  // all but the last space, which joins the word
      start = j - 1;
      i = j;
    }
    const ByteClass c = classify(text[i]);
    size_t j = i;
    while (j < n && classify(text[j]) == c) j++;
    emit(start, j);
    i = j;
  }
  return chunks;
}

Tokenizer Tokenizer::train(const std::string& text, int vocab_size) {
  if (vocab_size < 257 || vocab_size > 65536)
    throw Error("Tokenizer::train: vocab size " + std::to_string(vocab_size) +
                " outside [257, 65536] (256 bytes + merges + end-of-text, ids fit uint16)");
  const int num_merges = vocab_size - 257;

  // Distinct chunks with their frequencies, in a fixed (sorted) order.
  std::unordered_map<std::string, int64_t> freq_of;
  for (std::string& w : pretokenize(text)) freq_of[std::move(w)]++;
  std::vector<std::pair<std::string, int64_t>> distinct(freq_of.begin(), freq_of.end());
  freq_of.clear();
  std::sort(distinct.begin(), distinct.end());
  std::vector<std::vector<int>> words(distinct.size());
  std::vector<int64_t> freq(distinct.size());
  for (size_t w = 0; w < distinct.size(); w++) {
    for (unsigned char b : distinct[w].first) words[w].push_back(b);
    freq[w] = distinct[w].second;
  }
  distinct.clear();

  Tokenizer tok;
  for (int b = 0; b < 256; b++) tok.pieces_.emplace_back(1, static_cast<char>(b));
  auto mergeable = [&](int a, int b) {
    return tok.pieces_[a].size() + tok.pieces_[b].size() <= kMaxPiece;
  };

  std::unordered_map<uint64_t, int64_t> pair_count;
  std::unordered_map<uint64_t, std::vector<int32_t>> pair_words;  // may hold stale words
  for (size_t w = 0; w < words.size(); w++)
    for (size_t i = 0; i + 1 < words[w].size(); i++) {
      const uint64_t k = pair_key(words[w][i], words[w][i + 1]);
      pair_count[k] += freq[w];
      pair_words[k].push_back(static_cast<int32_t>(w));
    }
  std::priority_queue<HeapEntry, std::vector<HeapEntry>, HeapOrder> heap;
  for (const auto& [k, c] : pair_count) heap.push({c, k});

  std::unordered_map<uint64_t, int64_t> delta;
  for (int m = 0; m < num_merges; m++) {
    // The best pair: skip heap entries whose count is out of date.
    while (!heap.empty()) {
      const HeapEntry top = heap.top();
      auto it = pair_count.find(top.key);
      if (it != pair_count.end() && it->second == top.count && top.count > 0) break;
      heap.pop();
    }
    if (heap.empty())
      throw Error("Tokenizer::train: the text runs out of pairs to merge after " +
                  std::to_string(m) + " merges; vocab size " + std::to_string(vocab_size) +
                  " needs " + std::to_string(num_merges) + " (give more text or a smaller vocab)");
    const uint64_t key = heap.top().key;
    heap.pop();
    const int a = static_cast<int>(key >> 32), b = static_cast<int>(key & 0xFFFFFFFFu);
    const int z = 256 + m;
    tok.pieces_.push_back(tok.pieces_[a] + tok.pieces_[b]);
    tok.merges_.emplace_back(a, b);

    std::vector<int32_t> affected = std::move(pair_words[key]);
    pair_words.erase(key);
    std::sort(affected.begin(), affected.end());
    affected.erase(std::unique(affected.begin(), affected.end()), affected.end());
    delta.clear();
    for (int32_t w : affected) {
      std::vector<int>& s = words[w];
      bool present = false;
      for (size_t i = 0; i + 1 < s.size() && !present; i++) present = s[i] == a && s[i + 1] == b;
      if (!present) continue;  // stale entry
      for (size_t i = 0; i + 1 < s.size(); i++)
        if (mergeable(s[i], s[i + 1])) delta[pair_key(s[i], s[i + 1])] -= freq[w];
      merge_in_place(s, a, b, z);
      for (size_t i = 0; i + 1 < s.size(); i++) {
        if (!mergeable(s[i], s[i + 1])) continue;
        const uint64_t k = pair_key(s[i], s[i + 1]);
        delta[k] += freq[w];
        if (s[i] == z || s[i + 1] == z) pair_words[k].push_back(w);
      }
    }
    for (const auto& [k, d] : delta) {
      if (d == 0) continue;
      int64_t& c = pair_count[k];
      c += d;
      if (c > 0)
        heap.push({c, k});
      else
        pair_count.erase(k);
    }
    pair_count.erase(key);
  }
  tok.pieces_.emplace_back(kEotText);
  tok.eot_ = vocab_size - 1;
  tok.has_merges_ = true;
  tok.build_ranks();
  return tok;
}

void Tokenizer::build_ranks() {
  rank_.clear();
  for (size_t r = 0; r < merges_.size(); r++)
    rank_[pair_key(merges_[r].first, merges_[r].second)] = static_cast<int>(r);
}

std::vector<int> Tokenizer::encode_chunk(const std::string& chunk) const {
  std::vector<int> s;
  s.reserve(chunk.size());
  for (unsigned char b : chunk) s.push_back(b);
  while (s.size() > 1) {
    int best = INT_MAX;
    for (size_t i = 0; i + 1 < s.size(); i++) {
      auto it = rank_.find(pair_key(s[i], s[i + 1]));
      if (it != rank_.end() && it->second < best) best = it->second;
    }
    if (best == INT_MAX) break;
    merge_in_place(s, merges_[best].first, merges_[best].second, 256 + best);
  }
  return s;
}

std::vector<int> Tokenizer::encode(const std::string& text) const {
  if (!has_merges_)
    throw Error(
        "Tokenizer::encode: this tokenizer file has no merges section (llm.c's files only "
        "decode); train one with `remat prepare`");
  std::vector<int> out;
  for (const std::string& chunk : pretokenize(text)) {
    if (cache_) {
      std::lock_guard<std::mutex> lock(cache_->mu);
      auto it = cache_->map.find(chunk);
      if (it != cache_->map.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        continue;
      }
    }
    std::vector<int> ids = encode_chunk(chunk);
    out.insert(out.end(), ids.begin(), ids.end());
    if (cache_) {
      std::lock_guard<std::mutex> lock(cache_->mu);
      if (cache_->map.size() >= kMaxCacheEntries) cache_->map.clear();
      cache_->map.emplace(chunk, std::move(ids));
    }
  }
  return out;
}

std::string Tokenizer::decode(int token) const {
  if (token < 0 || token >= vocab_size())
    throw Error("Tokenizer::decode: token " + std::to_string(token) + " outside [0, " +
                std::to_string(vocab_size()) + ")");
  return pieces_[token];
}

std::string Tokenizer::decode(const std::vector<int>& tokens) const {
  std::string out;
  for (int t : tokens) out += decode(t);
  return out;
}

void Tokenizer::save(const std::string& path) const {
  for (size_t i = 0; i < pieces_.size(); i++)
    if (pieces_[i].empty() || pieces_[i].size() > kMaxPiece)
      throw Error(path + ": token " + std::to_string(i) + " has " +
                  std::to_string(pieces_[i].size()) + " bytes; the file allows 1..255");
  uint32_t h[kHeaderInts] = {};
  h[0] = kTokenizerMagic;
  h[1] = 2;
  h[2] = static_cast<uint32_t>(pieces_.size());
  h[3] = static_cast<uint32_t>(eot_);
  write_file_atomic(path, [&](FILE* f) {
    write_all(f, h, sizeof(h), path);
    for (const std::string& p : pieces_) {
      const uint8_t len = static_cast<uint8_t>(p.size());
      write_all(f, &len, 1, path);
      write_all(f, p.data(), p.size(), path);
    }
    if (!has_merges_) return;
    const uint32_t m[2] = {kMergesMagic, static_cast<uint32_t>(merges_.size())};
    write_all(f, m, sizeof(m), path);
    for (const auto& [l, r] : merges_) {
      const uint32_t pr[2] = {static_cast<uint32_t>(l), static_cast<uint32_t>(r)};
      write_all(f, pr, sizeof(pr), path);
    }
  });
}

Tokenizer Tokenizer::load(const std::string& path) {
  FileReader r(path);
  uint32_t h[kHeaderInts];
  if (r.size() < sizeof(h))
    throw Error(path + ": truncated tokenizer header: the file holds " + std::to_string(r.size()) +
                " bytes, the header alone is " + std::to_string(sizeof(h)));
  r.read(h, sizeof(h), "the tokenizer header");
  if (h[0] != kTokenizerMagic)
    throw Error(path + ": not a tokenizer file: expected magic " + std::to_string(kTokenizerMagic) +
                " and found " + std::to_string(h[0]));
  if (h[1] != 1 && h[1] != 2)
    throw Error(path + ": unsupported tokenizer version " + std::to_string(h[1]) +
                " (supported: 1, 2)");
  const uint64_t vocab = h[2];
  if (vocab == 0 || vocab > 65536)
    throw Error(path + ": header says " + std::to_string(vocab) +
                " tokens; supported are 1 to 65536");
  const uint64_t eot = h[1] == 1 ? 50256 : h[3];
  if (eot >= vocab)
    throw Error(path + ": end-of-text token " + std::to_string(eot) + " is outside the " +
                std::to_string(vocab) + "-token vocabulary");

  Tokenizer tok;
  tok.eot_ = static_cast<int>(eot);
  // Entries take at least 2 bytes each: reserve no more than the file can hold.
  tok.pieces_.reserve(static_cast<size_t>(std::min<uint64_t>(vocab, r.remaining() / 2)));
  for (uint64_t i = 0; i < vocab; i++) {
    const std::string what = "token " + std::to_string(i) + " of " + std::to_string(vocab);
    if (r.remaining() == 0) throw Error(path + ": truncated: the file ends before " + what);
    uint8_t len;
    r.read(&len, 1, what.c_str());
    if (len == 0) throw Error(path + ": " + what + " has length 0");
    std::string piece(len, '\0');
    r.read(piece.data(), len, what.c_str());
    tok.pieces_.push_back(std::move(piece));
  }
  if (r.remaining() == 0) return tok;  // llm.c's file: decode only

  uint32_t m[2];
  r.read(m, sizeof(m), "the merges section header");
  if (m[0] != kMergesMagic)
    throw Error(path + ": unexpected bytes after the vocabulary: expected merges magic " +
                std::to_string(kMergesMagic) + " and found " + std::to_string(m[0]));
  const uint64_t count = m[1];
  if (count != vocab - 257 || eot != vocab - 1)
    throw Error(path + ": merges section lists " + std::to_string(count) +
                " merges but a vocabulary of " + std::to_string(vocab) + " with eot " +
                std::to_string(eot) + " needs " + std::to_string(vocab >= 257 ? vocab - 257 : 0) +
                " and eot = vocab - 1");
  if (r.remaining() != count * 8)
    throw Error(path + ": merges section should hold " + std::to_string(count * 8) + " bytes but " +
                std::to_string(r.remaining()) + " remain");
  for (int b = 0; b < 256; b++)
    if (tok.pieces_[b] != std::string(1, static_cast<char>(b)))
      throw Error(path + ": token " + std::to_string(b) + " is not byte " + std::to_string(b) +
                  ", so the merges do not apply to this vocabulary");
  for (uint64_t k = 0; k < count; k++) {
    uint32_t pr[2];
    r.read(pr, sizeof(pr), "a merge pair");
    const uint64_t z = 256 + k;
    if (pr[0] >= z || pr[1] >= z || tok.pieces_[pr[0]] + tok.pieces_[pr[1]] != tok.pieces_[z])
      throw Error(path + ": merge " + std::to_string(k) + " (" + std::to_string(pr[0]) + ", " +
                  std::to_string(pr[1]) + ") does not produce token " + std::to_string(z));
    tok.merges_.emplace_back(static_cast<int>(pr[0]), static_cast<int>(pr[1]));
  }
  tok.has_merges_ = true;
  tok.build_ranks();
  return tok;
}

}  // namespace remat
