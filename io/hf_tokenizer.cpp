#include "io/hf_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cctype>
#include <climits>
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>
#include <unordered_set>

#include "base/error.h"
#include "io/atomic_file.h"

namespace remat {
namespace {

using json = nlohmann::json;

// ---- UTF-8 ----

// The length of the well-formed sequence starting at s[i], or 0 with *bad set to the length of
// the maximal ill-formed subpart there (>= 1), per Unicode's "substitution of maximal subparts".
size_t utf8_sequence(const unsigned char* s, size_t n, size_t i, size_t* bad) {
  const unsigned char b = s[i];
  if (b < 0x80) return 1;
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // range of the second byte
  if (b >= 0xC2 && b <= 0xDF) {
    need = 1;
  } else if (b == 0xE0) {
    need = 2, lo = 0xA0;
  } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
    need = 2;
  } else if (b == 0xED) {
    need = 2, hi = 0x9F;  // no surrogates
  } else if (b == 0xF0) {
    need = 3, lo = 0x90;
  } else if (b >= 0xF1 && b <= 0xF3) {
    need = 3;
  } else if (b == 0xF4) {
    need = 3, hi = 0x8F;  // nothing past U+10FFFF
  } else {
    *bad = 1;
    return 0;
  }
  for (size_t k = 1; k <= need; k++) {
    const size_t j = i + k;
    const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (j >= n || s[j] < l || s[j] > h) {
      *bad = k;
      return 0;
    }
  }
  return need + 1;
}

// The code point at s[i] of a well-formed string; i moves past it.
uint32_t next_code_point(const std::string& s, size_t& i) {
  const unsigned char b = static_cast<unsigned char>(s[i]);
  int extra = b < 0x80 ? 0 : b < 0xE0 ? 1 : b < 0xF0 ? 2 : 3;
  uint32_t cp = extra == 0 ? b : extra == 1 ? (b & 0x1F) : extra == 2 ? (b & 0x0F) : (b & 0x07);
  i++;
  for (; extra > 0 && i < s.size(); extra--, i++) cp = (cp << 6) | (s[i] & 0x3F);
  return cp;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Unicode's White_Space property (what Rust's regex \s matches).
bool is_white_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// ---- the byte-to-unicode map of byte-level BPE ----

// Bytes that are printable characters (! to ~, U+00A1 to U+00AC, U+00AE to U+00FF) stand for
// themselves; the other 68 bytes, in increasing order, for U+0100, U+0101, ...
struct ByteMap {
  std::string utf8[256];  // byte -> its character in UTF-8
  int16_t byte_of[512];   // code point -> byte, -1 for a character outside the map
  ByteMap() {
    std::fill(std::begin(byte_of), std::end(byte_of), int16_t{-1});
    uint32_t next = 256;
    for (int b = 0; b < 256; b++) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : next++;
      append_utf8(utf8[b], cp);
      byte_of[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

// ---- regexes through PCRE2 ----

// Oniguruma (which tokenizers uses) and PCRE2 differ on a few escapes; these are rewritten to
// PCRE2's spelling of Oniguruma's meaning: \s and \S (Oniguruma: White_Space; PCRE2 also
// takes U+180E), \h and \H (Oniguruma: a hex digit; PCRE2: horizontal space). Each works
// inside and outside a character class. Text between \Q and \E is left alone.
std::string onig_to_pcre2(const std::string& p) {
  std::string out;
  out.reserve(p.size() + 16);
  bool quoted = false;
  for (size_t i = 0; i < p.size(); i++) {
    if (p[i] != '\\' || i + 1 == p.size()) {
      out += p[i];
      continue;
    }
    const char c = p[++i];
    if (quoted) {
      out += '\\';
      out += c;
      if (c == 'E') quoted = false;
      continue;
    }
    switch (c) {
      case 's':
        out += "\\p{White_Space}";
        break;
      case 'S':
        out += "\\P{White_Space}";
        break;
      case 'h':
        out += "\\p{ASCII_Hex_Digit}";
        break;
      case 'H':
        out += "\\P{ASCII_Hex_Digit}";
        break;
      default:
        out += '\\';
        out += c;
        if (c == 'Q') quoted = true;
    }
  }
  return out;
}

// A literal string as a PCRE2 pattern.
std::string escape_literal(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7F) {
      static const char* hex = "0123456789abcdef";
      out += "\\x{";
      out += hex[c >> 4];
      out += hex[c & 15];
      out += '}';
    } else if (c < 0x80 && !std::isalnum(c)) {
      out += '\\';
      out += static_cast<char>(c);
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

class Regex {
 public:
  // `what` names the file and field for errors.
  Regex(const std::string& pattern, std::string what) : what_(std::move(what)) {
    int err = 0;
    PCRE2_SIZE offset = 0;
    pcre2_compile_context* cc = pcre2_compile_context_create(nullptr);
    if (cc == nullptr) throw Error(what_ + ": out of memory compiling the regex");
    pcre2_set_newline(cc, PCRE2_NEWLINE_LF);
    const std::string translated = onig_to_pcre2(pattern);
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(),
                          PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE | PCRE2_NEVER_BACKSLASH_C, &err,
                          &offset, cc);
    pcre2_compile_context_free(cc);
    if (code_ == nullptr)
      throw Error(what_ + ": PCRE2 refuses the regex \"" + pattern + "\": " + message(err) +
                  " (at offset " + std::to_string(offset) +
                  (translated != pattern ? " of its PCRE2 form \"" + translated + "\"" : "") + ")");
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // where JIT fails, the interpreter runs
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // The matches in s as Oniguruma's find_iter yields them: leftmost first, each search from
  // the end of the previous match, and an empty match right where the previous match ended
  // skipped by moving one character on. s must be well-formed UTF-8.
  void find_all(const std::string& s, std::vector<std::pair<size_t, size_t>>& out) const {
    out.clear();
    const MatchData md = match_data();
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t from = 0, last_end = 0;
    bool matched_before = false;
    while (from <= s.size()) {
      int rc = pcre2_match(code_, subject, s.size(), from, PCRE2_NO_UTF_CHECK, md.get(), nullptr);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT)  // the interpreter keeps its state on the heap
        rc = pcre2_match(code_, subject, s.size(), from, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT,
                         md.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) throw Error(what_ + ": PCRE2 could not match the regex: " + message(rc));
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      const size_t b = ov[0], e = ov[1];
      if (b < from || e < b || e > s.size())  // only \K could do this
        throw Error(what_ + ": the regex gave a match outside the text it searched");
      if (b == e && matched_before && last_end == e) {
        if (from == s.size()) break;
        size_t bad = 0;
        const size_t n =
            utf8_sequence(reinterpret_cast<const unsigned char*>(s.data()), s.size(), from, &bad);
        from += n > 0 ? n : 1;
        continue;
      }
      out.emplace_back(b, e);
      from = last_end = e;
      matched_before = true;
    }
  }

  // Whether the regex matches at the start of s (which must be well-formed UTF-8).
  bool matches_at_start(const std::string& s) const {
    const MatchData md = match_data();
    return pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), 0,
                       PCRE2_ANCHORED | PCRE2_NO_UTF_CHECK, md.get(), nullptr) >= 0;
  }

 private:
  using MatchData = std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)>;
  // Per call, so that matching from several threads is safe.
  MatchData match_data() const {
    MatchData md(pcre2_match_data_create_from_pattern(code_, nullptr), &pcre2_match_data_free);
    if (!md) throw Error(what_ + ": out of memory matching the regex");
    return md;
  }
  static std::string message(int code) {
    PCRE2_UCHAR buf[256];
    if (pcre2_get_error_message(code, buf, sizeof buf) < 0) return "error " + std::to_string(code);
    return reinterpret_cast<const char*>(buf);
  }

