#!/usr/bin/env python3
"""Writes random-token shards in llm.c's format for throughput runs (no corpus needed).

    python3 bench/gpu/make_shard.py OUTDIR [--tokens N] [--val-tokens N] [--vocab V] [--seed S]
    python3 bench/gpu/make_shard.py --check FILE...

Writes OUTDIR/train_000000.bin and OUTDIR/val_000000.bin. A shard is a header of 256
little-endian int32 (magic 20240520, version 1, token count, the rest zero) followed by the
tokens as little-endian uint16. Tokens are uniform in [0, V) from a seeded generator, so the
same arguments give the same bytes on any machine. Random tokens carry nothing to learn (the
loss stays near ln V): they are for timing and memory, not for quality.

Only the standard library is used (the GPU machine may lack numpy). --check validates the
header and size of existing shards and prints one line per file.
"""
import argparse
import array
import os
import random
import struct
import sys

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


def random_tokens(n, vocab, seed):
    """n tokens in [0, vocab) as an array('H'), deterministic in (n, vocab, seed)."""
    if not 0 < vocab <= 65536:
        raise ValueError(f"vocab {vocab} does not fit uint16 tokens")
    rng = random.Random(seed)
    # 32 random bits per token, reduced modulo vocab (the bias, under 2^-16, is irrelevant here).
    words = array.array("I" if array.array("I").itemsize == 4 else "L")
    nbytes = 4 * n
    words.frombytes(rng.getrandbits(8 * nbytes).to_bytes(nbytes, "little") if n else b"")
    if sys.byteorder == "big":
        words.byteswap()
    return array.array("H", [w % vocab for w in words])


def write_shard(path, tokens):
    header = [0] * HEADER_INTS
    header[0], header[1], header[2] = MAGIC, VERSION, len(tokens)
    body = array.array("H", tokens)
    if sys.byteorder == "big":
        body.byteswap()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<%di" % HEADER_INTS, *header))
        f.write(body.tobytes())
    os.replace(tmp, path)


def check_shard(path, vocab=None):
    """Returns (ok, message) for one shard file."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        return False, f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header"
    with open(path, "rb") as f:
        header = struct.unpack("<%di" % HEADER_INTS, f.read(HEADER_BYTES))
        body = f.read()
    magic, version, n = header[:3]
    if magic != MAGIC:
        return False, f"{path}: magic {magic}, expected {MAGIC}"
    if version != VERSION:
        return False, f"{path}: version {version}, expected {VERSION}"
    if size != HEADER_BYTES + 2 * n:
        return False, f"{path}: header says {n} tokens but the file holds {size} bytes"
    toks = array.array("H")
    toks.frombytes(body)
    if sys.byteorder == "big":
        toks.byteswap()
    top = max(toks) if n else -1
    if vocab is not None and top >= vocab:
        return False, f"{path}: token {top} >= vocab {vocab}"
    return True, f"{path}: {n} tokens, max token {top}, {size} bytes"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outdir", nargs="?", help="directory for train_000000.bin and val_000000.bin")
    p.add_argument("--tokens", type=int, default=2_000_000, help="training tokens (default 2M)")
    p.add_argument("--val-tokens", type=int, default=262_144, help="validation tokens")
    p.add_argument("--vocab", type=int, default=50257, help="tokens are drawn from [0, vocab)")
    p.add_argument("--seed", type=int, default=20240520, help="generator seed")
    p.add_argument("--check", nargs="+", metavar="FILE", help="validate existing shards instead")
    a = p.parse_args(argv)

    if a.check:
        bad = 0
        for path in a.check:
            ok, msg = check_shard(path, a.vocab)
            print(("ok " if ok else "BAD ") + msg)
            bad += not ok
        return 1 if bad else 0
    if not a.outdir:
        p.error("OUTDIR is required (or --check FILE...)")
    if a.tokens < 1 or a.val_tokens < 1:
        p.error("--tokens and --val-tokens must be positive")
    os.makedirs(a.outdir, exist_ok=True)
    for name, n, seed in (("train", a.tokens, a.seed), ("val", a.val_tokens, a.seed + 1)):
        path = os.path.join(a.outdir, f"{name}_000000.bin")
        write_shard(path, random_tokens(n, a.vocab, seed))
        print(f"wrote {path}: {n} tokens in [0, {a.vocab}), seed {seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
