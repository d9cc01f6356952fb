// `remat tokenize`: the token ids of a text, on one line.
#include <cstdio>
#include <string>
#include <vector>

#include "app/cli.h"
#include "app/commands.h"
#include "base/error.h"
#include "io/atomic_file.h"
#include "io/hf_tokenizer.h"
#include "io/tokenizer.h"

namespace remat {
namespace {

std::string read_stdin() {
  std::string text;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, stdin)) > 0) text.append(buf, n);
  REMAT_REQUIRE(!std::ferror(stdin), "standard input: read error");
  return text;
}

}  // namespace

int cmd_tokenize(int argc, const char* const* argv) {
  Options o("tokenize",
            "Print the token ids of a text on one line, separated by spaces.\n"
            "usage: remat tokenize --tokenizer FILE [TEXTFILE]   (default: standard input; - is "
            "standard input too)");
  o.add("tokenizer", "",
        "a Hugging Face tokenizer.json (byte-level BPE: GPT-2's, Llama-3's, Qwen2's; special "
        "tokens in the text become their ids, no BOS is added) or remat's tokenizer.bin");
  if (!o.parse(argc, argv, 0)) {
    std::printf("%s", o.help().c_str());
    return 0;
  }
  const std::string tp = o.get("tokenizer");
  REMAT_REQUIRE(!tp.empty(), "--tokenizer is required (a tokenizer.json or a tokenizer.bin)");
  REMAT_REQUIRE(o.positional().size() <= 1,
                "unexpected argument '" + (o.positional().size() > 1 ? o.positional()[1] : "") +
                    "' (one TEXTFILE at most: see remat tokenize --help)");
  const bool from_stdin = o.positional().empty() || o.positional()[0] == "-";
  const std::string source = from_stdin ? "standard input" : o.positional()[0];

  auto read_text = [&] {
    if (from_stdin) return read_stdin();
    const std::vector<uint8_t> b = read_file_bytes(source);
    return std::string(b.begin(), b.end());
  };
  std::vector<int> ids;
  if (tp.size() >= 5 && tp.compare(tp.size() - 5, 5, ".json") == 0) {
    const HfTokenizer tok = HfTokenizer::load(tp);  // the tokenizer's errors come first
    const std::string text = read_text();
    const size_t bad = find_invalid_utf8(text);
    REMAT_REQUIRE(bad == std::string::npos,
                  source + ": not UTF-8 text (byte " + std::to_string(bad) + ")");
    ids = tok.encode(text);
  } else {
    const Tokenizer tok = Tokenizer::load(tp);
    REMAT_REQUIRE(tok.can_encode(), tp + ": this tokenizer has no merges, so it cannot encode");
    ids = tok.encode(read_text());
  }
  std::string line;
  for (size_t i = 0; i < ids.size(); i++) {
    if (i > 0) line += ' ';
    line += std::to_string(ids[i]);
  }
  line += '\n';
  REMAT_REQUIRE(
      std::fwrite(line.data(), 1, line.size(), stdout) == line.size() && std::fflush(stdout) == 0,
      "standard output: write error");
  return 0;
}

}  // namespace remat