  pcre2_code* code_ = nullptr;
  std::string what_;
};

// GPT-2's pre-tokenizer regex, which ByteLevel with use_regex applies.
constexpr const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
// What Rust's regex crate takes for \w (the added tokens' single_word test).
constexpr const char* kWordCharPattern = "[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}]";

// ---- the pipeline's parts ----

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

// One pre-tokenizer of the (flattened) Sequence.
struct PreStep {
  enum class Kind { Split, ByteLevel } kind = Kind::Split;
  std::shared_ptr<const Regex> regex;  // Split: its pattern; ByteLevel: GPT-2's, or null
  Behavior behavior = Behavior::Isolated;
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel
};

struct AddedToken {
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
};

// Leftmost-longest literal matching of the added tokens of one kind (normalized or not).
struct Matcher {
  std::vector<std::pair<std::string, int>> by_byte[256];  // (content, id), longest first
  bool empty = true;
};

// A piece of the text on its way through the pipeline: text, or an added token's id.
struct Segment {
  std::string text;
  int id = -1;
};

// Everything read from the file; immutable once parsed.
struct Model {
  std::string name;
  std::unordered_map<std::string, int> vocab;
  std::unordered_map<int, std::string> vocab_r;
  std::unordered_map<uint64_t, std::pair<int, int>> merges;  // (left << 32 | right) -> (rank, id)
  bool ignore_merges = false;
  int unk = -1;  // unk_token's id, -1 for none (unknown characters are then dropped)
  bool fuse_unk = false;
  bool nfc = false;
  std::vector<PreStep> pre;
  std::shared_ptr<const Regex> gpt2_regex;         // shared by the ByteLevel steps that use it
  std::map<int, AddedToken> added;                 // id -> token
  std::unordered_map<std::string, int> added_ids;  // content -> id
  std::unordered_set<std::string> specials;        // contents of special added tokens
  Matcher raw, normalized;                         // normalized = false / true
  std::unique_ptr<Regex> word_char;                // for single_word tokens
  enum class Decoder { None, ByteLevel } decoder = Decoder::None;
  int vocab_size = 0, bos = -1, eot = -1;

