#!/usr/bin/env python3
"""Independent float64 numpy reference for GPT-2 training (forward, hand-written backward, AdamW).

Written from the GPT-2 math and llm.c's file formats only, not from remat's kernels, so that it
can check remat's per-step training losses.

Subcommands:
  write-model  OUT.bin --layers L --channels C --heads NH --vocab V [--max-seq T] [--seed S]
               random GPT-2-shaped checkpoint in llm.c's fp32 format (version 3)
  write-shard  OUT.bin --vocab V --tokens N [--seed S]
               random token shard in llm.c's format
  train        --model M.bin --data D.bin --batch B --seq T --steps N --lr LR
               [--beta1 --beta2 --eps --weight-decay] [--json OUT.json]
               trains in float64 and prints the loss of every step (before its update)
  compare      --remat LOG.jsonl --reference REF.json [--rtol 1e-4]
               prints both loss columns and PASS/FAIL; exit status 1 on failure
  self-test    finite-difference check of the backward, and a naive-loop check of the forward

Conventions (llm.c):
  model header: 256 int32: magic 20240326, version 3, maxT, V, L, NH, C, Vp; then fp32 params
  in the order wte (Vp,C), wpe (maxT,C), ln1w (L,C), ln1b (L,C), qkvw (L,3C,C), qkvb (L,3C),
  attprojw (L,C,C), attprojb (L,C), ln2w (L,C), ln2b (L,C), fcw (L,4C,C), fcb (L,4C),
  fcprojw (L,C,4C), fcprojb (L,C), lnfw (C), lnfb (C).
  shard header: 256 int32: magic 20240520, version 1, ntokens; then uint16 tokens.
  batch k of the shard: tokens [k*B*T, k*B*T + B*T + 1): inputs the first B*T, targets shifted by 1.
"""
import argparse
import json
import math
import sys

import numpy as np

MODEL_MAGIC = 20240326
MODEL_VERSION_FP32 = 3
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
LN_EPS = 1e-5
GELU_S = math.sqrt(2.0 / math.pi)

PARAM_NAMES = ["wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
               "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb"]


def padded_vocab(V):
    return ((V + 127) // 128) * 128


def param_shapes(cfg):
    Vp, maxT, L, C = cfg["Vp"], cfg["maxT"], cfg["L"], cfg["C"]
    return {
        "wte": (Vp, C), "wpe": (maxT, C),
        "ln1w": (L, C), "ln1b": (L, C),
        "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C),
        "attprojw": (L, C, C), "attprojb": (L, C),
        "ln2w": (L, C), "ln2b": (L, C),
        "fcw": (L, 4 * C, C), "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
        "lnfw": (C,), "lnfb": (C,),
    }


# ----------------------------------------------------------------------------------------------
# files

def write_model(path, cfg, params):
    header = np.zeros(256, dtype=np.int32)
    header[0] = MODEL_MAGIC
    header[1] = MODEL_VERSION_FP32
    header[2] = cfg["maxT"]
    header[3] = cfg["V"]
    header[4] = cfg["L"]
    header[5] = cfg["NH"]
    header[6] = cfg["C"]
    header[7] = cfg["Vp"]
    shapes = param_shapes(cfg)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for name in PARAM_NAMES:
            a = np.asarray(params[name])
            assert a.shape == shapes[name], (name, a.shape, shapes[name])
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())


def read_model(path):
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(256 * 4), dtype="<i4")
        if header[0] != MODEL_MAGIC:
            raise ValueError(f"{path}: bad model magic {header[0]}")
        if header[1] != MODEL_VERSION_FP32:
            raise ValueError(f"{path}: model version {header[1]} (only 3 = fp32 is supported)")
        cfg = {"maxT": int(header[2]), "V": int(header[3]), "L": int(header[4]),
               "NH": int(header[5]), "C": int(header[6]), "Vp": int(header[7])}
        shapes = param_shapes(cfg)
        total = sum(int(np.prod(s)) for s in shapes.values())
        flat = np.frombuffer(f.read(total * 4), dtype="<f4")
        if flat.size != total:
            raise ValueError(f"{path}: expected {total} parameters, found {flat.size}")
        if f.read(1):
            raise ValueError(f"{path}: trailing bytes after the parameters")
    params = {}
    off = 0
    for name in PARAM_NAMES:
        n = int(np.prod(shapes[name]))
        params[name] = flat[off:off + n].astype(np.float64).reshape(shapes[name])
        off += n
    return cfg, params


