// Hugging Face tokenizer.json (io/hf_tokenizer.h): ids and decodes against the `tokenizers`
// library (tests/tokenizer/make_tokenizers.py trains the reference tokenizers and writes what
// tokenizers gives; skipped without python3 or tokenizers), hand-made files for merges by rank,
// ignore_merges and every malformed-file error, uint32 shards (io/shards.h), `remat tokenize`,
// `remat prepare --tokenizer` (BOS or end-of-text per document; uint16 and uint32 shards) and
// `remat sample --tokenizer tokenizer.json`.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "io/atomic_file.h"
#include "io/hf_tokenizer.h"
#include "io/llmc_model.h"
#include "io/prepare.h"
#include "io/shards.h"
#include "tests/test_util.h"

namespace remat {
namespace {

using json = nlohmann::json;
using test::contains;
using test::Result;
using test::slurp;
using test::TempDir;

void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "message lacks '" << p << "': " << msg;
    EXPECT_EQ(msg.find(".cpp:"), std::string::npos) << "a source location: " << msg;
    return;
  }
  ADD_FAILURE() << "no remat::Error thrown; expected one naming " << parts[0];
}

// Expects a clean failure of the program: exit 1 and every `what` on stderr.
void expect_cli_error(const Result& r, const std::vector<std::string>& what) {
  ASSERT_TRUE(r.exited()) << r.describe();
  EXPECT_EQ(r.code(), 1) << r.describe();
  for (const std::string& w : what)
    EXPECT_TRUE(contains(r.err, w)) << "missing '" << w << "'\n" << r.describe();
  EXPECT_FALSE(contains(r.err, ".cpp:") || contains(r.err, REMAT_SOURCE_DIR)) << r.describe();
}

void write_text(const std::string& path, const std::string& text) {
  write_file_atomic(path, text.data(), text.size());
}

