#!/usr/bin/env python3
"""Reference tokenizers for tests/test_hf_tokenizer.cpp, made with Hugging Face `tokenizers`.

usage: make_tokenizers.py OUTDIR

Trains small byte-level BPE tokenizers on a corpus this script writes (OUTDIR/corpus.txt) and
saves each as OUTDIR/<name>/tokenizer.json:
  gpt2         GPT-2's pre-tokenizer (ByteLevel with use_regex), <|endoftext|>
  gpt2_legacy  the same file with its merges written as "a b" strings
  llama3       Llama-3's: Split(its regex, Isolated) + ByteLevel(use_regex=False), ignore_merges,
               <|begin_of_text|> put first by a TemplateProcessing post-processor
  qwen2        Qwen2's: its regex, an NFC normalizer, <|endoftext|>
  crafted      written by hand: added tokens with lstrip/rstrip/single_word/normalized, Split
               behaviours and invert, a String pattern, add_prefix_space, ignore_merges with a
               word merges cannot reach, characters missing from the vocab (dropped)
  crafted_unk  like crafted with an unk_token and fuse_unk
Then writes OUTDIR/cases.json: for each tokenizer and test text (none of them in the corpus),
the ids `tokenizers` gives (encode(text, add_special_tokens=False)) and decode(ids) with and
without skip_special_tokens; and id sequences that cut characters apart, with their decode.

Exits 77 when `tokenizers` cannot be imported (the C++ test then skips).
"""
import json
import os
import random
import sys
import unicodedata

try:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers
except ImportError as e:
    print(f"make_tokenizers.py: cannot import tokenizers ({e}); pip install tokenizers", file=sys.stderr)
    sys.exit(77)

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus():
    """A deterministic training corpus: English-like prose, numbers, code, some accents."""
    rng = random.Random(1234)
    words = ("the of and to in is was for on that with as by at from his her they be this "
             "have not are but had which one all were when we there can an your more would "
             "time people water about many then them these so some make like him into has "
             "look two write go see number way could day did get come made may part over "
             "sound take only little work know place year live me back give most very after "
             "thing our just name good sentence man think say great where help through much "
             "before line right too mean old any same tell boy follow came want show also "
             "around form three small set put end does another well large must big even such "
             "because turn here why ask went men read need land different home us move try "
             "kind hand picture again change off play spell air away animal house point page "
             "letter mother answer found study still learn should America world high every near "
             "add food between own below country plant last school father keep tree never start "
             "city earth eye light thought head under story saw left few while along might close "
             "something seem next hard open example begin life always those both paper together "
             "got group often run important until children side feet car mile night walk white "
             "sea began grow took river four carry state once book hear stop without second late "
             "café naïve résumé über straße façade jalapeño").split()
    lines = []
    for _ in range(3000):
        n = rng.randint(4, 16)
        sent = " ".join(rng.choice(words) for _ in range(n))
        sent = sent[0].upper() + sent[1:]
        r = rng.random()
        if r < 0.15:
            sent += f" {rng.randint(0, 99999)}"
        elif r < 0.25:
            sent = f"It's {sent}, isn't it? They're here and we'll see."
        elif r < 0.32:
            sent = f"def f{rng.randint(0, 99)}(x):\n    return x * {rng.randint(2, 9)} + 1"
        elif r < 0.36:
            sent += " 東京 日本語 中文"
        lines.append(sent + rng.choice([".", "!", "?", ";", ""]))
    return "\n".join(lines) + "\n"