def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    assert tokens.min() >= 0 and tokens.max() < 65536
    header = np.zeros(256, dtype=np.int32)
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = tokens.size
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def read_shard(path):
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(256 * 4), dtype="<i4")
        if header[0] != SHARD_MAGIC:
            raise ValueError(f"{path}: bad shard magic {header[0]}")
        if header[1] != SHARD_VERSION:
            raise ValueError(f"{path}: shard version {header[1]}")
        n = int(header[2])
        toks = np.frombuffer(f.read(n * 2), dtype="<u2")
        if toks.size != n:
            raise ValueError(f"{path}: header says {n} tokens, file holds {toks.size}")
    return toks.astype(np.int64)


def random_params(cfg, rng, std=0.02, ln_jitter=0.1, bias_std=0.02):
    """GPT-2-like random init: linear and embedding weights N(0, std); LayerNorm weights near 1,
    biases small but non-zero (so every parameter matters from the first forward pass). The
    padded rows of wte are random too: they must neither get probability nor change."""
    shapes = param_shapes(cfg)
    p = {}
    for name in PARAM_NAMES:
        s = shapes[name]
        if name in ("ln1w", "ln2w", "lnfw"):
            p[name] = 1.0 + ln_jitter * rng.standard_normal(s)
        elif name in ("ln1b", "ln2b", "lnfb", "qkvb", "attprojb", "fcb", "fcprojb"):
            p[name] = bias_std * rng.standard_normal(s)
        else:
            p[name] = std * rng.standard_normal(s)
    return p


# ----------------------------------------------------------------------------------------------
# forward / backward (float64)

def layernorm_forward(x, w, b):
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)  # biased variance
    rstd = 1.0 / np.sqrt(var + LN_EPS)
    xhat = xc * rstd
    return xhat * w + b, (xhat, rstd)


def layernorm_backward(dy, cache, w):
    xhat, rstd = cache
    dw = (dy * xhat).sum(axis=(0, 1))
    db = dy.sum(axis=(0, 1))
    dxhat = dy * w
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dw, db


def linear_forward(x, w, b):
    # y = x @ W^T + b, W stored (out, in)
    return x @ w.T + b


def linear_backward(dy, x, w):
    C_in = x.shape[-1]
    C_out = dy.shape[-1]
    dx = dy @ w
    dw = dy.reshape(-1, C_out).T @ x.reshape(-1, C_in)
    db = dy.reshape(-1, C_out).sum(axis=0)
    return dx, dw, db


def gelu_forward(x):
    return 0.5 * x * (1.0 + np.tanh(GELU_S * (x + 0.044715 * x ** 3)))


def gelu_backward(dy, x):
    u = GELU_S * (x + 0.044715 * x ** 3)
    th = np.tanh(u)
    du = GELU_S * (1.0 + 3.0 * 0.044715 * x * x)
    return dy * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du)


def attention_forward(qkv, NH):
    B, T, C3 = qkv.shape
    C = C3 // 3
    HD = C // NH
    q = qkv[:, :, 0:C].reshape(B, T, NH, HD).transpose(0, 2, 1, 3)
    k = qkv[:, :, C:2 * C].reshape(B, T, NH, HD).transpose(0, 2, 1, 3)
    v = qkv[:, :, 2 * C:3 * C].reshape(B, T, NH, HD).transpose(0, 2, 1, 3)
    scale = 1.0 / math.sqrt(HD)
    s = (q @ k.transpose(0, 1, 3, 2)) * scale  # (B, NH, T, T)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    s = np.where(future, -np.inf, s)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p = p / p.sum(axis=-1, keepdims=True)
    y = p @ v  # (B, NH, T, HD)
    out = y.transpose(0, 2, 1, 3).reshape(B, T, C)
    return out, (q, k, v, p, scale)