  std::vector<Segment> split_added(const std::string& text, const Matcher& m) const;
  void pre_tokenize(const std::string& text, std::vector<std::string>& pieces) const;
  void bpe(const std::string& word, std::vector<int>& out) const;
  const std::string* token_of(int id) const;
};

// ---- reading the JSON ----

std::string as_json(const std::string& s) {
  return json(s).dump();
}

// A value for a message: scalars as JSON, containers by kind (never dumped: they may nest deeply).
std::string show(const json& v) {
  if (v.is_array()) return "an array";
  if (v.is_object()) return "an object";
  return v.dump();
}

struct Json {
  const std::string& name;

  [[noreturn]] void fail(const std::string& what) const { throw Error(name + ": " + what); }

  // obj[key], or nullptr when absent or null.
  const json* find(const json& obj, const char* key) const {
    auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  const json& object(const json& v, const std::string& where) const {
    if (!v.is_object()) fail(where + " is not a JSON object");
    return v;
  }
  std::string string(const json& v, const std::string& where) const {
    if (!v.is_string()) fail(where + " is not a string");
    return v.get<std::string>();
  }
  bool flag(const json& obj, const char* key, bool def, const std::string& where) const {
    const json* v = find(obj, key);
    if (v == nullptr) return def;
    if (!v->is_boolean()) fail(where + "." + key + " is not true or false");
    return v->get<bool>();
  }
  std::string type(const json& obj, const std::string& where) const {
    const json* t = find(object(obj, where), "type");
    if (t == nullptr) fail(where + " has no \"type\"");
    return string(*t, where + ".type");
  }
  int id(const json& v, const std::string& where) const {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= INT_MAX)
      fail(where + " is not a token id (an integer from 0 to " + std::to_string(INT_MAX - 1) +
           "): " + show(v));
    return static_cast<int>(v.get<int64_t>());
  }
};

void read_model(const Json& J, const json& root, Model& m) {
  const json* model = J.find(root, "model");
  if (model == nullptr) J.fail("no \"model\" (not a tokenizer.json?)");
  J.object(*model, "model");
  const json* type = J.find(*model, "type");
  if (type != nullptr && J.string(*type, "model.type") != "BPE")
    J.fail("model type " + as_json(type->get<std::string>()) +
           " is not supported (remat reads BPE tokenizers)");
  if (const json* d = J.find(*model, "dropout"))
    if (!d->is_number() || d->get<double>() != 0.0)
      J.fail("model.dropout " + show(*d) + " is not supported (only null or 0)");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (const json* v = J.find(*model, k))
      if (!J.string(*v, std::string("model.") + k).empty())
        J.fail(std::string("model.") + k + " " + show(*v) +
               " is not supported (byte-level BPE has none)");
  if (J.flag(*model, "byte_fallback", false, "model"))
    J.fail("model.byte_fallback true is not supported (byte-level BPE needs no fallback)");
  m.ignore_merges = J.flag(*model, "ignore_merges", false, "model");
  m.fuse_unk = J.flag(*model, "fuse_unk", false, "model");

  const json* vocab = J.find(*model, "vocab");
  if (vocab == nullptr || !vocab->is_object()) J.fail("model.vocab is missing or not an object");
  if (vocab->empty()) J.fail("model.vocab is empty");
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    const int id = J.id(it.value(), "model.vocab[" + as_json(it.key()) + "]");
    auto [at, fresh] = m.vocab_r.emplace(id, it.key());
    if (!fresh)
      J.fail("model.vocab gives id " + std::to_string(id) + " to both " + as_json(at->second) +
             " and " + as_json(it.key()));
    m.vocab.emplace(it.key(), id);
  }
  if (const json* unk = J.find(*model, "unk_token")) {
    const std::string u = J.string(*unk, "model.unk_token");
    auto it = m.vocab.find(u);
    if (it == m.vocab.end()) J.fail("model.unk_token " + as_json(u) + " is not in model.vocab");
    m.unk = it->second;
  }

  const json* merges = J.find(*model, "merges");
  if (merges == nullptr || !merges->is_array()) J.fail("model.merges is missing or not an array");
  int rank = 0;
  for (size_t i = 0; i < merges->size(); i++) {
    const json& e = (*merges)[i];
    const std::string where = "model.merges[" + std::to_string(i) + "]";
    std::string a, b;
    if (e.is_string()) {
      const std::string line = e.get<std::string>();
      if (line.rfind("#version", 0) == 0) continue;  // a merges.txt header line
      const size_t sp = line.find(' ');
      if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos)
        J.fail(where + " " + as_json(line) + " is not two tokens separated by one space");
      a = line.substr(0, sp);
      b = line.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2) {
      a = J.string(e[0], where + "[0]");
      b = J.string(e[1], where + "[1]");
    } else {
      J.fail(where + " is neither a string \"a b\" nor a pair [a, b]");
    }
    auto ia = m.vocab.find(a), ib = m.vocab.find(b), iab = m.vocab.find(a + b);
    if (ia == m.vocab.end())
      J.fail(where + " names " + as_json(a) + ", which is not in model.vocab");
    if (ib == m.vocab.end())
      J.fail(where + " names " + as_json(b) + ", which is not in model.vocab");
    if (iab == m.vocab.end())
      J.fail(where + " merges " + as_json(a) + " and " + as_json(b) + " into " + as_json(a + b) +
             ", which is not in model.vocab");
    const uint64_t key =
        static_cast<uint64_t>(ia->second) << 32 | static_cast<uint32_t>(ib->second);
    m.merges[key] = {rank++, iab->second};  // a pair listed again takes its last rank
  }
}

