// File formats and the data pipeline: llm.c model checkpoints, token shards and the data
// loader, the BPE tokenizer, the training state, atomic writes and `remat prepare`.
#include <dirent.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <climits>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "base/rng.h"
#include "io/atomic_file.h"
#include "io/llmc_model.h"
#include "io/params.h"
#include "io/prepare.h"
#include "io/shards.h"
#include "io/tokenizer.h"
#include "io/train_state.h"
#include "kernels/common.h"

namespace remat {
namespace {

// A fresh directory under /tmp per test, removed afterwards.
class Files : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/remat_test_files_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::string dir_;
};

// Runs fn and expects a remat::Error whose message holds every one of `parts`.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "message lacks '" << p << "': " << msg;
    return;
  }
  ADD_FAILURE() << "no remat::Error thrown";
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  ASSERT_TRUE(f.good());
}

void write_text(const std::string& path, const std::string& s) {
  write_bytes(path, std::vector<uint8_t>(s.begin(), s.end()));
}

template <typename T>
void append(std::vector<uint8_t>& out, T x) {
  uint8_t b[sizeof(T)];
  std::memcpy(b, &x, sizeof(T));
  out.insert(out.end(), b, b + sizeof(T));
}

// An llm.c-style 256 x int32 header followed by nothing.
std::vector<uint8_t> header_bytes(std::vector<int32_t> first) {
  first.resize(256, 0);
  std::vector<uint8_t> out;
  for (int32_t x : first) append(out, x);
  return out;
}

ModelConfig tiny_config() {
  ModelConfig c;
  c.max_seq_len = 8;
  c.vocab_size = 10;
  c.padded_vocab = 16;
  c.num_layers = 1;
  c.num_heads = 2;
  c.channels = 4;
  return c;
}

std::vector<float> random_params(const ModelConfig& c, uint64_t seed) {
  std::vector<float> p(num_params(c));
  Philox rng(seed, 0);
  for (float& x : p) x = rng.normal();
  return p;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

// ---------------------------------------------------------------- atomic writes

TEST_F(Files, AtomicWriteReplacesAndReads) {
  const std::string p = path("a.bin");
  write_file_atomic(p, "hello", 5);
  write_file_atomic(p, "goodbye", 7);
  const std::vector<uint8_t> got = read_file_bytes(p);
  EXPECT_EQ(std::string(got.begin(), got.end()), "goodbye");
  EXPECT_EQ(list_dir(dir_), std::vector<std::string>{"a.bin"});  // no temporary left
  expect_error([&] { read_file_bytes(path("missing.bin")); }, {path("missing.bin")});
}

TEST_F(Files, AtomicWriteIntoMissingDirectoryThrows) {
  const std::string p = path("no/such/dir/a.bin");
  expect_error([&] { write_file_atomic(p, "x", 1); }, {p, "No such file"});
}

TEST_F(Files, AtomicWriteFailureLeavesOldFile) {
  const std::string p = path("keep.bin");
  write_file_atomic(p, "old contents", 12);
  // The writer throws half way: the old file stays and the temporary is removed.
  EXPECT_THROW(write_file_atomic(p,
                                 [&](FILE* f) {
                                   write_all(f, "new", 3, p);
                                   throw Error("writer gave up");
                                 }),
               Error);
  std::vector<uint8_t> got = read_file_bytes(p);
  EXPECT_EQ(std::string(got.begin(), got.end()), "old contents");
  EXPECT_EQ(list_dir(dir_), std::vector<std::string>{"keep.bin"});

  // A short write (file size limit): Error naming the path, old file intact.
  struct sigaction ignore {
  }, old_action{};
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(sigaction(SIGXFSZ, &ignore, &old_action), 0);
  struct rlimit old_limit;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  struct rlimit small = old_limit;
  small.rlim_cur = 4096;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  std::vector<uint8_t> big(1 << 20, 7);
  bool threw = false;
  std::string msg;
  try {
    write_file_atomic(p, big.data(), big.size());
  } catch (const Error& e) {
    threw = true;
    msg = e.what();
  }
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &old_limit), 0);
  ASSERT_EQ(sigaction(SIGXFSZ, &old_action, nullptr), 0);
  EXPECT_TRUE(threw);
  EXPECT_NE(msg.find(p), std::string::npos) << msg;
  got = read_file_bytes(p);
  EXPECT_EQ(std::string(got.begin(), got.end()), "old contents");
  EXPECT_EQ(list_dir(dir_), std::vector<std::string>{"keep.bin"});
}