// GPT-2's byte-to-unicode map, written out for the hand-made files.
std::string byte_char(int b) {
  static std::vector<std::string> chars = [] {
    std::vector<std::string> c(256);
    int next = 256;
    for (int x = 0; x < 256; x++) {
      const bool printable = (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE;
      const int cp = printable ? x : next++;
      std::string s;
      if (cp < 0x80) {
        s += static_cast<char>(cp);
      } else {
        s += static_cast<char>(0xC0 | (cp >> 6));
        s += static_cast<char>(0x80 | (cp & 0x3F));
      }
      c[x] = s;
    }
    return c;
  }();
  return chars[b];
}

// A byte-level BPE tokenizer.json: the 256 byte tokens (ids 0..255), then `extra` tokens with
// their ids, the merges as pairs, ByteLevel pre-tokenizer (GPT-2's regex) and decoder.
json byte_level_file(const std::vector<std::pair<std::string, int>>& extra,
                     const std::vector<std::pair<std::string, std::string>>& merges) {
  json vocab = json::object();
  for (int b = 0; b < 256; b++) vocab[byte_char(b)] = b;
  for (const auto& [t, id] : extra) vocab[t] = id;
  json m = json::array();
  for (const auto& [a, b] : merges) m.push_back({a, b});
  return {
      {"version", "1.0"},
      {"added_tokens", json::array()},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", m}}}};
}

HfTokenizer parse(const json& j, const std::string& name = "test.json") {
  return HfTokenizer::parse(j.dump(), name);
}

// ---- without Python: hand-made files ----

TEST(HfTokenizer, MergesApplyLowestRankFirstWhateverTheirPosition) {
  // "abc": with (b c) ranked before (a b) the word is a + bc; the other way round ab + c.
  const std::vector<std::pair<std::string, int>> extra = {{"ab", 300}, {"bc", 301}};
  const HfTokenizer bc_first = parse(byte_level_file(extra, {{"b", "c"}, {"a", "b"}}));
  EXPECT_EQ(bc_first.encode("abc"), (std::vector<int>{'a', 301}));
  const HfTokenizer ab_first = parse(byte_level_file(extra, {{"a", "b"}, {"b", "c"}}));
  EXPECT_EQ(ab_first.encode("abc"), (std::vector<int>{300, 'c'}));
  // Equal ranks go left to right: "aaa" with (a a) is aa + a.
  const HfTokenizer aa = parse(byte_level_file({{"aa", 300}}, {{"a", "a"}}));
  EXPECT_EQ(aa.encode("aaa"), (std::vector<int>{300, 'a'}));
  EXPECT_EQ(aa.encode("aaaa"), (std::vector<int>{300, 300}));
  // A space is byte 32, written U+0120 in the vocab, and GPT-2's regex keeps it on the word.
  const HfTokenizer sp =
      parse(byte_level_file({{byte_char(' ') + "a", 300}}, {{byte_char(' '), "a"}}));
  EXPECT_EQ(sp.encode("a a"), (std::vector<int>{'a', 300}));
  EXPECT_EQ(sp.vocab_size(), 301);
  EXPECT_EQ(sp.decode({'a', 300}), "a a");
}

TEST(HfTokenizer, IgnoreMergesMapsAWordInTheVocabDirectly) {
  json j = byte_level_file({{"ab", 300}, {"abc", 301}}, {{"a", "b"}});
  EXPECT_EQ(parse(j).encode("abc"), (std::vector<int>{300, 'c'}));
  j["model"]["ignore_merges"] = true;
  EXPECT_EQ(parse(j).encode("abc"), (std::vector<int>{301}));
  EXPECT_EQ(parse(j).encode("abcab"), (std::vector<int>{300, 'c', 300}));  // not in the vocab
}

TEST(HfTokenizer, LegacyStringMergesEqualPairMerges) {
  json pairs = byte_level_file({{"ab", 300}, {"abc", 301}}, {{"a", "b"}, {"ab", "c"}});
  json strings = pairs;
  strings["model"]["merges"] = {"#version: 0.2", "a b", "ab c"};
  for (const std::string text : {"abc abcab", "cab", ""})
    EXPECT_EQ(parse(pairs).encode(text), parse(strings).encode(text)) << text;
  EXPECT_EQ(parse(strings).encode("abc"), (std::vector<int>{301}));
}

TEST(HfTokenizer, AddedTokensAreMatchedLiterallyWithTheirIds) {
  json j = byte_level_file({{"<|endoftext|>", 256}}, {});
  j["added_tokens"] = {
      {{"id", 256}, {"content", "<|endoftext|>"}, {"special", true}, {"normalized", false}},
      {{"id", 257}, {"content", "<|end"}, {"special", false}}};
  const HfTokenizer t = parse(j);
  EXPECT_EQ(t.encode("a<|endoftext|>b"), (std::vector<int>{'a', 256, 'b'}));
  EXPECT_EQ(t.encode("<|endoft"), (std::vector<int>{257, 'o', 'f', 't'}));  // longest first
  EXPECT_EQ(t.eot_token(), 256);
  EXPECT_EQ(t.bos_token(), -1);
  EXPECT_EQ(t.vocab_size(), 258);
  EXPECT_TRUE(t.is_special(256));
  EXPECT_FALSE(t.is_special(257));
  EXPECT_EQ(t.decode({'a', 256, 'b'}), "a<|endoftext|>b");
  EXPECT_EQ(t.decode({'a', 256, 'b'}, /*skip_special_tokens=*/true), "ab");
  EXPECT_EQ(t.token_id("<|endoftext|>"), 256);
  EXPECT_EQ(t.token_id("nope"), -1);
}

TEST(HfTokenizer, EncodeIsSafeFromSeveralThreads) {
  const HfTokenizer t = parse(byte_level_file({{"ab", 300}}, {{"a", "b"}}));
  const std::string text = "ab abab ba a b  ab\n\tab";
  const std::vector<int> want = t.encode(text);
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int k = 0; k < 4; k++)
    threads.emplace_back([&, k] {
      for (int i = 0; i < 200; i++) ok[k] += t.encode(text) == want;
    });
  for (auto& th : threads) th.join();
  for (int k = 0; k < 4; k++) EXPECT_EQ(ok[k], 200);
}

TEST(HfTokenizer, Utf8CheckAndReplacement) {
  EXPECT_EQ(find_invalid_utf8("plain caf\xc3\xa9 \xe6\x9d\xb1 \xf0\x9f\x98\x80"),
            std::string::npos);
  EXPECT_EQ(find_invalid_utf8("ab\xff"), 2u);
  EXPECT_EQ(find_invalid_utf8("\xc0\xaf"), 0u);          // overlong
  EXPECT_EQ(find_invalid_utf8("x\xed\xa0\x80"), 1u);     // a surrogate
  EXPECT_EQ(find_invalid_utf8("\xf4\x90\x80\x80"), 0u);  // past U+10FFFF
  const std::string fffd = "\xef\xbf\xbd";
  EXPECT_EQ(to_valid_utf8("a\xff"
                          "b"),
            "a" + fffd + "b");
  EXPECT_EQ(to_valid_utf8("\xe2\x82"), fffd);  // one maximal subpart
  EXPECT_EQ(to_valid_utf8("\xe2\x82"
                          "a"),
            fffd + "a");
  EXPECT_EQ(to_valid_utf8("\xed\xa0\x80"), fffd + fffd + fffd);  // each byte
  EXPECT_EQ(to_valid_utf8("\xf0\x9f\x98"), fffd);
}

TEST(HfTokenizer, DecodeAndTokenRefuseIdsOutsideTheVocabulary) {
  const HfTokenizer t = parse(byte_level_file({{"ab", 300}}, {{"a", "b"}}), "gap.json");
  EXPECT_EQ(t.vocab_size(), 301);
  expect_error(
      [&] {
        t.decode({'a', 301});
      },
      {"gap.json", "301", "past the vocabulary", "301 ids"});
  expect_error([&] { t.decode({-1}); }, {"gap.json", "-1", "301 ids"});
  expect_error([&] { t.token(299); }, {"gap.json", "299", "has no token"});
  EXPECT_EQ(t.token(300), "ab");
}

TEST(HfTokenizer, EncodeRefusesTextThatIsNotUtf8) {
  const HfTokenizer t = parse(byte_level_file({}, {}), "t.json");
  expect_error([&] { t.encode("ok\xff"); }, {"t.json", "not UTF-8", "byte 2"});
}

TEST(HfTokenizer, MalformedFilesAreErrorsNamingTheFileAndTheProblem) {
  const json good = byte_level_file({{"ab", 300}}, {{"a", "b"}});
  auto with = [&](const std::function<void(json&)>& change) {
    json j = good;
    change(j);
    return j.dump();
  };
  auto refuse = [](const std::string& text, const std::vector<std::string>& parts) {
    std::vector<std::string> all = {"bad.json"};
    all.insert(all.end(), parts.begin(), parts.end());
    expect_error([&] { HfTokenizer::parse(text, "bad.json"); }, all);
  };
  refuse("{\"model\": ", {"not JSON"});
  refuse("[1, 2]", {"not a tokenizer.json"});
  refuse("{}", {"no \"model\""});
  refuse(with([](json& j) { j["model"]["type"] = "WordPiece"; }), {"WordPiece", "BPE"});
  refuse(with([](json& j) {
           j["model"]["merges"] = json::array({json::array({"a", "zz"})});
         }),
         {"model.merges[0]", "\"zz\"", "not in model.vocab"});
  refuse(with([](json& j) {
           j["model"]["merges"] = {"a b", "q zz"};
         }),
         {"model.merges[1]", "\"zz\""});
  refuse(with([](json& j) {
           j["model"]["merges"] = json::array({json::array({"b", "a"})});
         }),
         {"\"ba\"", "not in model.vocab"});
  refuse(with([](json& j) { j["model"]["merges"] = {"a b c"}; }), {"model.merges[0]", "one space"});
  refuse(with([](json& j) { j["model"].erase("merges"); }), {"model.merges"});
  refuse(with([](json& j) { j["model"]["vocab"] = json::array(); }), {"model.vocab"});
  refuse(with([](json& j) { j["model"]["vocab"]["dup"] = 300; }), {"id 300", "\"ab\"", "\"dup\""});
  refuse(with([](json& j) { j["model"]["vocab"]["neg"] = -4; }), {"model.vocab[\"neg\"]", "-4"});
  refuse(with([](json& j) { j["model"]["dropout"] = 0.1; }), {"model.dropout"});
  refuse(with([](json& j) { j["model"]["byte_fallback"] = true; }), {"byte_fallback"});
  refuse(with([](json& j) { j["model"]["continuing_subword_prefix"] = "##"; }),
         {"continuing_subword_prefix"});
  refuse(with([](json& j) { j["model"]["unk_token"] = "<unk>"; }), {"unk_token", "<unk>"});
  refuse(with([](json& j) {
           j["pre_tokenizer"] = {{"type", "Split"},
                                 {"pattern", {{"Regex", "(ab"}}},
                                 {"behavior", "Isolated"},
                                 {"invert", false}};
         }),
         {"pre_tokenizer.pattern.Regex", "PCRE2 refuses", "(ab", "missing closing parenthesis",
          "offset 3"});
  refuse(with([](json& j) {
           j["pre_tokenizer"] = {
               {"type", "Sequence"},
               {"pretokenizers",
                {{{"type", "Split"}, {"pattern", {{"Regex", "a"}}}, {"behavior", "Sideways"}}}}};
         }),
         {"pre_tokenizer.pretokenizers[0].behavior", "Sideways"});
  refuse(with([](json& j) {
           j["pre_tokenizer"] = {{"type", "Whitespace"}};
         }),
         {"pre_tokenizer", "Whitespace", "not supported"});
  refuse(with([](json& j) {
           j["normalizer"] = {{"type", "Lowercase"}};
         }),
         {"normalizer", "Lowercase"});
  refuse(with([](json& j) { j["decoder"] = {{"type", "WordPiece"}}; }), {"decoder", "WordPiece"});
  refuse(with([](json& j) { j["version"] = "2.0"; }), {"version", "2.0"});
  refuse(with([](json& j) {
           j["added_tokens"] = {{{"id", 5}, {"content", "<x>"}, {"special", true}}};
         }),
         {"added_tokens[0]", "<x>", "id 5", "id 257"});  // 257 tokens in the vocab
  refuse(with([](json& j) {
           j["added_tokens"] = {{{"content", "<x>"}}};
         }),
         {"added_tokens[0]", "no id"});
  refuse(with([](json& j) { j["pre_tokenizer"]["add_prefix_space"] = "yes"; }),
         {"pre_tokenizer.add_prefix_space"});
  refuse(with([](json& j) {
           j["post_processor"] = {{"type", "TemplateProcessing"},
                                  {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}}},
                                  {"special_tokens", json::object()}};
         }),
         {"post_processor.special_tokens", "<s>"});
  expect_error([] { HfTokenizer::load("/nonexistent/tokenizer.json"); },
               {"/nonexistent/tokenizer.json"});
}