def attention_backward(dout, cache, NH):
    q, k, v, p, scale = cache
    B, NH_, T, HD = q.shape
    C = NH * HD
    dy = dout.reshape(B, T, NH, HD).transpose(0, 2, 1, 3)
    dp = dy @ v.transpose(0, 1, 3, 2)          # (B, NH, T, T)
    dv = p.transpose(0, 1, 3, 2) @ dy          # (B, NH, T, HD)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # masked entries have p == 0
    ds = ds * scale
    dq = ds @ k
    dk = ds.transpose(0, 1, 3, 2) @ q
    dqkv = np.empty((B, T, 3 * C))
    dqkv[:, :, 0:C] = dq.transpose(0, 2, 1, 3).reshape(B, T, C)
    dqkv[:, :, C:2 * C] = dk.transpose(0, 2, 1, 3).reshape(B, T, C)
    dqkv[:, :, 2 * C:3 * C] = dv.transpose(0, 2, 1, 3).reshape(B, T, C)
    return dqkv


def forward_backward(cfg, params, inputs, targets, need_grad=True):
    """Mean cross-entropy loss over all B*T positions, and the gradient of every parameter."""
    V, L, NH = cfg["V"], cfg["L"], cfg["NH"]
    B, T = inputs.shape
    assert T <= cfg["maxT"]
    assert inputs.max() < V and targets.max() < V and inputs.min() >= 0 and targets.min() >= 0
    P = params

    x = P["wte"][inputs] + P["wpe"][:T][None, :, :]
    caches = []
    for l in range(L):
        c = {"x_in": x}
        ln1, c["ln1"] = layernorm_forward(x, P["ln1w"][l], P["ln1b"][l])
        c["ln1_out"] = ln1
        qkv = linear_forward(ln1, P["qkvw"][l], P["qkvb"][l])
        atty, c["att"] = attention_forward(qkv, NH)
        c["atty"] = atty
        x = x + linear_forward(atty, P["attprojw"][l], P["attprojb"][l])
        c["x_mid"] = x
        ln2, c["ln2"] = layernorm_forward(x, P["ln2w"][l], P["ln2b"][l])
        c["ln2_out"] = ln2
        fch = linear_forward(ln2, P["fcw"][l], P["fcb"][l])
        c["fch"] = fch
        g = gelu_forward(fch)
        c["gelu"] = g
        x = x + linear_forward(g, P["fcprojw"][l], P["fcprojb"][l])
        caches.append(c)
    xf, lnf_cache = layernorm_forward(x, P["lnfw"], P["lnfb"])
    wte_v = P["wte"][:V]  # the padded rows never take part in the softmax
    logits = xf @ wte_v.T  # (B, T, V)
    m = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - m)
    z = e.sum(axis=-1, keepdims=True)
    logp = logits - m - np.log(z)
    bi, ti = np.meshgrid(np.arange(B), np.arange(T), indexing="ij")
    loss = -logp[bi, ti, targets].mean()
    if not need_grad:
        return loss, None

    G = {name: np.zeros_like(P[name]) for name in PARAM_NAMES}
    dlogits = e / z
    dlogits[bi, ti, targets] -= 1.0
    dlogits /= (B * T)
    dxf = dlogits @ wte_v
    G["wte"][:V] += dlogits.reshape(-1, V).T @ xf.reshape(-1, xf.shape[-1])
    dx, G["lnfw"], G["lnfb"] = layernorm_backward(dxf, lnf_cache, P["lnfw"])
    for l in reversed(range(L)):
        c = caches[l]
        # x = x_mid + fcproj(gelu(fc(ln2(x_mid))))
        dg, G["fcprojw"][l], G["fcprojb"][l] = linear_backward(dx, c["gelu"], P["fcprojw"][l])
        dfch = gelu_backward(dg, c["fch"])
        dln2, G["fcw"][l], G["fcb"][l] = linear_backward(dfch, c["ln2_out"], P["fcw"][l])
        dxm, G["ln2w"][l], G["ln2b"][l] = layernorm_backward(dln2, c["ln2"], P["ln2w"][l])
        dx = dx + dxm
        # x_mid = x_in + attproj(attn(qkv(ln1(x_in))))
        datty, G["attprojw"][l], G["attprojb"][l] = linear_backward(dx, c["atty"], P["attprojw"][l])
        dqkv = attention_backward(datty, c["att"], NH)
        dln1, G["qkvw"][l], G["qkvb"][l] = linear_backward(dqkv, c["ln1_out"], P["qkvw"][l])
        dxi, G["ln1w"][l], G["ln1b"][l] = layernorm_backward(dln1, c["ln1"], P["ln1w"][l])
        dx = dx + dxi
    np.add.at(G["wte"], inputs.reshape(-1), dx.reshape(-1, dx.shape[-1]))
    G["wpe"][:T] += dx.sum(axis=0)
    return loss, G