TEST_F(Files, AtomicWriteOverDirectoryFailsCleanly) {
  const std::string p = path("target");
  ASSERT_EQ(mkdir(p.c_str(), 0755), 0);
  write_text(p + "/inside", "x");  // a non-empty directory cannot be replaced by a file
  expect_error([&] { write_file_atomic(p, "abc", 3); }, {p, "rename"});
  EXPECT_EQ(list_dir(dir_), std::vector<std::string>{"target"});
}

// ---------------------------------------------------------------- llm.c model files

TEST_F(Files, ModelV3RoundTripAndLayout) {
  const ModelConfig c = tiny_config();
  const std::vector<float> params = random_params(c, 1);
  ASSERT_EQ(params.size(), 348u);  // 16*4 + 8*4 + (12*16 + 13*4) + 2*4
  const std::string p = path("model.bin");
  write_llmc_model(p, c, params.data(), 3);

  // The bytes, built by hand: 256 int32 header then the fp32 parameters.
  std::vector<uint8_t> want = header_bytes({20240326, 3, 8, 10, 1, 2, 4, 16});
  for (float x : params) append(want, x);
  const std::vector<uint8_t> got = read_file_bytes(p);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size()), 0);

  const ModelFile m = read_llmc_model(p);
  EXPECT_EQ(m.version, 3);
  check_model_matches(c, m.config, p);
  ASSERT_EQ(m.params.size(), params.size());
  EXPECT_EQ(std::memcmp(m.params.data(), params.data(), params.size() * 4), 0);
}

TEST_F(Files, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 lies halfway between bf16 1.0 (0x3F80, even) and 1 + 2^-7 (0x3F81): to 0x3F80.
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3F80);
  // 1 + 3*2^-8 lies halfway between 0x3F81 (odd) and 0x3F82 (even): to 0x3F82.
  EXPECT_EQ(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);
  // Just above halfway rounds up.
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3F81);
  EXPECT_EQ(float_to_bf16(-2.5f), 0xC020);
  EXPECT_EQ(float_to_bf16(65280.0f + 128.0f), 0x4780);  // 0x477F8000: tie, rounds to even
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
  EXPECT_EQ(bf16_to_float(0x3F81), 1.0f + std::ldexp(1.0f, -7));
}

TEST_F(Files, ModelV5RoundTrip) {
  const ModelConfig c = tiny_config();
  std::vector<float> params = random_params(c, 2);
  params[0] = 1.0f + std::ldexp(1.0f, -8);
  params[1] = 1.0f + 3 * std::ldexp(1.0f, -8);
  params[2] = -2.5f;
  const std::string p = path("model_bf16.bin");
  write_llmc_model(p, c, params.data(), 5);

  const std::vector<uint8_t> got = read_file_bytes(p);
  ASSERT_EQ(got.size(), 1024 + params.size() * 2);
  std::vector<uint8_t> want_header = header_bytes({20240326, 5, 8, 10, 1, 2, 4, 16});
  EXPECT_EQ(std::memcmp(got.data(), want_header.data(), 1024), 0);
  uint16_t first[3];
  std::memcpy(first, got.data() + 1024, sizeof(first));
  EXPECT_EQ(first[0], 0x3F80);
  EXPECT_EQ(first[1], 0x3F82);
  EXPECT_EQ(first[2], 0xC020);

  const ModelFile m = read_llmc_model(p);
  EXPECT_EQ(m.version, 5);
  ASSERT_EQ(m.params.size(), params.size());
  for (size_t i = 0; i < params.size(); i++) {
    // bf16 keeps 8 significant bits: rounding to nearest errs by at most half an ulp,
    // 2^-8 relative to |x|.
    EXPECT_LE(std::fabs(m.params[i] - params[i]), std::ldexp(std::fabs(params[i]), -8)) << i;
    EXPECT_EQ(float_bits(m.params[i]) & 0xFFFFu, 0u);  // the low half is zero
  }
}