TEST(HfTokenizer, BosComesFromATemplateProcessingAloneOrInASequence) {
  json j = byte_level_file({{"<s>", 256}}, {});
  j["added_tokens"] = {{{"id", 256}, {"content", "<s>"}, {"special", true}}};
  const json tp = {
      {"type", "TemplateProcessing"},
      {"single",
       {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {256}}, {"tokens", {"<s>"}}}}}}};
  j["post_processor"] = tp;
  EXPECT_EQ(parse(j).bos_token(), 256);
  j["post_processor"] = {{"type", "Sequence"}, {"processors", {{{"type", "ByteLevel"}}, tp}}};
  EXPECT_EQ(parse(j).bos_token(), 256);
  EXPECT_EQ(parse(j).eot_token(), -1);
  EXPECT_EQ(parse(j).encode("x"), (std::vector<int>{'x'}));  // encode() adds no BOS
}

// ---- uint32 shards ----

TEST(HfTokenizer, Uint32ShardsRoundTripAndTheLoaderReadsThemBesideUint16Ones) {
  TempDir dir("remat_hf_shard");
  std::vector<uint32_t> wide(400);
  for (size_t i = 0; i < wide.size(); i++) wide[i] = static_cast<uint32_t>(65530 + (i * 7) % 40);
  write_shard_u32(dir / "a_000.bin", wide.data(), wide.size());
  const std::vector<uint8_t> bytes = read_file_bytes(dir / "a_000.bin");
  ASSERT_EQ(bytes.size(), 1024 + 4 * wide.size());
  int32_t h[3];
  std::memcpy(h, bytes.data(), sizeof h);
  EXPECT_EQ(h[0], 20240801);
  EXPECT_EQ(h[1], 7);
  EXPECT_EQ(h[2], 400);
  EXPECT_EQ(read_shard_u32(dir / "a_000.bin"), wide);
  expect_error([&] { read_shard(dir / "a_000.bin"); },
               {dir / "a_000.bin", "uint32", "read_shard_u32"});

  std::vector<uint16_t> narrow(300, 7);
  write_shard(dir / "a_001.bin", narrow.data(), narrow.size());
  EXPECT_EQ(read_shard_u32(dir / "a_001.bin"), std::vector<uint32_t>(300, 7));
  DataLoader dl(dir / "a_*.bin", 2, 8, 65570, false, 1);
  std::vector<int> in(16), tg(16);
  dl.next_batch(in.data(), tg.data());
  for (int i = 0; i < 16; i++) EXPECT_EQ(in[i], static_cast<int>(wide[i]));
  expect_error([&] { DataLoader(dir / "a_000.bin", 2, 8, 65536, false, 1); },
               {dir / "a_000.bin", "65536"});

  // Magic and version must go together.
  std::vector<uint8_t> mixed = bytes;
  mixed[4] = 1;
  write_file_atomic(dir / "mixed.bin", mixed.data(), mixed.size());
  expect_error([&] { read_shard_u32(dir / "mixed.bin"); },
               {dir / "mixed.bin", "version 1", "20240801"});
}