def naive_loss(cfg, P, inputs, targets):
    """Loop-by-loop forward straight from the GPT-2 definition (slow; tiny models only). It
    cross-checks the vectorised forward's reshapes, head split, causal mask and padding."""
    V, L, NH, C = cfg["V"], cfg["L"], cfg["NH"], cfg["C"]
    HD = C // NH
    B, T = inputs.shape

    def ln(v, w, b):
        mu = sum(v) / len(v)
        var = sum((a - mu) ** 2 for a in v) / len(v)
        return np.array([(v[i] - mu) / math.sqrt(var + LN_EPS) * w[i] + b[i] for i in range(len(v))])

    def gelu(a):
        return 0.5 * a * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a ** 3)))

    total = 0.0
    for b in range(B):
        xs = [P["wte"][inputs[b, t]] + P["wpe"][t] for t in range(T)]
        for l in range(L):
            qs, ks, vs = [], [], []
            for t in range(T):
                h = ln(xs[t], P["ln1w"][l], P["ln1b"][l])
                qkv = np.array([np.dot(P["qkvw"][l][o], h) + P["qkvb"][l][o] for o in range(3 * C)])
                qs.append(qkv[:C]); ks.append(qkv[C:2 * C]); vs.append(qkv[2 * C:])
            new = []
            for t in range(T):
                y = np.zeros(C)
                for hh in range(NH):
                    sl = slice(hh * HD, (hh + 1) * HD)
                    sc = [np.dot(qs[t][sl], ks[u][sl]) / math.sqrt(HD) for u in range(t + 1)]
                    mx = max(sc)
                    ex = [math.exp(a - mx) for a in sc]
                    zz = sum(ex)
                    for u in range(t + 1):
                        y[sl] += ex[u] / zz * vs[u][sl]
                proj = np.array([np.dot(P["attprojw"][l][o], y) + P["attprojb"][l][o] for o in range(C)])
                new.append(xs[t] + proj)
            xs = new
            new = []
            for t in range(T):
                h = ln(xs[t], P["ln2w"][l], P["ln2b"][l])
                f = np.array([gelu(np.dot(P["fcw"][l][o], h) + P["fcb"][l][o]) for o in range(4 * C)])
                proj = np.array([np.dot(P["fcprojw"][l][o], f) + P["fcprojb"][l][o] for o in range(C)])
                new.append(xs[t] + proj)
            xs = new
        for t in range(T):
            h = ln(xs[t], P["lnfw"], P["lnfb"])
            lg = [np.dot(P["wte"][i], h) for i in range(V)]
            mx = max(lg)
            lse = mx + math.log(sum(math.exp(a - mx) for a in lg))
            total += lse - lg[targets[b, t]]
    return total / (B * T)


# ----------------------------------------------------------------------------------------------
# training

