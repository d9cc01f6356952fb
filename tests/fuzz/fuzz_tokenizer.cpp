// libFuzzer target: the tokenizer file (io/tokenizer.h), llm.c's layout plus remat's
// merges section.
//
// Input: the tokenizer file's bytes.
// Contract checked: Tokenizer::load either succeeds or throws remat::Error. A tokenizer that
// loads decodes every id in [0, vocab_size) to 1..255 bytes and refuses ids outside it with
// an Error; if it has merges, encode() of any text (here: the input bytes themselves and
// every token's own bytes) decodes back to that text; save() then load() gives the same
// pieces and merges.
#include <unistd.h>

#include <string>

#include "io/tokenizer.h"
#include "kernels/common.h"
#include "tests/fuzz/fuzz_util.h"

using remat_fuzz::MemFile;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  MemFile f(data, size);
  remat::Tokenizer tok;
  try {
    tok = remat::Tokenizer::load(f.path());
  } catch (const remat::Error&) {
    return 0;
  }
  const int V = tok.vocab_size();
  FUZZ_ASSERT(V >= 1 && V <= 65536);
  FUZZ_ASSERT(tok.eot_token() >= 0 && tok.eot_token() < V);
  for (int t = 0; t < V; t++) {
    const std::string p = tok.decode(t);
    FUZZ_ASSERT(!p.empty() && p.size() <= 255);
  }
  for (int bad : {-1, V, 1 << 30}) {
    bool threw = false;
    try {
      tok.decode(bad);
    } catch (const remat::Error&) {
      threw = true;
    }
    FUZZ_ASSERT(threw);
  }
  if (tok.can_encode()) {
    FUZZ_ASSERT(static_cast<int>(tok.merges().size()) == V - 257);
    // Text from the input itself (bounded), then every token's bytes.
    const std::string text(reinterpret_cast<const char*>(data), size < 4096 ? size : 4096);
    FUZZ_ASSERT(tok.decode(tok.encode(text)) == text);
    for (int t = 0; t < V && t < 2048; t++) {
      const std::string p = tok.decode(t);
      FUZZ_ASSERT(tok.decode(tok.encode(p)) == p);
    }
  } else {
    bool threw = false;
    try {
      tok.encode("abc");
    } catch (const remat::Error&) {
      threw = true;
    }
    FUZZ_ASSERT(threw);
  }

  const std::string out = std::string(remat_fuzz::scratch_dir()) + "/tokenizer.bin";
  tok.save(out);
  remat::Tokenizer back = remat::Tokenizer::load(out);
  ::unlink(out.c_str());
  FUZZ_ASSERT(back.vocab_size() == V && back.can_encode() == tok.can_encode());
  FUZZ_ASSERT(back.merges() == tok.merges());
  for (int t = 0; t < V; t++) FUZZ_ASSERT(back.decode(t) == tok.decode(t));
  // A version-1 file (eot fixed at 50256) saves as version 2 with the same eot.
  FUZZ_ASSERT(back.eot_token() == tok.eot_token());
  return 0;
}