TEST_F(Files, ModelErrors) {
  const ModelConfig c = tiny_config();
  const std::vector<float> params = random_params(c, 3);
  const std::string good = path("good.bin");
  write_llmc_model(good, c, params.data(), 3);
  std::vector<uint8_t> bytes = read_file_bytes(good);

  expect_error([&] { read_llmc_model(path("missing.bin")); }, {path("missing.bin")});

  const std::string short_header = path("short_header.bin");
  write_bytes(short_header, std::vector<uint8_t>(bytes.begin(), bytes.begin() + 100));
  expect_error([&] { read_llmc_model(short_header); }, {short_header, "header"});

  std::vector<uint8_t> b = bytes;
  b[0] ^= 1;
  const std::string magic = path("magic.bin");
  write_bytes(magic, b);
  int32_t bad_magic;
  std::memcpy(&bad_magic, b.data(), 4);
  expect_error([&] { read_llmc_model(magic); }, {magic, "20240326", std::to_string(bad_magic)});

  b = bytes;
  b[4] = 4;
  const std::string version = path("version.bin");
  write_bytes(version, b);
  expect_error([&] { read_llmc_model(version); }, {version, "version 4"});

  const std::string truncated = path("truncated.bin");
  write_bytes(truncated, std::vector<uint8_t>(bytes.begin(), bytes.end() - 4));
  expect_error([&] { read_llmc_model(truncated); },
               {truncated, std::to_string(bytes.size() - 4), std::to_string(bytes.size())});

  // Dimensions whose parameter count overflows 64 bits: rejected before any allocation.
  const std::string overflow = path("overflow.bin");
  write_bytes(overflow,
              header_bytes({20240326, 3, 1 << 30, 1 << 30, 1 << 30, 1, 1 << 30, 1 << 30}));
  expect_error([&] { read_llmc_model(overflow); }, {overflow, "overflow"});

  const std::string heads = path("heads.bin");
  write_bytes(heads, header_bytes({20240326, 3, 8, 10, 1, 3, 4, 16}));
  expect_error([&] { read_llmc_model(heads); }, {heads, "NH=3"});

  const std::string vocab = path("vocab.bin");
  write_bytes(vocab, header_bytes({20240326, 3, 8, 20, 1, 2, 4, 16}));
  expect_error([&] { read_llmc_model(vocab); }, {vocab, "Vp=16"});

  const std::string negative = path("negative.bin");
  write_bytes(negative, header_bytes({20240326, 3, 8, 10, -1, 2, 4, 16}));
  expect_error([&] { read_llmc_model(negative); }, {negative, "positive"});

  ModelConfig other = c;
  other.num_layers = 3;
  expect_error([&] { check_model_matches(other, c, good); }, {good, "num_layers", "3", "1"});
  expect_error([&] { write_llmc_model(path("v4.bin"), c, params.data(), 4); },
               {path("v4.bin"), "version 4"});
}

// ---------------------------------------------------------------- shards and loader

std::vector<uint16_t> iota_tokens(size_t n, uint16_t first) {
  std::vector<uint16_t> t(n);
  for (size_t i = 0; i < n; i++) t[i] = static_cast<uint16_t>(first + i);
  return t;
}

TEST_F(Files, ShardRoundTripAndLayout) {
  const std::vector<uint16_t> t = iota_tokens(37, 100);
  const std::string p = path("s.bin");
  write_shard(p, t.data(), t.size());
  std::vector<uint8_t> want = header_bytes({20240520, 1, 37});
  for (uint16_t x : t) append(want, x);
  const std::vector<uint8_t> got = read_file_bytes(p);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size()), 0);
  EXPECT_EQ(read_shard(p), t);
}

TEST_F(Files, ShardErrors) {
  const std::vector<uint16_t> t = iota_tokens(20, 0);
  std::vector<uint8_t> bytes = header_bytes({20240520, 1, 20});
  for (uint16_t x : t) append(bytes, x);

  expect_error([&] { read_shard(path("missing.bin")); }, {path("missing.bin")});

  std::vector<uint8_t> b = bytes;
  b[0] ^= 0xFF;
  const std::string magic = path("magic.bin");
  write_bytes(magic, b);
  expect_error([&] { read_shard(magic); }, {magic, "20240520"});

  b = bytes;
  b[4] = 2;
  const std::string version = path("version.bin");
  write_bytes(version, b);
  expect_error([&] { read_shard(version); }, {version, "version 2"});

  const std::string size = path("size.bin");
  write_bytes(size, std::vector<uint8_t>(bytes.begin(), bytes.end() - 6));
  expect_error([&] { read_shard(size); }, {size, "20 tokens", "17 tokens"});

  b = header_bytes({20240520, 1, INT32_MAX});
  for (uint16_t x : t) append(b, x);
  const std::string huge = path("huge.bin");
  write_bytes(huge, b);
  expect_error([&] { read_shard(huge); }, {huge, "2147483647"});
  expect_error([&] { DataLoader(huge, 1, 4, 100, false, 0); }, {huge, "2147483647"});

  const std::string small = path("small.bin");
  write_shard(small, t.data(), t.size());
  expect_error([&] { DataLoader(small, 4, 5, 100, false, 0); }, {small, "21"});

  std::vector<uint16_t> bad = t;
  bad[13] = 70;
  const std::string vocab = path("vocab.bin");
  write_shard(vocab, bad.data(), bad.size());
  expect_error([&] { DataLoader(vocab, 1, 4, 64, false, 0); }, {vocab, "70", "13", "64"});

  expect_error([&] { expand_glob(path("nothing_*.bin")); }, {path("nothing_*.bin")});
}