class AdamW:
    """m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr (mhat/(sqrt(vhat)+eps) + wd p)."""

    def __init__(self, params, lr, beta1, beta2, eps, weight_decay):
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, beta1, beta2, eps, weight_decay
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        c1 = 1.0 - self.b1 ** self.t
        c2 = 1.0 - self.b2 ** self.t
        for k in params:
            g = grads[k]
            m = self.m[k]
            v = self.v[k]
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * g * g
            upd = (m / c1) / (np.sqrt(v / c2) + self.eps) + self.wd * params[k]
            params[k] -= self.lr * upd


def get_batch(tokens, k, B, T):
    n = B * T
    start = k * n
    if start + n + 1 > tokens.size:
        raise ValueError(f"shard has {tokens.size} tokens; batch {k} needs {start + n + 1}")
    buf = tokens[start:start + n + 1]
    return buf[:-1].reshape(B, T), buf[1:].reshape(B, T)


def train(cfg, params, tokens, B, T, steps, lr, beta1, beta2, eps, wd, verbose=True):
    """Returns the loss and the global gradient norm of every step (both before its update)."""
    opt = AdamW(params, lr, beta1, beta2, eps, wd)
    losses, norms = [], []
    for s in range(steps):
        x, y = get_batch(tokens, s, B, T)
        loss, grads = forward_backward(cfg, params, x, y)
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
        losses.append(float(loss))
        norms.append(norm)
        if verbose:
            print(f"reference step {s + 1}/{steps} | loss {loss:.9f} | norm {norm:.6f}", flush=True)
        opt.step(params, grads)
    return losses, norms


# ----------------------------------------------------------------------------------------------
# self-test