void read_pre_tokenizer(const Json& J, const json& p, const std::string& where, int depth,
                        Model& m) {
  if (depth > 32) J.fail(where + ": Sequences nested too deeply");
  const std::string type = J.type(p, where);
  if (type == "Sequence") {
    const json* list = J.find(p, "pretokenizers");
    if (list == nullptr || !list->is_array()) J.fail(where + ".pretokenizers is not an array");
    for (size_t i = 0; i < list->size(); i++)
      read_pre_tokenizer(J, (*list)[i], where + ".pretokenizers[" + std::to_string(i) + "]",
                         depth + 1, m);
  } else if (type == "ByteLevel") {
    PreStep s;
    s.kind = PreStep::Kind::ByteLevel;
    s.add_prefix_space = J.flag(p, "add_prefix_space", true, where);
    if (J.flag(p, "use_regex", true, where)) {
      if (!m.gpt2_regex)
        m.gpt2_regex = std::make_shared<const Regex>(kGpt2Pattern, J.name + ": " + where);
      s.regex = m.gpt2_regex;
    }
    m.pre.push_back(std::move(s));
  } else if (type == "Split") {
    PreStep s;
    const json* pat = J.find(p, "pattern");
    if (pat == nullptr || !pat->is_object() || pat->size() != 1)
      J.fail(where + ".pattern is not {\"Regex\": ...} or {\"String\": ...}");
    const std::string kind = pat->begin().key();
    const std::string text = J.string(pat->begin().value(), where + ".pattern." + kind);
    if (kind == "Regex")
      s.regex = std::make_shared<const Regex>(text, J.name + ": " + where + ".pattern.Regex");
    else if (kind == "String")
      s.regex = std::make_shared<const Regex>(escape_literal(text),
                                              J.name + ": " + where + ".pattern.String");
    else
      J.fail(where + ".pattern." + kind + " is not Regex or String");
    const json* b = J.find(p, "behavior");
    const std::string behavior = b ? J.string(*b, where + ".behavior") : "";
    static const std::pair<const char*, Behavior> kBehaviors[] = {
        {"Removed", Behavior::Removed},
        {"Isolated", Behavior::Isolated},
        {"MergedWithPrevious", Behavior::MergedWithPrevious},
        {"MergedWithNext", Behavior::MergedWithNext},
        {"Contiguous", Behavior::Contiguous}};
    bool known = false;
    for (const auto& [n, v] : kBehaviors)
      if (behavior == n) s.behavior = v, known = true;
    if (!known)
      J.fail(where + ".behavior " + (b ? show(*b) : "(missing)") +
             " is not Removed, Isolated, MergedWithPrevious, MergedWithNext or Contiguous");
    s.invert = J.flag(p, "invert", false, where);
    m.pre.push_back(std::move(s));
  } else {
    J.fail(where + " type " + as_json(type) +
           " is not supported (ByteLevel, Split, or a Sequence of them)");
  }
}

void read_normalizer(const Json& J, const json& n, const std::string& where, int depth, Model& m) {
  if (depth > 32) J.fail(where + ": Sequences nested too deeply");
  const std::string type = J.type(n, where);
  if (type == "NFC") {
    m.nfc = true;
  } else if (type == "Sequence") {
    const json* list = J.find(n, "normalizers");
    if (list == nullptr || !list->is_array()) J.fail(where + ".normalizers is not an array");
    for (size_t i = 0; i < list->size(); i++)
      read_normalizer(J, (*list)[i], where + ".normalizers[" + std::to_string(i) + "]", depth + 1,
                      m);
  } else {
    J.fail(where + " type " + as_json(type) + " is not supported (null or NFC)");
  }
}