// A tokenizer with ids past 16 bits: the byte tokens, merges whose tokens have ids above
// 65535, and <|endoftext|> as id 70000.
json wide_tokenizer() {
  const std::string sp = byte_char(' ');
  json j = byte_level_file(
      {{"he", 65600}, {"the", 65601}, {sp + "the", 65602}, {"<|endoftext|>", 70000}},
      {{"h", "e"}, {"t", "he"}, {sp, "the"}});
  j["added_tokens"] = {
      {{"id", 70000}, {"content", "<|endoftext|>"}, {"special", true}, {"normalized", false}}};
  return j;
}

TEST(HfTokenizer, PrepareWritesUint32ShardsForAVocabularyPast16Bits) {
  TempDir dir("remat_hf_prep32");
  write_text(dir / "tok.json", wide_tokenizer().dump());
  std::filesystem::create_directories(dir / "docs");
  std::vector<std::string> docs;
  for (int i = 0; i < 12; i++) {
    docs.push_back("the cat and the hat, number " + std::to_string(i) + " of the set\n");
    write_text(dir / ("docs/d" + std::to_string(100 + i) + ".txt"), docs.back());
  }
  const PrepareResult r = prepare_corpus_hf({dir / "docs"}, dir / "out", dir / "tok.json", 0.25);
  EXPECT_TRUE(r.uint32_tokens);
  EXPECT_EQ(r.vocab_size, 70001);
  EXPECT_EQ(r.documents, 12);
  EXPECT_EQ(r.tokenizer_path, dir / "out/tokenizer.json");
  EXPECT_EQ(slurp(r.tokenizer_path), slurp(dir / "tok.json"));
  const HfTokenizer tok = HfTokenizer::load(dir / "tok.json");
  std::vector<uint32_t> all;
  for (const std::string& pat : {r.train_pattern, r.val_pattern})
    for (const std::string& f : expand_glob(pat)) {
      const std::vector<uint32_t> t = read_shard_u32(f);
      all.insert(all.end(), t.begin(), t.end());
    }
  EXPECT_EQ(static_cast<int64_t>(all.size()), r.train_tokens + r.val_tokens);
  // Every document, then end-of-text (no BOS in this tokenizer).
  std::vector<std::string> got;
  std::vector<int> cur;
  bool wide_seen = false;
  for (uint32_t t : all) {
    wide_seen |= t > 65535 && t != 70000;
    if (t == 70000) {
      got.push_back(tok.decode(cur));
      cur.clear();
    } else {
      cur.push_back(static_cast<int>(t));
    }
  }
  EXPECT_TRUE(cur.empty());
  EXPECT_TRUE(wide_seen);
  std::sort(got.begin(), got.end());
  std::sort(docs.begin(), docs.end());
  EXPECT_EQ(got, docs);

  // The same through the command line.
  const Result c = test::run_remat(
      {"prepare", "--tokenizer", dir / "tok.json", "--out", dir / "out2", dir / "docs"},
      dir / "prep");
  EXPECT_EQ(c.code(), 0) << c.describe();
  EXPECT_TRUE(contains(c.out, "vocab 70001, uint32 shards")) << c.describe();
  expect_cli_error(test::run_remat({"prepare", "--tokenizer", dir / "tok.json", "--vocab", "600",
                                    "--out", dir / "out3", dir / "docs"},
                                   dir / "prep_vocab"),
                   {"--vocab", "--tokenizer"});
}