TEST_F(Files, GlobIsSorted) {
  const std::vector<uint16_t> t = iota_tokens(4, 0);
  for (const char* n : {"d_002.bin", "d_000.bin", "d_010.bin", "d_001.bin"})
    write_shard(path(n), t.data(), t.size());
  EXPECT_EQ(expand_glob(path("d_*.bin")),
            (std::vector<std::string>{path("d_000.bin"), path("d_001.bin"), path("d_002.bin"),
                                      path("d_010.bin")}));
}

// Two shards: tokens 0..40 (5 batches of B*T = 8) and 1000..1024 (3 batches).
class Loader : public Files {
 protected:
  void SetUp() override {
    Files::SetUp();
    const std::vector<uint16_t> a = iota_tokens(41, 0), b = iota_tokens(25, 1000);
    write_shard(path("tok_000.bin"), a.data(), a.size());
    write_shard(path("tok_001.bin"), b.data(), b.size());
    pattern_ = path("tok_*.bin");
  }
  // First input token of each of the next n batches, checking each batch's internal layout.
  static std::vector<int> take(DataLoader& dl, int n) {
    std::vector<int> firsts;
    std::vector<int> in(8), tg(8);
    for (int i = 0; i < n; i++) {
      dl.next_batch(in.data(), tg.data());
      for (int j = 0; j < 8; j++) {
        EXPECT_EQ(in[j], in[0] + j);
        EXPECT_EQ(tg[j], in[j] + 1);
      }
      firsts.push_back(in[0]);
    }
    return firsts;
  }
  std::string pattern_;
};

TEST_F(Loader, OrderRolloverAndEpochWrap) {
  DataLoader dl(pattern_, 2, 4, 2000, false, 0);
  EXPECT_EQ(dl.num_shards(), 2);
  EXPECT_EQ(dl.batches_in_shard(0), 5);
  EXPECT_EQ(dl.batches_in_shard(1), 3);
  EXPECT_EQ(take(dl, 5), (std::vector<int>{0, 8, 16, 24, 32}));
  LoaderState s = dl.state();
  EXPECT_EQ(s.epoch, 0);
  EXPECT_EQ(s.shard, 1);
  EXPECT_EQ(s.batch_in_shard, 0);
  EXPECT_EQ(take(dl, 3), (std::vector<int>{1000, 1008, 1016}));
  s = dl.state();
  EXPECT_EQ(s.epoch, 1);
  EXPECT_EQ(s.shard, 0);
  EXPECT_EQ(take(dl, 2), (std::vector<int>{0, 8}));
  dl.reset();
  EXPECT_EQ(take(dl, 1), std::vector<int>{0});
}

TEST_F(Loader, ExactBatchLayout) {
  DataLoader dl(pattern_, 2, 4, 2000, false, 0);
  std::vector<int> in(8), tg(8);
  dl.next_batch(in.data(), tg.data());
  dl.next_batch(in.data(), tg.data());  // batch 1: tokens [8, 17)
  EXPECT_EQ(in, (std::vector<int>{8, 9, 10, 11, 12, 13, 14, 15}));
  EXPECT_EQ(tg, (std::vector<int>{9, 10, 11, 12, 13, 14, 15, 16}));
}

TEST_F(Loader, RestoreContinuesIdentically) {
  for (bool shuffle : {false, true}) {
    DataLoader a(pattern_, 2, 4, 2000, shuffle, 42);
    take(a, 6);
    const LoaderState s = a.state();
    const std::vector<int> rest = take(a, 20);
    DataLoader b(pattern_, 2, 4, 2000, shuffle, 42);
    b.restore(s);
    EXPECT_EQ(take(b, 20), rest) << "shuffle=" << shuffle;
  }
  DataLoader dl(pattern_, 2, 4, 2000, false, 0);
  expect_error([&] { dl.restore({0, 1, 3}); }, {path("tok_001.bin"), "3 batches"});
  expect_error([&] { dl.restore({0, 2, 0}); }, {"shard 2"});
  EXPECT_EQ(take(dl, 1), std::vector<int>{0});  // a failed restore leaves the position
}