// Added tokens get their ids as tokenizers gives them: an existing added token's or the vocab's
// id for its content, else the next id past the vocab (counted as the vocab's size); the
// file's "id" must agree.
void read_added_tokens(const Json& J, const json& root, Model& m) {
  const json* list = J.find(root, "added_tokens");
  if (list == nullptr) return;
  if (!list->is_array()) J.fail("added_tokens is not an array");
  int next_id = static_cast<int>(m.vocab.size());
  for (size_t i = 0; i < list->size(); i++) {
    const std::string where = "added_tokens[" + std::to_string(i) + "]";
    const json& e = J.object((*list)[i], where);
    const json* content = J.find(e, "content");
    if (content == nullptr) J.fail(where + " has no content");
    AddedToken t;
    t.content = J.string(*content, where + ".content");
    t.special = J.flag(e, "special", false, where);
    t.single_word = J.flag(e, "single_word", false, where);
    t.lstrip = J.flag(e, "lstrip", false, where);
    t.rstrip = J.flag(e, "rstrip", false, where);
    t.normalized = J.flag(e, "normalized", !t.special, where);
    const json* file_id = J.find(e, "id");
    if (file_id == nullptr) J.fail(where + " has no id");
    const int given = J.id(*file_id, where + ".id");
    if (t.content.empty()) continue;  // tokenizers ignores these
    int id;
    if (auto a = m.added_ids.find(t.content); a != m.added_ids.end()) {
      id = a->second;
    } else if (auto v = m.vocab.find(t.content); v != m.vocab.end()) {
      id = v->second;
    } else {
      if (next_id == INT_MAX) J.fail(where + ": too many added tokens");
      id = next_id++;
    }
    if (given != id)
      J.fail(where + " " + as_json(t.content) + " has id " + std::to_string(given) +
             " but tokenizers gives it id " + std::to_string(id) +
             " (its id in model.vocab, else the next id past the vocab)");
    m.added_ids[t.content] = id;
    if (t.special) m.specials.insert(t.content);
    m.added[id] = std::move(t);
  }
  for (const auto& [id, t] : m.added) {
    Matcher& mt = t.normalized ? m.normalized : m.raw;
    mt.by_byte[static_cast<unsigned char>(t.content[0])].emplace_back(t.content, id);
    mt.empty = false;
    if (t.single_word && !m.word_char)
      m.word_char = std::make_unique<Regex>(kWordCharPattern, J.name + ": single_word");
  }
  for (Matcher* mt : {&m.raw, &m.normalized})
    for (auto& list_of_byte : mt->by_byte)
      std::stable_sort(list_of_byte.begin(), list_of_byte.end(), [](const auto& a, const auto& b) {
        return a.first.size() > b.first.size();
      });
}

// The first item of a TemplateProcessing's single template, when it is a special token.
void read_bos(const Json& J, const json& root, Model& m) {
  const json* pp = J.find(root, "post_processor");
  if (pp == nullptr) return;
  const json* tp = nullptr;
  const std::string type = J.type(*pp, "post_processor");
  std::string where = "post_processor";
  if (type == "TemplateProcessing") {
    tp = pp;
  } else if (type == "Sequence") {
    const json* list = J.find(*pp, "processors");
    if (list == nullptr || !list->is_array()) J.fail("post_processor.processors is not an array");
    for (size_t i = 0; i < list->size() && tp == nullptr; i++) {
      const std::string w = "post_processor.processors[" + std::to_string(i) + "]";
      if (J.type((*list)[i], w) == "TemplateProcessing") tp = &(*list)[i], where = w;
    }
  }
  if (tp == nullptr) return;
  const json* single = J.find(*tp, "single");
  if (single == nullptr || !single->is_array()) J.fail(where + ".single is not an array");
  if (single->empty()) return;
  const json& first = J.object((*single)[0], where + ".single[0]");
  const json* st = J.find(first, "SpecialToken");
  if (st == nullptr) return;
  const json* sid = J.find(J.object(*st, where + ".single[0].SpecialToken"), "id");
  if (sid == nullptr) J.fail(where + ".single[0].SpecialToken has no id");
  const std::string name = J.string(*sid, where + ".single[0].SpecialToken.id");
  const json* specials = J.find(*tp, "special_tokens");
  const json* entry = specials && specials->is_object() ? J.find(*specials, name.c_str()) : nullptr;
  if (entry == nullptr) J.fail(where + ".special_tokens has no entry " + as_json(name));
  const json* ids = J.find(J.object(*entry, where + ".special_tokens." + name), "ids");
  if (ids == nullptr || !ids->is_array() || ids->size() != 1)
    J.fail(where + ".special_tokens." + name + ".ids is not a list of one id");
  m.bos = J.id((*ids)[0], where + ".special_tokens." + name + ".ids[0]");
  if (m.token_of(m.bos) == nullptr)
    J.fail(where + " puts id " + std::to_string(m.bos) + " first, which has no token");
}

// ---- encoding ----

// A span of the text as tokenizers' AddedVocabulary::find_matches cuts it.
struct Span {
  size_t begin, end;
  int id;  // -1: text
};

// The start of the run of White_Space characters that ends at `end`.
size_t trailing_space_start(const std::string& s, size_t end) {
  size_t start = end;
  while (start > 0) {
    size_t at = start - 1;
    while (at > 0 && (static_cast<unsigned char>(s[at]) & 0xC0) == 0x80) at--;
    size_t j = at;
    if (!is_white_space(next_code_point(s, j))) break;
    start = at;
  }
  return start;
}

size_t leading_space_length(const std::string& s, size_t from) {
  size_t i = from;
  while (i < s.size()) {
    size_t j = i;
    if (!is_white_space(next_code_point(s, j))) break;
    i = j;
  }
  return i - from;
}