def self_test(seed=1234):
    rng = np.random.default_rng(seed)
    ok = True

    def report(name, good, detail):
        nonlocal ok
        ok = ok and good
        print(f"  {'ok  ' if good else 'FAIL'} {name}: {detail}")

    # tiny model; T < maxT so that rows of wpe go unused, V not a multiple of 128 so wte has padding
    cfg = {"L": 2, "C": 16, "NH": 4, "V": 37, "maxT": 9}
    cfg["Vp"] = padded_vocab(cfg["V"])
    B, T = 2, 7
    # larger weights than GPT-2's 0.02 so that every nonlinearity is exercised
    params = random_params(cfg, rng, std=0.3, ln_jitter=0.3, bias_std=0.2)
    inputs = rng.integers(0, cfg["V"], size=(B, T))
    targets = rng.integers(0, cfg["V"], size=(B, T))

    print("forward vs a naive loop implementation")
    loss, grads = forward_backward(cfg, params, inputs, targets)
    ref = naive_loss(cfg, params, inputs, targets)
    rel = abs(loss - ref) / abs(ref)
    report("loss", rel < 1e-12, f"vectorised {loss:.15f} naive {ref:.15f} rel {rel:.2e}")

    print("sanity")
    zero = {k: np.zeros_like(v) for k, v in params.items()}
    zero["ln1w"][:] = 1; zero["ln2w"][:] = 1; zero["lnfw"][:] = 1
    zero["wte"][cfg["V"]:] = 5.0  # padded rows must not take part in the softmax
    z_loss, _ = forward_backward(cfg, zero, inputs, targets, need_grad=False)
    report("all-zero model loss == ln(V)", abs(z_loss - math.log(cfg["V"])) < 1e-12,
           f"{z_loss:.15f} vs {math.log(cfg['V']):.15f}")
    report("padded wte rows get zero gradient", np.all(grads["wte"][cfg["V"]:] == 0), "")
    report("unused wpe rows get zero gradient", np.all(grads["wpe"][T:] == 0), "")
    causal_in = inputs.copy()
    causal_in[:, -1] = (causal_in[:, -1] + 1) % cfg["V"]
    # changing the last input must not change the loss at the earlier positions: compare the
    # per-position loss with T-1 positions on both inputs
    l1, _ = forward_backward(cfg, params, inputs[:, :-1], targets[:, :-1], need_grad=False)
    l2, _ = forward_backward(cfg, params, causal_in[:, :-1], targets[:, :-1], need_grad=False)
    report("prefix loss independent of a later token", l1 == l2, f"{l1} {l2}")

    print("backward vs central finite differences (h = 1e-5)")
    h = 1e-5
    for name in PARAM_NAMES:
        p = params[name]
        flat_idx = rng.choice(p.size, size=min(6, p.size), replace=False)
        if name == "wte":  # make sure an input row, a target-only row and a padded row are hit
            flat_idx = np.concatenate([flat_idx, [inputs[0, 0] * cfg["C"] + 3,
                                                  targets[1, 2] * cfg["C"] + 5,
                                                  (cfg["V"] + 2) * cfg["C"] + 1]])
        worst = 0.0
        for fi in flat_idx:
            idx = np.unravel_index(fi, p.shape)
            old = p[idx]
            p[idx] = old + h
            lp, _ = forward_backward(cfg, params, inputs, targets, need_grad=False)
            p[idx] = old - h
            lm, _ = forward_backward(cfg, params, inputs, targets, need_grad=False)
            p[idx] = old
            fd = (lp - lm) / (2 * h)
            an = grads[name][idx]
            err = abs(fd - an) / max(abs(fd), abs(an), 1e-7)
            worst = max(worst, err)
        report(name, worst < 1e-5, f"worst relative error {worst:.2e} over {len(flat_idx)} entries")

    # whole-gradient directional derivative along a random direction
    d = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    d["wte"][cfg["V"]:] = 0  # (padded rows are checked above)
    an = sum(float((grads[k] * d[k]).sum()) for k in PARAM_NAMES)
    hd = 1e-6
    pp = {k: params[k] + hd * d[k] for k in PARAM_NAMES}
    pm = {k: params[k] - hd * d[k] for k in PARAM_NAMES}
    lp, _ = forward_backward(cfg, pp, inputs, targets, need_grad=False)
    lm, _ = forward_backward(cfg, pm, inputs, targets, need_grad=False)
    fd = (lp - lm) / (2 * hd)
    err = abs(fd - an) / abs(fd)
    report("directional derivative", err < 1e-6, f"analytic {an:.10f} fd {fd:.10f} rel {err:.2e}")

    print("AdamW first step is lr * g / (|g| + eps) per element")
    p1 = {k: v.copy() for k, v in params.items()}
    opt = AdamW(p1, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)
    opt.step(p1, grads)
    expect = params["qkvw"] - 1e-3 * grads["qkvw"] / (np.abs(grads["qkvw"]) + 1e-8)
    report("adamw step 1", np.allclose(p1["qkvw"], expect, rtol=1e-12, atol=1e-15), "")
    report("adamw leaves padded rows", np.array_equal(p1["wte"][cfg["V"]:], params["wte"][cfg["V"]:]), "")

    print("self-test", "PASSED" if ok else "FAILED")
    return ok


# ----------------------------------------------------------------------------------------------
# comparison

def read_remat_log(path):
    """remat's --log: one JSON object per line with at least "step" and "loss"."""
    rows = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "step" in obj and "loss" in obj:
                rows[int(obj["step"])] = obj
    return rows