# Test texts: none of these lines is in the corpus.
TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00dcBER Stra\u00dfe",
    "decomposed: cafe\u0301 nai\u0308ve, combining q\u0307 x\u0323\u0307",
    "\u6771\u4eac\u30bf\u30ef\u30fc\u3068\u5bcc\u58eb\u5c71\u3002\u4e2d\u6587\u6d4b\u8bd5\uff01",
    "\ud55c\uad6d\uc5b4 \u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u05e2\u05d1\u05e8\u05d9\u05ea \u0939\u093f\u0928\u094d\u0926\u0940",
    "emoji \U0001F600\U0001F680 family \U0001F468\u200d\U0001F469\u200d\U0001F467 flag \U0001F1EF\U0001F1F5 \u2764\ufe0f",
    "digits 1234567890 123 45 6 00000000000000000000 3.14159 1,000,000",
    "mixed12abc34def 5678x \u0661\u0662\u0663 \u2460\u2461 \u00b2\u00b3 \u216b",
    "spaces    between   words     and\t\ttabs\tand\u00a0nbsp\u3000ideographic",
    "line one\nline two\r\nline three\r\n\r\n\n\n  indented\n\tend",
    "trailing whitespace run      ",
    "   ",
    "\n",
    "",
    "contractions: it's we're they've I'm you'll he'd don't WE'RE YOU'LL IT'S It'S 'LL 'll",
    "long s: it'\u017f, Kelvin \u212a",
    "<|endoftext|>",
    "first doc<|endoftext|>second doc",
    "a <|endoftext|> b <|endoftext|><|endoftext|>c",
    "almost <|endoftext| and <|endof and |endoftext|>",
    "<|begin_of_text|>Hello<|end_of_text|> <|eot_id|>",
    "punctuation!!! ??? ... --- *** (((brackets))) {braces} [x] <tag> \"quotes\" 'single'",
    "code: for (int i = 0; i < n; i++) { x += a[i] * 2; }  // done",
    "url https://example.com/path?q=1&r=2#frag email a.b@c.de",
    "ZWJ\u200bzero\u200cwidth\u200djoiner\ufeffBOM",
    "whitespace zoo \u0085next \u1680ogham \u2000\u2001\u2002 \u2028\u2029 \u202f\u205f \u180emongolian",
    "spaces before U+180E move a piece boundary:  \u180ethe  \u0085the  \u00a0the  \u2028x",
    "control \x01\x02\x1f\x7f bytes and NUL\x00inside",
    "surrogate-free astral \U00010348 \U0001D11E \U00020000\U0002A6D6",
    "MiXeD CaSe WoRdS ThAt ArE nOt In ThE cOrPuS aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "repeated letters: aaaa bbbbbbbb the the the thethethe",
    "ends with combining mark e\u0301",
]

CRAFTED_TEXTS = [
    "ab abc abcd",
    "hello [MASK] world",
    "x  [MASK]  y",
    "[MASK][MASK]",
    "word<sw>word <sw> word <sw>",
    " <sw> ",
    "<rs>   after and before   <ls>",
    "a, b; c. d!",
    "user: hi\nbot: hello",
    "abc\u00e9\u6771",
    "",
]


def base_tokenizer(pre, normalizer=None):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    return tok


def train(tok, text_path, specials, vocab_size):
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([text_path], trainer)
    return tok


def save(tok_or_json, out, name):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "tokenizer.json")
    text = tok_or_json if isinstance(tok_or_json, str) else tok_or_json.to_str(pretty=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Tokenizer.from_file(path)


def crafted(unk):
    """A small hand-written tokenizer.json: every feature remat reads that training does not use."""
    alphabet = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", ",", ".", "!", ":", "Ċ"]
    vocab = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges = [["a", "b"], ["ab", "c"], ["Ġ", "w"], ["o", "r"], ["w", "or"], ["h", "e"], ["l", "l"],
              ["he", "ll"], ["hell", "o"], ["Ġ", "h"]]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["abcd"] = len(vocab)      # no merge reaches it: only ignore_merges maps "abcd" to it
    vocab["Ġhello"] = len(vocab)   # likewise for " hello"
    if unk:
        vocab["<unk>"] = len(vocab)
    added = []
    for content, extra in [("[MASK]", dict(lstrip=True, rstrip=True, special=True, normalized=False)),
                           ("<sw>", dict(single_word=True, special=False, normalized=True)),
                           ("<rs>", dict(rstrip=True, special=True, normalized=False)),
                           ("<ls>", dict(lstrip=True, special=False, normalized=True))]:
        t = dict(id=len(vocab) + len(added), content=content, single_word=False, lstrip=False,
                 rstrip=False, normalized=True, special=False)
        t.update(extra)
        added.append(t)
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"String": "\n"}, "behavior": "MergedWithPrevious",
             "invert": False},
            {"type": "Split", "pattern": {"Regex": "[,;.!]"}, "behavior": "Contiguous",
             "invert": False},
            {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "MergedWithNext",
             "invert": True},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
             "use_regex": True},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>" if unk else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": bool(unk), "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }
    return json.dumps(doc, ensure_ascii=False, indent=1)