std::vector<Segment> Model::split_added(const std::string& text, const Matcher& mt) const {
  std::vector<Segment> out;
  if (mt.empty) {
    if (!text.empty()) out.push_back({text, -1});
    return out;
  }
  std::vector<Span> spans;
  size_t start_offset = 0, pos = 0;
  const size_t n = text.size();
  while (pos < n) {
    // The leftmost match at or after pos, the longest there.
    size_t mb = n, me = n;
    int id = -1;
    for (size_t i = pos; i < n && id < 0; i++) {
      for (const auto& [content, cid] : mt.by_byte[static_cast<unsigned char>(text[i])]) {
        if (text.compare(i, content.size(), content) == 0) {
          mb = i, me = i + content.size(), id = cid;
          break;
        }
      }
    }
    if (id < 0) break;
    pos = me;
    const AddedToken& t = added.at(id);
    size_t start = mb, stop = me;
    if (t.single_word) {
      auto word_at = [&](size_t at) {
        size_t j = at;
        next_code_point(text, j);
        return word_char->matches_at_start(text.substr(at, j - at));
      };
      auto last_char = [&](size_t end) {
        size_t at = end - 1;
        while (at > 0 && (static_cast<unsigned char>(text[at]) & 0xC0) == 0x80) at--;
        return at;
      };
      const bool space_before = mb == 0 || !word_at(last_char(mb));
      const bool space_after = me == n || !word_at(me);
      if (!space_before || !space_after) continue;
    }
    if (t.lstrip) start = std::max(trailing_space_start(text, start), start_offset);
    if (t.rstrip) stop += leading_space_length(text, stop);
    if (start_offset < start) spans.push_back({start_offset, start, -1});
    spans.push_back({start, stop, id});
    start_offset = stop;
  }
  if (start_offset != n) spans.push_back({start_offset, n, -1});
  for (const Span& s : spans) {
    if (s.id >= 0)
      out.push_back({"", s.id});
    else if (s.end > s.begin)
      out.push_back({text.substr(s.begin, s.end - s.begin), -1});
  }
  return out;
}

// tokenizers' NormalizedString::split: the pieces of `s` the regex's matches make under
// `behavior`, empty ones dropped.
void split_pieces(const std::string& s, const Regex& re, Behavior behavior, bool invert,
                  std::vector<std::pair<size_t, size_t>>& scratch, std::vector<std::string>& out) {
  struct M {
    size_t b, e;
    bool match;
  };
  std::vector<M> ms;
  if (s.empty()) {
    ms.push_back({0, 0, false});
  } else {
    re.find_all(s, scratch);
    size_t prev = 0;
    for (const auto& [b, e] : scratch) {
      if (prev != b) ms.push_back({prev, b, false});
      ms.push_back({b, e, true});
      prev = e;
    }
    if (prev != s.size()) ms.push_back({prev, s.size(), false});
  }
  if (invert)
    for (M& m : ms) m.match = !m.match;

  std::vector<M> keep;  // match = "remove"
  switch (behavior) {
    case Behavior::Isolated:
      for (const M& m : ms) keep.push_back({m.b, m.e, false});
      break;
    case Behavior::Removed:
      keep = ms;
      break;
    case Behavior::Contiguous: {
      bool prev = false;
      for (const M& m : ms) {
        if (m.match == prev && !keep.empty())
          keep.back().e = m.e;
        else
          keep.push_back({m.b, m.e, false});
        prev = m.match;
      }
      break;
    }
    case Behavior::MergedWithPrevious: {
      bool prev = false;
      for (const M& m : ms) {
        if (m.match && !prev && !keep.empty())
          keep.back().e = m.e;
        else
          keep.push_back({m.b, m.e, false});
        prev = m.match;
      }
      break;
    }
    case Behavior::MergedWithNext: {
      bool prev = false;
      for (auto it = ms.rbegin(); it != ms.rend(); ++it) {
        if (it->match && !prev && !keep.empty())
          keep.back().b = it->b;
        else
          keep.push_back({it->b, it->e, false});
        prev = it->match;
      }
      std::reverse(keep.begin(), keep.end());
      break;
    }
  }
  for (const M& k : keep)
    if (!k.match && k.e > k.b) out.push_back(s.substr(k.b, k.e - k.b));
}

void Model::pre_tokenize(const std::string& text, std::vector<std::string>& pieces) const {
  pieces.clear();
  pieces.push_back(text);
  std::vector<std::string> next;
  std::vector<std::pair<size_t, size_t>> scratch;
  const ByteMap& bm = byte_map();
  for (const PreStep& step : pre) {
    next.clear();
    if (step.kind == PreStep::Kind::Split) {
      for (const std::string& p : pieces)
        split_pieces(p, *step.regex, step.behavior, step.invert, scratch, next);
    } else {
      std::vector<std::string> parts;
      for (std::string& p : pieces) {
        if (step.add_prefix_space && p[0] != ' ') p.insert(p.begin(), ' ');
        parts.clear();
        if (step.regex)
          split_pieces(p, *step.regex, Behavior::Isolated, false, scratch, parts);
        else
          parts.push_back(std::move(p));
        for (const std::string& part : parts) {
          std::string mapped;
          mapped.reserve(part.size() * 2);
          for (unsigned char c : part) mapped += bm.utf8[c];
          next.push_back(std::move(mapped));
        }
      }
    }
    pieces.swap(next);
  }
}