TEST(HfTokenizer, PrepareRefusesATokenizerWithoutADocumentSeparator) {
  TempDir dir("remat_hf_nosep");
  write_text(dir / "tok.json", byte_level_file({}, {}).dump());
  write_text(dir / "doc.txt", "some text\n");
  expect_error([&] { prepare_corpus_hf({dir / "doc.txt"}, dir / "out", dir / "tok.json", 0.1); },
               {dir / "tok.json", "BOS", "end-of-text"});
}

// ---- `remat tokenize` without Python ----

// Runs REMAT_BINARY with `args` and standard input from `stdin_path`.
Result run_with_stdin(const std::vector<std::string>& args, const std::string& stdin_path,
                      const std::string& base) {
  std::vector<std::string> full = {REMAT_BINARY};
  full.insert(full.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : full) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string out = base + ".out", err = base + ".err";
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int fi = ::open(stdin_path.c_str(), O_RDONLY);
    const int fo = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int fe = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fi < 0 || fo < 0 || fe < 0) ::_exit(126);
    ::dup2(fi, 0);
    ::dup2(fo, 1);
    ::dup2(fe, 2);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  test::Child c;
  c.pid = pid;
  c.out = out;
  c.err = err;
  return test::result_of(c, test::wait_child(c, 120));
}