def cut_cases(tok, texts):
    """Id sequences of single-byte tokens that stop inside a character, and bytes that never
    make UTF-8; tokenizers decodes them with U+FFFD."""
    out = []
    for text in texts:
        raw = text.encode("utf-8")
        for cut in range(1, len(raw)):
            if (raw[cut] & 0xC0) == 0x80:  # raw[cut] continues a character: cut inside it
                ids = [byte_token(tok, b) for b in raw[:cut]]
                out.append({"ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
                ids = ids + tok.encode(text, add_special_tokens=False).ids
                out.append({"ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
                break
    for bad in [b"\xff", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82",
                b"a\xe2\x82b", b"\xf0\x9f\x98", b"\xe0\x80\x80"]:
        ids = [byte_token(tok, b) for b in bad]
        out.append({"ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    return out


_BYTE_CHARS = None


def byte_token(tok, b):
    """The id of the single-byte token for byte b (GPT-2's byte-to-unicode map)."""
    global _BYTE_CHARS
    if _BYTE_CHARS is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
        cs = bs[:]
        n = 0
        for x in range(256):
            if x not in bs:
                bs.append(x)
                cs.append(256 + n)
                n += 1
        _BYTE_CHARS = {x: chr(c) for x, c in zip(bs, cs)}
    return tok.token_to_id(_BYTE_CHARS[b])


def cases_for(name, tok, texts):
    out = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        out.append({"tokenizer": name, "text": text, "ids": ids,
                    "decoded": tok.decode(ids, skip_special_tokens=False),
                    "decoded_skip": tok.decode(ids, skip_special_tokens=True)})
    return out


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    corpus_path = os.path.join(out, "corpus.txt")
    text = corpus()
    with open(corpus_path, "w", encoding="utf-8") as f:
        f.write(text)
    corpus_lines = set(text.split("\n"))
    for t in TEXTS + CRAFTED_TEXTS:
        assert t == "" or t not in corpus_lines, f"test text in the corpus: {t!r}"

    toks = {}
    gpt2 = train(base_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)),
                 corpus_path, ["<|endoftext|>"], 600)
    toks["gpt2"] = save(gpt2, out, "gpt2")

    legacy = json.loads(gpt2.to_str())
    legacy["model"]["merges"] = [f"{a} {b}" for a, b in legacy["model"]["merges"]]
    toks["gpt2_legacy"] = save(json.dumps(legacy, ensure_ascii=False), out, "gpt2_legacy")

    llama_pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    llama = train(base_tokenizer(llama_pre), corpus_path,
                  ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], 900)
    llama.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>",
                                                       llama.token_to_id("<|begin_of_text|>"))])])
    doc = json.loads(llama.to_str())
    doc["model"]["ignore_merges"] = True
    toks["llama3"] = save(json.dumps(doc, ensure_ascii=False), out, "llama3")

    qwen_pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    qwen = train(base_tokenizer(qwen_pre, normalizers.NFC()), corpus_path,
                 ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 700)
    toks["qwen2"] = save(qwen, out, "qwen2")

    toks["crafted"] = save(crafted(unk=False), out, "crafted")
    toks["crafted_unk"] = save(crafted(unk=True), out, "crafted_unk")

    cases = []
    for name in ["gpt2", "gpt2_legacy", "llama3"]:
        cases += cases_for(name, toks[name], TEXTS)
    # remat applies no normalizer: the NFC tokenizer gets NFC text only.
    nfc_texts = [t for t in TEXTS if unicodedata.is_normalized("NFC", t)]
    assert len(nfc_texts) < len(TEXTS), "a text that is not NFC is expected among TEXTS"
    cases += cases_for("qwen2", toks["qwen2"], nfc_texts)
    for name in ["crafted", "crafted_unk"]:
        cases += cases_for(name, toks[name], CRAFTED_TEXTS + TEXTS[:4])
    cut = []
    for name in ["gpt2", "llama3"]:
        for c in cut_cases(toks[name], TEXTS):
            c["tokenizer"] = name
            cut.append(c)
    # The BOS and eot ids the tokenizers name.
    named = {"llama3": {"bos": toks["llama3"].token_to_id("<|begin_of_text|>"),
                        "eot": toks["llama3"].token_to_id("<|end_of_text|>")},
             "gpt2": {"bos": -1, "eot": toks["gpt2"].token_to_id("<|endoftext|>")},
             "qwen2": {"bos": -1, "eot": toks["qwen2"].token_to_id("<|endoftext|>")}}
    vocab_sizes = {n: t.get_vocab_size(with_added_tokens=True) for n, t in toks.items()}
    with open(os.path.join(out, "cases.json"), "w", encoding="utf-8") as f:
        json.dump({"encode": cases, "decode": cut, "named": named, "vocab_size": vocab_sizes}, f,
                  ensure_ascii=False, indent=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