void Model::bpe(const std::string& word, std::vector<int>& out) const {
  if (word.empty()) return;
  if (ignore_merges) {
    auto it = vocab.find(word);
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  struct Symbol {
    int id, prev, next;
    bool alive;
  };
  std::vector<Symbol> syms;
  int pending_unk = -1;  // an unknown-character run waiting to be added (fuse_unk)
  auto add = [&](int id) {
    const int i = static_cast<int>(syms.size());
    if (i > 0) syms.back().next = i;
    syms.push_back({id, i - 1, -1, true});
  };
  for (size_t i = 0; i < word.size();) {
    const size_t at = i;
    next_code_point(word, i);
    auto it = vocab.find(word.substr(at, i - at));
    if (it != vocab.end()) {
      if (pending_unk >= 0) add(pending_unk), pending_unk = -1;
      add(it->second);
    } else if (unk >= 0) {
      if (pending_unk >= 0 && !fuse_unk) add(pending_unk);
      pending_unk = unk;
    }  // without unk_token an unknown character is dropped, as tokenizers does
  }
  if (pending_unk >= 0) add(pending_unk);

  struct Candidate {
    int rank, pos, id;
  };
  auto later = [](const Candidate& a, const Candidate& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(later)> queue(later);
  auto merge_of = [&](int left, int right) -> const std::pair<int, int>* {
    auto it = merges.find(static_cast<uint64_t>(left) << 32 | static_cast<uint32_t>(right));
    return it == merges.end() ? nullptr : &it->second;
  };
  for (size_t i = 0; i + 1 < syms.size(); i++)
    if (const auto* m = merge_of(syms[i].id, syms[i + 1].id))
      queue.push({m->first, static_cast<int>(i), m->second});
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& s = syms[top.pos];
    if (!s.alive || s.next < 0) continue;
    const int right = s.next;
    const auto* m = merge_of(s.id, syms[right].id);
    if (m == nullptr || m->second != top.id) continue;  // a stale candidate
    s.id = top.id;
    s.next = syms[right].next;
    syms[right].alive = false;
    if (s.next >= 0) syms[s.next].prev = top.pos;
    if (s.prev >= 0)
      if (const auto* pm = merge_of(syms[s.prev].id, s.id))
        queue.push({pm->first, s.prev, pm->second});
    if (s.next >= 0)
      if (const auto* nm = merge_of(s.id, syms[s.next].id))
        queue.push({nm->first, top.pos, nm->second});
  }
  for (const Symbol& s : syms)
    if (s.alive) out.push_back(s.id);
}

const std::string* Model::token_of(int id) const {
  if (auto a = added.find(id); a != added.end()) return &a->second.content;
  if (auto v = vocab_r.find(id); v != vocab_r.end()) return &v->second;
  return nullptr;
}

}  // namespace

struct HfTokenizer::Impl {
  Model m;
};

// ---- HfTokenizer ----

HfTokenizer::HfTokenizer() = default;
HfTokenizer::~HfTokenizer() = default;
HfTokenizer::HfTokenizer(const HfTokenizer&) = default;
HfTokenizer& HfTokenizer::operator=(const HfTokenizer&) = default;
HfTokenizer::HfTokenizer(HfTokenizer&&) noexcept = default;
HfTokenizer& HfTokenizer::operator=(HfTokenizer&&) noexcept = default;

HfTokenizer HfTokenizer::load(const std::string& path) {
  const std::vector<uint8_t> bytes = read_file_bytes(path);
  return parse(std::string(bytes.begin(), bytes.end()), path);
}

HfTokenizer HfTokenizer::parse(const std::string& json_text, const std::string& name) {
  auto impl = std::make_shared<Impl>();
  Model& m = impl->m;
  m.name = name;
  const Json J{m.name};
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {
    std::string what = e.what();
    const size_t close = what.find("] ");  // drop nlohmann's "[json.exception.parse_error.101] "
    if (what.rfind("[json.exception", 0) == 0 && close != std::string::npos)
      what = what.substr(close + 2);
    J.fail("not JSON: " + what);
  }
  if (!root.is_object()) J.fail("not a tokenizer.json (its top level is not a JSON object)");
  try {
    if (const json* v = J.find(root, "version"))
      if (J.string(*v, "version") != "1.0")
        J.fail("tokenizer.json version " + show(*v) + " is not supported (1.0)");
    read_model(J, root, m);
    if (const json* p = J.find(root, "pre_tokenizer"))
      read_pre_tokenizer(J, *p, "pre_tokenizer", 0, m);
    if (const json* n = J.find(root, "normalizer")) read_normalizer(J, *n, "normalizer", 0, m);
    read_added_tokens(J, root, m);
    if (const json* d = J.find(root, "decoder")) {
      const std::string type = J.type(*d, "decoder");
      if (type != "ByteLevel")
        J.fail("decoder type " + as_json(type) + " is not supported (null or ByteLevel)");
      m.decoder = Model::Decoder::ByteLevel;
    }
    int64_t top = -1;
    for (const auto& [id, t] : m.vocab_r) top = std::max<int64_t>(top, id);
    for (const auto& [id, t] : m.added) top = std::max<int64_t>(top, id);
    m.vocab_size = static_cast<int>(top + 1);
    read_bos(J, root, m);
    for (const char* eot : {"<|endoftext|>", "<|end_of_text|>", "</s>"}) {
      auto it = m.added_ids.find(eot);
      if (it != m.added_ids.end() && m.specials.count(eot)) {
        m.eot = it->second;
        break;
      }
    }
  } catch (const json::exception& e) {  // a field of an unexpected type that no check above saw
    J.fail(std::string("malformed tokenizer.json: ") + e.what());
  }
  HfTokenizer t;
  t.impl_ = std::move(impl);
  return t;
}