TEST_F(Loader, ShuffleIsADeterministicPermutation) {
  DataLoader plain(pattern_, 2, 4, 2000, false, 0);
  const std::vector<int> ordered = take(plain, 8);
  DataLoader a(pattern_, 2, 4, 2000, true, 7), b(pattern_, 2, 4, 2000, true, 7);
  DataLoader c(pattern_, 2, 4, 2000, true, 8);
  const std::vector<int> ea = take(a, 16), eb = take(b, 16), ec = take(c, 16);
  EXPECT_EQ(ea, eb);
  EXPECT_NE(ea, ec);
  const std::vector<int> epoch0(ea.begin(), ea.begin() + 8), epoch1(ea.begin() + 8, ea.end());
  EXPECT_NE(epoch0, ordered);
  EXPECT_NE(epoch0, epoch1);
  for (const std::vector<int>& e : {epoch0, epoch1}) {
    EXPECT_EQ(std::multiset<int>(e.begin(), e.end()),
              std::multiset<int>(ordered.begin(), ordered.end()));
    // A shard's batches stay together.
    const bool first_is_a = e[0] < 1000;
    for (int i = 0; i < 8; i++) EXPECT_EQ(e[i] < 1000, first_is_a == (i < (first_is_a ? 5 : 3)));
  }
}

// ---------------------------------------------------------------- tokenizer

// Deterministic pseudo-English with UTF-8 characters: words of 1-3 random syllables.
std::string sample_text(int words, uint64_t seed) {
  const char* syllables[] = {"the", "ca",  "t",   "sa", "on",    "ma", "ï",    "ve",  "fé",  "日本",
                             "語",  "ü",   "ber", "lo", "wor",   "ld", "to",   "ken", "rai", "n",
                             "in",  "spa", "42",  "19", "don't", "—",  "🙂", "qu",  "ix",  "zo"};
  constexpr uint32_t kSyllables = sizeof(syllables) / sizeof(syllables[0]);
  Philox rng(seed, 0);
  std::string s;
  for (int i = 0; i < words; i++) {
    const uint32_t len = 1 + rng.next_u32() % 3;
    for (uint32_t k = 0; k < len; k++) s += syllables[rng.next_u32() % kSyllables];
    const uint32_t r = rng.next_u32() % 16;
    s += r == 0 ? ".\n" : r == 1 ? ", " : r == 2 ? "\n\n" : " ";
  }
  return s;
}

TEST(Pretokenize, SplitsAtWordBoundaries) {
  EXPECT_EQ(
      pretokenize("Hello  world\n\nfoo,bar 42x"),
      (std::vector<std::string>{"Hello", " ", " world", "\n\n", "foo", ",", "bar", " 42", "x"}));
  EXPECT_EQ(pretokenize(" naïve\t"), (std::vector<std::string>{" naïve", "\t"}));
}

TEST(TokenizerTrain, TieBreakAndFrequency) {
  // "abab": (a,b) occurs twice, (b,a) once -> the first merge is (a,b).
  Tokenizer t = Tokenizer::train("abab abab", 258 + 1);
  ASSERT_EQ(t.merges().size(), 2u);
  EXPECT_EQ(t.merges()[0], std::make_pair(int('a'), int('b')));
  // All pairs once: the smallest ids win, (' ', 'c') = (32, 99).
  Tokenizer u = Tokenizer::train("ab cd", 258);
  EXPECT_EQ(u.merges()[0], std::make_pair(32, 99));
  EXPECT_EQ(u.vocab_size(), 258);
  EXPECT_EQ(u.eot_token(), 257);
  EXPECT_EQ(u.decode(257), "<|endoftext|>");
  EXPECT_THROW(Tokenizer::train("ab", 300), Error);  // runs out of pairs
  EXPECT_THROW(Tokenizer::train("abc", 256), Error);
}

TEST(TokenizerTrain, DeterministicExactVocabAndRoundTrip) {
  const std::string text = sample_text(20000, 1);
  const Tokenizer a = Tokenizer::train(text, 400), b = Tokenizer::train(text, 400);
  EXPECT_EQ(a.vocab_size(), 400);
  EXPECT_EQ(a.merges(), b.merges());
  const std::string other = sample_text(500, 2) + "ünïcödé \xF0\x9F\x99\x82 <|endoftext|>\x01";
  const std::vector<int> ids = a.encode(other);
  EXPECT_EQ(a.decode(ids), other);
  EXPECT_LT(ids.size(), other.size() / 2);  // it learned to compress
  for (int id : ids) {
    EXPECT_GE(id, 0);
    EXPECT_LT(id, a.eot_token());  // text never encodes to eot
  }
  // Each merged token is the concatenation of its pair.
  for (size_t r = 0; r < a.merges().size(); r++)
    EXPECT_EQ(a.decode(256 + static_cast<int>(r)),
              a.decode(a.merges()[r].first) + a.decode(a.merges()[r].second));
  EXPECT_THROW(a.decode(400), Error);
}