TEST(HfTokenizer, TokenizeCommandChecksItsInputs) {
  TempDir dir("remat_hf_cli");
  write_text(dir / "tok.json", wide_tokenizer().dump());
  write_text(dir / "text.txt", "the he<|endoftext|>");
  const Result ok =
      test::run_remat({"tokenize", "--tokenizer", dir / "tok.json", dir / "text.txt"}, dir / "ok");
  EXPECT_EQ(ok.code(), 0) << ok.describe();
  EXPECT_EQ(ok.out, "65601 32 65600 70000\n");
  const Result in =
      run_with_stdin({"tokenize", "--tokenizer", dir / "tok.json"}, dir / "text.txt", dir / "in");
  EXPECT_EQ(in.out, "65601 32 65600 70000\n") << in.describe();
  const Result dash = run_with_stdin({"tokenize", "--tokenizer", dir / "tok.json", "-"},
                                     dir / "text.txt", dir / "dash");
  EXPECT_EQ(dash.out, "65601 32 65600 70000\n") << dash.describe();
  write_text(dir / "empty.txt", "");
  EXPECT_EQ(
      test::run_remat({"tokenize", "--tokenizer", dir / "tok.json", dir / "empty.txt"}, dir / "e")
          .out,
      "\n");

  const Result help = test::run_remat({"tokenize", "--help"}, dir / "help");
  EXPECT_EQ(help.code(), 0) << help.describe();
  EXPECT_TRUE(contains(help.out, "usage: remat tokenize") && contains(help.out, "--tokenizer"))
      << help.describe();
  EXPECT_TRUE(contains(test::run_remat({"--help"}, dir / "top").out, "tokenize"));

  expect_cli_error(test::run_remat({"tokenize", dir / "text.txt"}, dir / "no_tok"),
                   {"--tokenizer"});
  expect_cli_error(
      test::run_remat({"tokenize", "--tokenizer", dir / "tok.json", dir / "missing.txt"},
                      dir / "missing"),
      {dir / "missing.txt"});
  write_text(dir / "latin1.txt", "caf\xe9");
  expect_cli_error(
      test::run_remat({"tokenize", "--tokenizer", dir / "tok.json", dir / "latin1.txt"},
                      dir / "latin1"),
      {dir / "latin1.txt", "not UTF-8", "byte 3"});
  write_text(dir / "broken.json", "{\"model\": {\"type\": \"BPE\"");
  expect_cli_error(
      test::run_remat({"tokenize", "--tokenizer", dir / "broken.json", dir / "text.txt"},
                      dir / "broken"),
      {dir / "broken.json", "not JSON"});
  expect_cli_error(
      test::run_remat({"tokenize", "--tokenizer", dir / "tok.json", dir / "text.txt", "x"},
                      dir / "two"),
      {"'x'"});
}

// ---- against Hugging Face `tokenizers` ----

