// libFuzzer target: the Hugging Face tokenizer.json reader and encoder (io/hf_tokenizer.h).
//
// Input: the tokenizer.json text, then a NUL byte, then a text to encode (at most 4 KiB are
// used). Without a NUL the input is both: the file, and the text.
// Contract checked: HfTokenizer::parse either succeeds or throws remat::Error. A tokenizer that
// parses has a vocabulary of at least one id; encode() of text that is not UTF-8 throws Error;
// encode() of UTF-8 text either throws Error (a regex that PCRE2 gives up on) or gives the same
// ids twice, each in [0, vocab_size) with a token; decode() of them, with and without the
// special tokens, is well-formed UTF-8; ids -1 and vocab_size are refused with an Error; the
// named BOS and end-of-text tokens, if any, have tokens. find_invalid_utf8 and to_valid_utf8
// agree on the raw text.
#include <functional>
#include <string>
#include <vector>

#include "base/error.h"
#include "io/hf_tokenizer.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

bool refused(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const remat::Error&) {
    return true;
  }
  return false;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string file = input.substr(0, nul);
  std::string raw = nul == std::string::npos ? input : input.substr(nul + 1);
  if (raw.size() > 4096) raw.resize(4096);

  // The UTF-8 helpers, on any bytes.
  const std::string valid = remat::to_valid_utf8(raw);
  FUZZ_ASSERT(remat::find_invalid_utf8(valid) == std::string::npos);
  FUZZ_ASSERT((remat::find_invalid_utf8(raw) == std::string::npos) == (valid == raw));

  remat::HfTokenizer tok;
  try {
    tok = remat::HfTokenizer::parse(file, "fuzz.json");
  } catch (const remat::Error&) {
    return 0;
  }
  const int V = tok.vocab_size();
  FUZZ_ASSERT(V >= 1);
  if (tok.bos_token() >= 0) FUZZ_ASSERT(!refused([&] { tok.token(tok.bos_token()); }));
  if (tok.eot_token() >= 0) FUZZ_ASSERT(!refused([&] { tok.token(tok.eot_token()); }));
  FUZZ_ASSERT(refused([&] { tok.decode({-1}); }));
  FUZZ_ASSERT(refused([&] { tok.decode({V}); }));
  if (valid != raw) FUZZ_ASSERT(refused([&] { tok.encode(raw); }));

  std::vector<int> ids;
  try {
    ids = tok.encode(valid);
  } catch (const remat::Error&) {
    return 0;  // PCRE2 gave up on a regex (match or heap limit)
  }
  FUZZ_ASSERT(tok.encode(valid) == ids);
  for (int id : ids) {
    FUZZ_ASSERT(id >= 0 && id < V);
    FUZZ_ASSERT(tok.token_id(tok.token(id)) >= 0);
  }
  FUZZ_ASSERT(remat::find_invalid_utf8(tok.decode(ids)) == std::string::npos);
  FUZZ_ASSERT(remat::find_invalid_utf8(tok.decode(ids, true)) == std::string::npos);
  return 0;
}