TEST_F(Files, TokenizerSaveLoad) {
  const Tokenizer a = Tokenizer::train(sample_text(5000, 3), 320);
  const std::string p = path("tok.bin");
  a.save(p);
  const Tokenizer b = Tokenizer::load(p);
  EXPECT_EQ(b.vocab_size(), 320);
  EXPECT_EQ(b.eot_token(), 319);
  EXPECT_EQ(b.merges(), a.merges());
  const std::string text = sample_text(300, 4);
  EXPECT_EQ(b.encode(text), a.encode(text));

  // The llm.c part by hand: header, then length-prefixed entries.
  const std::vector<uint8_t> bytes = read_file_bytes(p);
  std::vector<uint8_t> want = header_bytes({20240328, 2, 320, 319});
  for (int i = 0; i < 320; i++) {
    const std::string piece = a.decode(i);
    want.push_back(static_cast<uint8_t>(piece.size()));
    want.insert(want.end(), piece.begin(), piece.end());
  }
  append<uint32_t>(want, 0x52454D54);
  append<uint32_t>(want, 63);
  for (const auto& [l, r] : a.merges()) {
    append<uint32_t>(want, l);
    append<uint32_t>(want, r);
  }
  ASSERT_EQ(bytes.size(), want.size());
  EXPECT_EQ(std::memcmp(bytes.data(), want.data(), want.size()), 0);

  // Without the merges section (an llm.c file): decodes, cannot encode.
  const size_t llmc_size = want.size() - 8 - 63 * 8;
  const std::string decode_only = path("decode_only.bin");
  write_bytes(decode_only, std::vector<uint8_t>(bytes.begin(), bytes.begin() + llmc_size));
  const Tokenizer d = Tokenizer::load(decode_only);
  EXPECT_FALSE(d.can_encode());
  EXPECT_EQ(d.decode(a.encode(text)), text);
  expect_error([&] { d.encode("x"); }, {"no merges"});

  // Truncated inside the entries: the message names the file and the token.
  const std::string truncated = path("truncated.bin");
  write_bytes(truncated, std::vector<uint8_t>(bytes.begin(), bytes.begin() + 1024 + 300));
  expect_error([&] { Tokenizer::load(truncated); }, {truncated, "token "});
  // Truncated inside the merges.
  const std::string cut_merges = path("cut_merges.bin");
  write_bytes(cut_merges, std::vector<uint8_t>(bytes.begin(), bytes.end() - 3));
  expect_error([&] { Tokenizer::load(cut_merges); }, {cut_merges, "merges"});

  std::vector<uint8_t> b2 = bytes;
  b2[1024] = 0;  // token 0 with length zero
  const std::string zero = path("zero.bin");
  write_bytes(zero, b2);
  expect_error([&] { Tokenizer::load(zero); }, {zero, "token 0", "length 0"});

  b2 = bytes;
  b2[0] ^= 1;
  const std::string magic = path("magic.bin");
  write_bytes(magic, b2);
  expect_error([&] { Tokenizer::load(magic); }, {magic, "20240328"});

  b2 = bytes;
  b2[4] = 3;
  const std::string version = path("version.bin");
  write_bytes(version, b2);
  expect_error([&] { Tokenizer::load(version); }, {version, "version 3"});

  const std::string huge = path("huge.bin");
  write_bytes(huge, header_bytes({20240328, 2, 60000, 1}));
  expect_error([&] { Tokenizer::load(huge); }, {huge, "60000"});
  expect_error([&] { Tokenizer::load(path("missing.bin")); }, {path("missing.bin")});
}

TEST_F(Files, TokenizerReadsLlmcVersion1) {
  // GPT-2's layout: 50257 entries, version 1 has no eot field (eot = 50256).
  std::vector<uint8_t> b = header_bytes({20240328, 1, 50257});
  for (int i = 0; i < 50257; i++) {
    const std::string piece = i < 256 ? std::string(1, char(i)) : "t" + std::to_string(i);
    b.push_back(static_cast<uint8_t>(piece.size()));
    b.insert(b.end(), piece.begin(), piece.end());
  }
  const std::string p = path("gpt2_tokenizer.bin");
  write_bytes(p, b);
  const Tokenizer t = Tokenizer::load(p);
  EXPECT_EQ(t.vocab_size(), 50257);
  EXPECT_EQ(t.eot_token(), 50256);
  EXPECT_EQ(t.decode({72, 300, 105}), "Ht300i");
  EXPECT_FALSE(t.can_encode());
}