// Runs make_tokenizers.py once into a directory shared by the tests below.
class HfTokenizerReference : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = test::make_temp_dir("remat_hf_ref");
    const std::string log = dir_ + "/make_tokenizers.log";
    const pid_t pid = ::fork();
    if (pid == 0) {
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) ::dup2(fd, 1), ::dup2(fd, 2);
      const std::string script =
          std::string(REMAT_SOURCE_DIR) + "/tests/tokenizer/make_tokenizers.py";
      ::execlp("python3", "python3", script.c_str(), dir_.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (code == 127)
      skip_ = "python3 not found: the comparison with Hugging Face tokenizers is skipped";
    else if (code == 77)
      skip_ =
          "the Python package `tokenizers` is not installed (scripts/setup.sh installs it): "
          "the comparison with Hugging Face tokenizers is skipped";
    else if (code != 0)
      failure_ = "make_tokenizers.py failed (exit " + std::to_string(code) + "):\n" + slurp(log);
    else
      cases_ = json::parse(slurp(dir_ + "/cases.json"));
  }
  static void TearDownTestSuite() { test::remove_temp_dir(dir_); }
  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
    ASSERT_TRUE(failure_.empty()) << failure_;
  }
  static std::string path(const std::string& name) { return dir_ + "/" + name; }
  static const HfTokenizer& tokenizer(const std::string& name) {
    static std::map<std::string, HfTokenizer> loaded;
    auto it = loaded.find(name);
    if (it == loaded.end())
      it = loaded.emplace(name, HfTokenizer::load(path(name + "/tokenizer.json"))).first;
    return it->second;
  }

  static std::string dir_, skip_, failure_;
  static json cases_;
};
std::string HfTokenizerReference::dir_, HfTokenizerReference::skip_, HfTokenizerReference::failure_;
json HfTokenizerReference::cases_;

TEST_F(HfTokenizerReference, EncodeAndDecodeGiveWhatTokenizersGives) {
  int n = 0;
  for (const json& c : cases_["encode"]) {
    const std::string name = c["tokenizer"], text = c["text"];
    const HfTokenizer& t = tokenizer(name);
    const std::vector<int> want = c["ids"].get<std::vector<int>>();
    const std::vector<int> got = t.encode(text);
    EXPECT_EQ(got, want) << name << ": " << json(text).dump();
    EXPECT_EQ(t.decode(want), c["decoded"].get<std::string>()) << name << ": " << json(text).dump();
    EXPECT_EQ(t.decode(want, true), c["decoded_skip"].get<std::string>())
        << name << ": " << json(text).dump();
    // Without add_prefix_space or missing characters, decode gives the text back.
    if (name.rfind("crafted", 0) != 0) {
      EXPECT_EQ(t.decode(got), text) << name;
    }
    n++;
  }
  EXPECT_GE(n, 150);
}

TEST_F(HfTokenizerReference, CharactersCutBetweenTokensDecodeAsTokenizersDoes) {
  int n = 0;
  for (const json& c : cases_["decode"]) {
    const HfTokenizer& t = tokenizer(c["tokenizer"]);
    const std::vector<int> ids = c["ids"].get<std::vector<int>>();
    EXPECT_EQ(t.decode(ids), c["decoded"].get<std::string>()) << json(ids).dump();
    n++;
  }
  EXPECT_GE(n, 20);
}

TEST_F(HfTokenizerReference, NamedTokensAndVocabularySizesAgree) {
  for (const auto& [name, v] : cases_["named"].items()) {
    EXPECT_EQ(tokenizer(name).bos_token(), v["bos"].get<int>()) << name;
    EXPECT_EQ(tokenizer(name).eot_token(), v["eot"].get<int>()) << name;
  }
  for (const auto& [name, v] : cases_["vocab_size"].items())
    EXPECT_EQ(tokenizer(name).vocab_size(), v.get<int>()) << name;
  EXPECT_TRUE(tokenizer("qwen2").nfc_normalizer());
  EXPECT_FALSE(tokenizer("gpt2").nfc_normalizer());
}

TEST_F(HfTokenizerReference, TokenizeCommandPrintsTheIds) {
  for (const json& c : cases_["encode"]) {
    if (c["tokenizer"] != "llama3") continue;
    const std::string text = c["text"];
    write_text(path("cli.txt"), text);
    const Result r = test::run_remat(
        {"tokenize", "--tokenizer", path("llama3/tokenizer.json"), path("cli.txt")}, path("cli"));
    ASSERT_EQ(r.code(), 0) << r.describe();
    std::string want;
    for (int id : c["ids"]) want += (want.empty() ? "" : " ") + std::to_string(id);
    EXPECT_EQ(r.out, want + "\n") << json(text).dump();
  }
  const Result in = run_with_stdin({"tokenize", "--tokenizer", path("gpt2/tokenizer.json")},
                                   path("corpus.txt"), path("stdin"));
  ASSERT_EQ(in.code(), 0) << in.describe();
  std::string want;
  for (int id : tokenizer("gpt2").encode(slurp(path("corpus.txt"))))
    want += (want.empty() ? "" : " ") + std::to_string(id);
  EXPECT_TRUE(in.out == want + "\n") << "remat tokenize of the corpus from standard input differs";
}