def compare(remat_log, ref_json, rtol, title=""):
    """Every reference loss must match remat's loss of the same step to rtol (relative). The
    gradient norms are shown too, for diagnosis only: the claim is about the losses."""
    with open(ref_json) as f:
        ref = json.load(f)
    ref_loss = ref["losses"]
    ref_norm = ref.get("grad_norms", [None] * len(ref_loss))
    got = read_remat_log(remat_log)
    ok = True
    worst = 0.0
    worst_norm = 0.0
    if title:
        print(title)
    print(f"{'step':>5} {'remat loss':>14} {'reference loss':>16} {'rel diff':>9}   "
          f"{'remat norm':>12} {'ref norm':>12} {'rel diff':>9}")
    for i, r in enumerate(ref_loss):
        s = i + 1
        if s not in got:
            print(f"{s:>5} {'(missing)':>14} {r:>16.9f}")
            ok = False
            continue
        g = float(got[s]["loss"])
        rel = abs(g - r) / abs(r) if math.isfinite(g) else math.inf
        worst = max(worst, rel)
        line = f"{s:>5} {g:>14.9f} {r:>16.9f} {rel:>9.2e}"
        rn = ref_norm[i]
        gn = got[s].get("grad_norm")
        if rn is not None and gn is not None:
            nrel = abs(float(gn) - rn) / max(abs(rn), 1e-30)
            worst_norm = max(worst_norm, nrel)
            line += f"   {float(gn):>12.7f} {rn:>12.7f} {nrel:>9.2e}"
        if not rel <= rtol:
            line += "  <-- loss exceeds tolerance"
            ok = False
        print(line)
    extra = sorted(k for k in got if k > len(ref_loss))
    if extra:
        print(f"note: remat logged {len(extra)} step(s) beyond the reference's {len(ref_loss)}")
    print(f"max relative loss difference {worst:.3e} (tolerance {rtol:g}); "
          f"max relative grad-norm difference {worst_norm:.3e} (not checked): "
          f"{'PASS' if ok else 'FAIL'}")
    return ok


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("write-model")
    w.add_argument("out")
    w.add_argument("--layers", type=int, required=True)
    w.add_argument("--channels", type=int, required=True)
    w.add_argument("--heads", type=int, required=True)
    w.add_argument("--vocab", type=int, required=True)
    w.add_argument("--max-seq", type=int, default=64)
    w.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("write-shard")
    s.add_argument("out")
    s.add_argument("--vocab", type=int, required=True)
    s.add_argument("--tokens", type=int, required=True)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--successors", type=int, default=0,
                   help="0: i.i.d. uniform tokens; K > 0: a random Markov chain where each token "
                        "has K possible successors (learnable, so the loss moves in a few steps)")

    t = sub.add_parser("train")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--batch", type=int, required=True)
    t.add_argument("--seq", type=int, required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--lr", type=float, required=True)
    t.add_argument("--beta1", type=float, default=0.9)
    t.add_argument("--beta2", type=float, default=0.95)
    t.add_argument("--eps", type=float, default=1e-8)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--json")

    c = sub.add_parser("compare")
    c.add_argument("--remat", required=True)
    c.add_argument("--reference", required=True)
    c.add_argument("--rtol", type=float, default=1e-4)
    c.add_argument("--title", default="")

    sub.add_parser("self-test")

    a = ap.parse_args(argv)
    if a.cmd == "write-model":
        if a.channels % a.heads:
            ap.error("channels must be a multiple of heads")
        cfg = {"L": a.layers, "C": a.channels, "NH": a.heads, "V": a.vocab, "maxT": a.max_seq,
               "Vp": padded_vocab(a.vocab)}
        write_model(a.out, cfg, random_params(cfg, np.random.default_rng(a.seed)))
        return 0
    if a.cmd == "write-shard":
        rng = np.random.default_rng(a.seed)
        if a.successors <= 0:
            toks = rng.integers(0, a.vocab, size=a.tokens)
        else:
            succ = rng.integers(0, a.vocab, size=(a.vocab, a.successors))
            choice = rng.integers(0, a.successors, size=a.tokens)
            toks = np.empty(a.tokens, dtype=np.int64)
            toks[0] = rng.integers(0, a.vocab)
            for i in range(1, a.tokens):
                toks[i] = succ[toks[i - 1], choice[i]]
        write_shard(a.out, toks)
        return 0
    if a.cmd == "train":
        cfg, params = read_model(a.model)
        tokens = read_shard(a.data)
        losses, norms = train(cfg, params, tokens, a.batch, a.seq, a.steps, a.lr, a.beta1,
                              a.beta2, a.eps, a.weight_decay)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"config": cfg, "batch": a.batch, "seq": a.seq, "lr": a.lr,
                           "beta1": a.beta1, "beta2": a.beta2, "eps": a.eps,
                           "weight_decay": a.weight_decay, "losses": losses, "grad_norms": norms}, f, indent=1)
        return 0
    if a.cmd == "compare":
        return 0 if compare(a.remat, a.reference, a.rtol, a.title) else 1
    if a.cmd == "self-test":
        return 0 if self_test() else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