// ---------------------------------------------------------------- training state

TrainState sample_state() {
  TrainState s;
  s.config = tiny_config();
  s.step = 123456789012345;
  s.params = random_params(s.config, 5);
  s.m = random_params(s.config, 6);
  s.v = random_params(s.config, 7);
  s.loader = {3, 1, 17};
  s.rng_seed = 0xDEADBEEFCAFEF00Dull;
  s.extra_json = "{\"lr\": 0.0006, \"name\": \"naïve\"}";
  return s;
}

TEST_F(Files, TrainStateRoundTrip) {
  const TrainState s = sample_state();
  const std::string p = path("state.bin");
  save_train_state(p, s);
  const TrainState t = load_train_state(p);
  check_model_matches(s.config, t.config, p);
  EXPECT_EQ(t.step, s.step);
  EXPECT_EQ(t.params, s.params);
  EXPECT_EQ(t.m, s.m);
  EXPECT_EQ(t.v, s.v);
  EXPECT_EQ(t.loader.epoch, 3);
  EXPECT_EQ(t.loader.shard, 1);
  EXPECT_EQ(t.loader.batch_in_shard, 17);
  EXPECT_EQ(t.rng_seed, s.rng_seed);
  EXPECT_EQ(t.extra_json, s.extra_json);
  EXPECT_EQ(read_file_bytes(p).size(), 112 + 3 * 348 * 4 + s.extra_json.size() + 8);

  // Without moments yet.
  TrainState fresh = s;
  fresh.m.clear();
  fresh.v.clear();
  save_train_state(p, fresh);
  const TrainState f = load_train_state(p);
  EXPECT_TRUE(f.m.empty());
  EXPECT_EQ(f.params, s.params);
}

TEST_F(Files, TrainStateDetectsCorruption) {
  const std::string p = path("state.bin");
  save_train_state(p, sample_state());
  const std::vector<uint8_t> bytes = read_file_bytes(p);

  std::vector<uint8_t> b = bytes;
  b[112 + 4 * 100 + 2] ^= 0x10;  // one bit of params[100]
  const std::string flipped = path("flipped.bin");
  write_bytes(flipped, b);
  expect_error([&] { load_train_state(flipped); }, {flipped, "checksum mismatch"});

  b = bytes;
  b[b.size() - 20] ^= 1;  // inside extra_json
  write_bytes(flipped, b);
  expect_error([&] { load_train_state(flipped); }, {flipped, "checksum mismatch"});

  const std::string truncated = path("truncated.bin");
  write_bytes(truncated, std::vector<uint8_t>(bytes.begin(), bytes.end() - 10));
  expect_error([&] { load_train_state(truncated); }, {truncated, "truncated"});
  write_bytes(truncated, std::vector<uint8_t>(bytes.begin(), bytes.begin() + 50));
  expect_error([&] { load_train_state(truncated); }, {truncated, "truncated"});

  // A length field claiming far more than the file holds: rejected before allocating.
  b = bytes;
  const uint64_t huge = uint64_t{1} << 62;
  std::memcpy(b.data() + 104, &huge, 8);  // extra_json length
  const std::string lengths = path("lengths.bin");
  write_bytes(lengths, b);
  expect_error([&] { load_train_state(lengths); }, {lengths, "truncated or corrupt"});

  b = bytes;
  b[0] = 'X';
  const std::string magic = path("magic.bin");
  write_bytes(magic, b);
  expect_error([&] { load_train_state(magic); }, {magic, "magic"});
  expect_error([&] { load_train_state(path("missing.bin")); }, {path("missing.bin")});
}

TEST_F(Files, SaveTrainStateRefusesNonFinite) {
  const std::string p = path("state.bin");
  const TrainState good = sample_state();
  save_train_state(p, good);
  const std::vector<uint8_t> before = read_file_bytes(p);

  TrainState bad = good;
  const size_t qkvw = param_offsets(bad.config)[4];
  bad.params[qkvw + 5] = std::nanf("");
  expect_error([&] { save_train_state(p, bad); },
               {p, "params[" + std::to_string(qkvw + 5) + "]", "qkvw[5]"});
  bad = good;
  bad.v[7] = INFINITY;
  expect_error([&] { save_train_state(p, bad); }, {p, "v[7]", "wte[7]"});
  bad = good;
  bad.m.resize(10);
  expect_error([&] { save_train_state(p, bad); }, {p, "m=10"});

  EXPECT_EQ(read_file_bytes(p), before);
  EXPECT_EQ(list_dir(dir_), std::vector<std::string>{"state.bin"});
}