// Documents as files, prepared with `name`; returns the shard tokens (train then val).
std::vector<uint32_t> prepare_docs(const std::string& root, const std::string& tokenizer_json,
                                   const std::vector<std::string>& docs, const std::string& out) {
  std::filesystem::create_directories(root + "/docs");
  for (size_t i = 0; i < docs.size(); i++)
    write_text(root + "/docs/d" + std::to_string(100 + i), docs[i]);
  const Result r = test::run_remat(
      {"prepare", "--tokenizer", tokenizer_json, "--out", out, root + "/docs"}, out + "_run");
  EXPECT_EQ(r.code(), 0) << r.describe();
  EXPECT_FALSE(contains(r.out, "uint32")) << r.describe();
  std::vector<uint32_t> all;
  for (const std::string& pat : {out + "/train_*.bin", out + "/val_*.bin"})
    for (const std::string& f : expand_glob(pat)) {
      const std::vector<uint16_t> t = read_shard(f);  // version 1: the vocabulary fits 16 bits
      all.insert(all.end(), t.begin(), t.end());
    }
  return all;
}

TEST_F(HfTokenizerReference, PrepareMarksEachDocumentAsTheTokenizerNamesIt) {
  std::vector<std::string> docs;
  for (int i = 0; i < 10; i++)
    docs.push_back("Document " + std::to_string(i) +
                   ": caf\xc3\xa9, \xe6\x9d\xb1\xe4\xba\xac and it's " + std::string(i, '!') +
                   "\n");
  // Llama-3 style: <|begin_of_text|> before each document.
  const HfTokenizer& llama = tokenizer("llama3");
  std::vector<uint32_t> t =
      prepare_docs(path("prep_llama"), path("llama3/tokenizer.json"), docs, path("out_llama"));
  ASSERT_FALSE(t.empty());
  EXPECT_EQ(static_cast<int>(t[0]), llama.bos_token());
  std::vector<std::string> got;
  std::vector<int> cur;
  for (size_t i = 1; i <= t.size(); i++) {
    if (i == t.size() || static_cast<int>(t[i]) == llama.bos_token()) {
      got.push_back(llama.decode(cur));
      cur.clear();
    } else {
      cur.push_back(static_cast<int>(t[i]));
    }
  }
  std::vector<std::string> want = docs;
  std::sort(got.begin(), got.end());
  std::sort(want.begin(), want.end());
  EXPECT_EQ(got, want);
  EXPECT_TRUE(std::filesystem::exists(path("out_llama/tokenizer.json")));

  // GPT-2 style: <|endoftext|> after each document; an older tokenizer.bin is removed.
  const HfTokenizer& gpt2 = tokenizer("gpt2");
  std::filesystem::create_directories(path("out_gpt2"));
  write_text(path("out_gpt2/tokenizer.bin"), "stale");
  t = prepare_docs(path("prep_gpt2"), path("gpt2/tokenizer.json"), docs, path("out_gpt2"));
  ASSERT_FALSE(t.empty());
  EXPECT_EQ(static_cast<int>(t.back()), gpt2.eot_token());
  EXPECT_EQ(std::count(t.begin(), t.end(), static_cast<uint32_t>(gpt2.eot_token())), 10);
  EXPECT_FALSE(std::filesystem::exists(path("out_gpt2/tokenizer.bin")));
}

TEST_F(HfTokenizerReference, SampleDecodesWithATokenizerJson) {
  auto c = test::tiny_config();
  c.vocab_size = tokenizer("gpt2").vocab_size();
  c.padded_vocab = pad_vocab(c.vocab_size);
  const std::vector<float> p = test::init(c, 3);
  write_llmc_model(path("tiny.bin"), c, p.data(), 3);
  const Result r = test::run_remat(
      {"sample", "--model", path("tiny.bin"), "--tokenizer", path("gpt2/tokenizer.json"),
       "--prompt", "Caf\xc3\xa9 it's", "--tokens", "6", "--temperature", "0"},
      path("sample"));
  ASSERT_EQ(r.code(), 0) << r.describe();
  EXPECT_EQ(r.out.rfind("Caf\xc3\xa9 it's", 0), 0u) << r.describe();
  EXPECT_EQ(find_invalid_utf8(r.out), std::string::npos) << r.describe();
}

}  // namespace
}  // namespace remat