std::vector<int> HfTokenizer::encode(const std::string& text) const {
  REMAT_REQUIRE(impl_, "HfTokenizer: encode() on a tokenizer that was never loaded");
  const Model& m = impl_->m;
  const size_t bad = find_invalid_utf8(text);
  REMAT_REQUIRE(bad == std::string::npos, "the text to encode with " + m.name +
                                              " is not UTF-8 (byte " + std::to_string(bad) + ")");
  std::vector<int> ids;
  std::vector<std::string> pieces;
  for (Segment& raw : m.split_added(text, m.raw)) {
    if (raw.id >= 0) {
      ids.push_back(raw.id);
      continue;
    }
    // The normalizer would run here (NFC is assumed, see the header).
    for (Segment& seg : m.split_added(raw.text, m.normalized)) {
      if (seg.id >= 0) {
        ids.push_back(seg.id);
        continue;
      }
      m.pre_tokenize(seg.text, pieces);
      for (const std::string& p : pieces) m.bpe(p, ids);
    }
  }
  return ids;
}

const std::string& HfTokenizer::token(int id) const {
  REMAT_REQUIRE(impl_, "HfTokenizer: token() on a tokenizer that was never loaded");
  const Model& m = impl_->m;
  const std::string* t = m.token_of(id);
  if (t == nullptr) {
    if (id < 0 || id >= m.vocab_size)
      throw Error(m.name + ": token id " + std::to_string(id) + " is past the vocabulary (" +
                  std::to_string(m.vocab_size) + " ids: 0 to " + std::to_string(m.vocab_size - 1) +
                  ")");
    throw Error(m.name + ": token id " + std::to_string(id) + " has no token (the vocabulary has " +
                std::to_string(m.vocab_size) + " ids, with gaps)");
  }
  return *t;
}

std::string HfTokenizer::decode(const std::vector<int>& ids, bool skip_special_tokens) const {
  REMAT_REQUIRE(impl_, "HfTokenizer: decode() on a tokenizer that was never loaded");
  const Model& m = impl_->m;
  const ByteMap& bm = byte_map();
  std::string bytes;
  bool first = true;
  for (int id : ids) {
    const std::string& t = token(id);
    if (skip_special_tokens && m.specials.count(t)) continue;
    if (m.decoder == Model::Decoder::None) {  // tokenizers joins the tokens with spaces
      if (!first) bytes += ' ';
      bytes += t;
      first = false;
      continue;
    }
    // Every character through the byte map, or the token's own UTF-8 if one is outside it.
    std::string mapped;
    bool all = true;
    for (size_t i = 0; i < t.size() && all;) {
      const uint32_t cp = next_code_point(t, i);
      if (cp < 512 && bm.byte_of[cp] >= 0)
        mapped += static_cast<char>(bm.byte_of[cp]);
      else
        all = false;
    }
    bytes += all ? mapped : t;
  }
  return to_valid_utf8(bytes);
}

int HfTokenizer::token_id(const std::string& token) const {
  if (!impl_) return -1;
  if (auto a = impl_->m.added_ids.find(token); a != impl_->m.added_ids.end()) return a->second;
  if (auto v = impl_->m.vocab.find(token); v != impl_->m.vocab.end()) return v->second;
  return -1;
}

bool HfTokenizer::is_special(int id) const {
  if (!impl_) return false;
  auto a = impl_->m.added.find(id);
  return a != impl_->m.added.end() && impl_->m.specials.count(a->second.content) != 0;
}

int HfTokenizer::vocab_size() const {
  return impl_ ? impl_->m.vocab_size : 0;
}
int HfTokenizer::bos_token() const {
  return impl_ ? impl_->m.bos : -1;
}
int HfTokenizer::eot_token() const {
  return impl_ ? impl_->m.eot : -1;
}
bool HfTokenizer::nfc_normalizer() const {
  return impl_ && impl_->m.nfc;
}
const std::string& HfTokenizer::name() const {
  static const std::string none;
  return impl_ ? impl_->m.name : none;
}

size_t find_invalid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  for (size_t i = 0; i < s.size();) {
    size_t bad = 0;
    const size_t n = utf8_sequence(p, s.size(), i, &bad);
    if (n == 0) return i;
    i += n;
  }
  return std::string::npos;
}

std::string to_valid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    size_t bad = 0;
    const size_t n = utf8_sequence(p, s.size(), i, &bad);
    if (n > 0) {
      out.append(s, i, n);
      i += n;
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD
      i += bad;
    }
  }
  return out;
}

}  // namespace remat