// ---------------------------------------------------------------- prepare

TEST_F(Files, PrepareCorpus) {
  const std::string in = path("corpus");
  std::filesystem::create_directories(in + "/sub");
  // A fortune file: entries separated by "%" lines, with its binary index beside it.
  std::string fortunes;
  std::vector<std::string> entries;
  for (int i = 0; i < 60; i++) {
    entries.push_back(sample_text(40, 100 + i) + "\n");
    fortunes += entries.back() + "%\n";
  }
  write_text(in + "/quotes", fortunes);
  write_bytes(in + "/quotes.dat", {0, 0, 0, 2, 1, 7, 0, 0, 'x'});
  const std::string plain = sample_text(3000, 9);
  write_text(in + "/sub/book.txt", plain);
  write_bytes(in + "/sub/blob.bin", {'B', 'I', 'N', 0, 'Z', 'Z', 'Z'});
  write_text(in + "/sub/empty.txt", "  \n\n");

  const std::string out = path("out");
  const PrepareResult r = prepare_corpus({in}, out, 300, 0.1, 4096);
  EXPECT_EQ(r.vocab_size, 300);
  EXPECT_EQ(r.documents, 61);
  EXPECT_EQ(r.tokenizer_path, out + "/tokenizer.bin");
  EXPECT_GT(r.val_tokens, 0);
  EXPECT_GT(r.train_tokens, 4 * r.val_tokens);

  const Tokenizer tok = Tokenizer::load(r.tokenizer_path);
  std::vector<int> all;
  int64_t train_tokens = 0, val_tokens = 0;
  const std::vector<std::string> train_files = expand_glob(r.train_pattern);
  EXPECT_GT(train_files.size(), 1u);  // 4096-token shards
  for (const std::string& f : train_files) {
    const std::vector<uint16_t> t = read_shard(f);
    EXPECT_LE(t.size(), 4096u);
    train_tokens += static_cast<int64_t>(t.size());
    all.insert(all.end(), t.begin(), t.end());
  }
  for (const std::string& f : expand_glob(r.val_pattern)) {
    const std::vector<uint16_t> t = read_shard(f);
    val_tokens += static_cast<int64_t>(t.size());
    all.insert(all.end(), t.begin(), t.end());
  }
  EXPECT_EQ(train_tokens, r.train_tokens);
  EXPECT_EQ(val_tokens, r.val_tokens);

  // Every document comes back whole, each followed by eot; nothing of the binary file.
  std::vector<std::string> docs;
  std::vector<int> cur;
  for (int id : all) {
    if (id == tok.eot_token()) {
      docs.push_back(tok.decode(cur));
      cur.clear();
    } else {
      cur.push_back(id);
    }
  }
  EXPECT_TRUE(cur.empty());
  ASSERT_EQ(docs.size(), 61u);
  std::multiset<std::string> want(entries.begin(), entries.end()), got(docs.begin(), docs.end());
  want.insert(plain);
  EXPECT_EQ(got, want);

  // The shards feed the loader; a second run gives the same bytes.
  DataLoader dl(r.train_pattern, 2, 16, r.vocab_size, true, 1);
  std::vector<int> x(32), y(32);
  dl.next_batch(x.data(), y.data());
  const std::vector<uint8_t> first = read_file_bytes(train_files[0]);
  prepare_corpus({in}, out, 300, 0.1, 4096);
  EXPECT_EQ(read_file_bytes(train_files[0]), first);

  // A larger shard limit: the old extra shards are gone.
  prepare_corpus({in}, out, 300, 0.1);
  EXPECT_EQ(expand_glob(r.train_pattern), std::vector<std::string>{out + "/train_000.bin"});
}

TEST_F(Files, PrepareErrors) {
  const std::string empty = path("empty");
  std::filesystem::create_directories(empty);
  write_bytes(empty + "/blob", {1, 0, 2});
  expect_error([&] { prepare_corpus({empty}, path("out"), 300, 0.1); }, {empty, "no text"});
  expect_error([&] { prepare_corpus({path("nope")}, path("out"), 300, 0.1); }, {path("nope")});
}

}  // namespace
}  // namespace remat
