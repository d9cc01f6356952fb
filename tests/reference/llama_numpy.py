#!/usr/bin/env python3
"""Independent float64 numpy reference for Llama-family training (Llama, Qwen2, Mistral):
forward, hand-written backward, AdamW.

Written from the model's math (Hugging Face's LlamaForCausalLM) and the Hugging Face / safetensors
file formats only, not from remat's kernels, so that it can check remat's per-step training
losses. The GPT-2 counterpart is gpt2_numpy.py, whose token-shard format, batching and
comparison this file reuses.

Subcommands:
  write-model  DIR --model-type llama|qwen2|mistral --layers L --channels C --heads NH
               --kv-heads NKV --intermediate I --vocab V --max-seq T [--tied|--untied]
               [--qkv-bias] [--rope-theta 10000] [--rms-eps 1e-5] [--seed S]
               random Llama-shaped Hugging Face directory: DIR/config.json, DIR/model.safetensors
  write-shard  OUT.bin --vocab V --tokens N [--seed S] [--successors K]
               random token shard in llm.c's format (as gpt2_numpy.py writes it)
  train        --model DIR --data D.bin --batch B --seq T --steps N --lr LR
               [--beta1 --beta2 --eps --weight-decay] [--json OUT.json]
               trains in float64 and prints the loss of every step (before its update)
  compare      --remat LOG.jsonl --reference REF.json [--rtol 1e-6]
               prints both loss columns and PASS/FAIL; exit status 1 on failure
  self-test    finite-difference check of the backward (grouped-query attention, biases, tied
               and untied head), and a naive-loop check of the forward

The model (per token row x of width C; HD = C / NH, each kv head serves NH / NKV query heads):
  x = embed[tokens]
  per layer:  h = rmsnorm(x) * w_in,   rmsnorm(x) = x / sqrt(mean(x^2) + eps)
              q = h Wq^T (+ bq), k = h Wk^T (+ bk), v = h Wv^T (+ bv)      (per head, HD wide)
              q, k = rope(q), rope(k)   rotate-half: for i < HD/2, angle = t inv_freq_i,
                out[i] = x[i] cos - x[i + HD/2] sin,  out[i + HD/2] = x[i + HD/2] cos + x[i] sin,
                inv_freq_i = 1 / theta^(2i / HD); inv_freq and the angle in float32 as Hugging
                Face computes them, cos and sin in float64 of that float32 angle
              query head h attends with kv head h // (NH / NKV): causal softmax(q k^T / sqrt(HD)) v
              x = x + attn Wo^T (+ bo: Llama's attention_bias also biases o_proj)
              h2 = rmsnorm(x) * w_post
              x = x + (silu(h2 Wgate^T) * (h2 Wup^T)) Wdown^T
  logits = (rmsnorm(x) * w_norm) W^T, W = embed (tied) or lm_head; mean cross-entropy over B*T.
AdamW (as remat applies it): decoupled decay on the 2-D tensors (matrices and embeddings) only,
not on norm weights or biases; bias correction; no gradient clipping.

safetensors: uint64 little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}} (space-padded to a multiple of 8), then
the raw little-endian data, offsets relative to the end of the header.
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt2_numpy  # noqa: E402  (shards, batches and the loss comparison are the same)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mistral": "MistralForCausalLM"}


# ----------------------------------------------------------------------------------------------
# configuration and parameters

def make_config(model_type, L, C, NH, NKV, I, V, maxT, tied, bias, theta=10000.0, eps=1e-5):
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unknown model type {model_type!r} (llama, qwen2, mistral)")
    if C % NH or NH % NKV or (C // NH) % 2:
        raise ValueError(f"C={C} NH={NH} NKV={NKV}: C must be a multiple of NH, NH of NKV, "
                         "and the head dimension even")
    if model_type == "qwen2":
        bias = True  # Qwen2 always has q, k, v biases (and none on o_proj)
    if model_type == "mistral" and bias:
        raise ValueError("Mistral has no attention biases")
    return {"model_type": model_type, "L": L, "C": C, "NH": NH, "NKV": NKV, "HD": C // NH,
            "I": I, "V": V, "maxT": maxT, "tied": bool(tied), "qkv_bias": bool(bias),
            # Hugging Face's Llama attention_bias puts a bias on o_proj too; Qwen2 does not
            "o_bias": bool(bias) and model_type == "llama",
            "theta": float(theta), "eps": float(eps)}


def param_shapes(cfg):
    """(name, shape) of every tensor, in Hugging Face's names and file order."""
    C, HD, NH, NKV, I, V = cfg["C"], cfg["HD"], cfg["NH"], cfg["NKV"], cfg["I"], cfg["V"]
    out = [("model.embed_tokens.weight", (V, C))]
    for l in range(cfg["L"]):
        p = f"model.layers.{l}."
        out.append((p + "input_layernorm.weight", (C,)))
        out.append((p + "self_attn.q_proj.weight", (NH * HD, C)))
        out.append((p + "self_attn.k_proj.weight", (NKV * HD, C)))
        out.append((p + "self_attn.v_proj.weight", (NKV * HD, C)))
        if cfg["qkv_bias"]:
            out.append((p + "self_attn.q_proj.bias", (NH * HD,)))
            out.append((p + "self_attn.k_proj.bias", (NKV * HD,)))
            out.append((p + "self_attn.v_proj.bias", (NKV * HD,)))
        out.append((p + "self_attn.o_proj.weight", (C, NH * HD)))
        if cfg["o_bias"]:
            out.append((p + "self_attn.o_proj.bias", (C,)))
        out.append((p + "post_attention_layernorm.weight", (C,)))
        out.append((p + "mlp.gate_proj.weight", (I, C)))
        out.append((p + "mlp.up_proj.weight", (I, C)))
        out.append((p + "mlp.down_proj.weight", (C, I)))
    out.append(("model.norm.weight", (C,)))
    if not cfg["tied"]:
        out.append(("lm_head.weight", (V, C)))
    return out


def random_params(cfg, rng, std=0.02, norm_jitter=0.1, bias_std=0.02):
    """Matrices and embeddings N(0, std); norm weights 1 + N(0, norm_jitter); biases
    N(0, bias_std): every parameter matters from the first forward pass."""
    p = {}
    for name, shape in param_shapes(cfg):
        if name.endswith("norm.weight"):
            p[name] = 1.0 + norm_jitter * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            p[name] = bias_std * rng.standard_normal(shape)
        else:
            p[name] = std * rng.standard_normal(shape)
    return p


def decays(name, shape):
    """AdamW's decoupled decay applies to the 2-D tensors only."""
    return len(shape) == 2


# ----------------------------------------------------------------------------------------------
# files

def hf_config(cfg):
    mt = cfg["model_type"]
    d = {"model_type": mt, "architectures": [ARCHITECTURES[mt]],
         "hidden_size": cfg["C"], "intermediate_size": cfg["I"],
         "num_hidden_layers": cfg["L"], "num_attention_heads": cfg["NH"],
         "num_key_value_heads": cfg["NKV"], "vocab_size": cfg["V"],
         "max_position_embeddings": cfg["maxT"], "rms_norm_eps": cfg["eps"],
         "rope_theta": cfg["theta"], "tie_word_embeddings": cfg["tied"],
         "hidden_act": "silu", "torch_dtype": "float32"}
    if mt == "llama":
        d["attention_bias"] = cfg["qkv_bias"]
        d["mlp_bias"] = False
    if mt == "mistral":
        d["sliding_window"] = None
    if mt == "qwen2":
        d["use_sliding_window"] = False
    return d


def config_from_hf(d):
    mt = d.get("model_type")
    if mt not in ARCHITECTURES:
        raise ValueError(f"config.json: model_type {mt!r} is not llama, qwen2 or mistral")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {d['hidden_act']!r} (only silu)")
    if d.get("rope_scaling"):
        raise ValueError("config.json: rope_scaling is not supported")
    C, NH = int(d["hidden_size"]), int(d["num_attention_heads"])
    if "head_dim" in d and d["head_dim"] is not None and int(d["head_dim"]) != C // NH:
        raise ValueError("config.json: head_dim other than hidden_size / num_attention_heads")
    if mt == "llama" and d.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias is not supported")
    bias = bool(d.get("attention_bias", False)) if mt == "llama" else mt == "qwen2"
    return make_config(mt, int(d["num_hidden_layers"]), C, NH,
                       int(d.get("num_key_value_heads") or NH), int(d["intermediate_size"]),
                       int(d["vocab_size"]), int(d["max_position_embeddings"]),
                       bool(d.get("tie_word_embeddings", False)),
                       bias, float(d.get("rope_theta", 10000.0)),
                       float(d.get("rms_norm_eps", 1e-6)))


def write_safetensors(path, tensors):
    """tensors: list of (name, float array), written as F32 in that order."""
    header = {}
    blobs = []
    off = 0
    for name, a in tensors:
        b = np.ascontiguousarray(a, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(a)), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    """{name: float64 array}; F32, F16 and BF16 tensors."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode())
    data = raw[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        shape = tuple(info["shape"])
        buf = data[b:e]
        if info["dtype"] == "F32":
            a = np.frombuffer(buf, dtype="<f4")
        elif info["dtype"] == "F16":
            a = np.frombuffer(buf, dtype="<f2")
        elif info["dtype"] == "BF16":
            a = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{path}: {name}: dtype {info['dtype']} not supported")
        if a.size != int(np.prod(shape)):
            raise ValueError(f"{path}: {name}: {a.size} values for shape {shape}")
        out[name] = a.astype(np.float64).reshape(shape)
    return out


def write_model_dir(d, cfg, params):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(hf_config(cfg), f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(d, "model.safetensors"),
                      [(name, params[name]) for name, _ in param_shapes(cfg)])


def read_model_dir(d):
    with open(os.path.join(d, "config.json")) as f:
        cfg = config_from_hf(json.load(f))
    t = read_safetensors(os.path.join(d, "model.safetensors"))
    params = {}
    for name, shape in param_shapes(cfg):
        if name not in t:
            raise ValueError(f"{d}: model.safetensors has no {name}")
        if t[name].shape != shape:
            raise ValueError(f"{d}: {name} has shape {t[name].shape}, expected {shape}")
        params[name] = t.pop(name)
    if cfg["tied"]:
        t.pop("lm_head.weight", None)  # some tied checkpoints carry a copy; the embedding wins
    if t:
        raise ValueError(f"{d}: unexpected tensors {sorted(t)}")
    return cfg, params


# ----------------------------------------------------------------------------------------------
# forward / backward (float64)

def rope_inv_freq(HD, theta):
    """inv_freq_i = 1 / theta^(2i/HD), i < HD/2, in float32 as Hugging Face computes it:
    the exponent 2i/HD a float32 quotient, the power a float32 (here correctly rounded: the
    float64 power rounded to float32; numpy's vectorised float32 power is off by an ulp in some
    lanes, as libraries' powf may be), the reciprocal a float32 quotient."""
    expo = np.arange(0, HD, 2, dtype=np.int64).astype(np.float32) / np.float32(HD)
    power = (np.float64(np.float32(theta)) ** expo.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


def rope_tables(T, HD, theta):
    """cos and sin (T, HD/2) in float64 of the float32 angle t * inv_freq_i."""
    inv = rope_inv_freq(HD, theta)
    angle = (np.arange(T).astype(np.float32)[:, None] * inv[None, :]).astype(np.float32)
    a = angle.astype(np.float64)
    return np.cos(a), np.sin(a)


def rope_forward(x, cos, sin):
    """x (..., T, HD): rotate-half form."""
    H2 = x.shape[-1] // 2
    x1, x2 = x[..., :H2], x[..., H2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope_backward(dy, cos, sin):
    """The transpose of the rotation: the rotation by -angle."""
    H2 = dy.shape[-1] // 2
    d1, d2 = dy[..., :H2], dy[..., H2:]
    return np.concatenate([d1 * cos + d2 * sin, d2 * cos - d1 * sin], axis=-1)


def rmsnorm_forward(x, w, eps):
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    xhat = x * rstd
    return xhat * w, (xhat, rstd)


def rmsnorm_backward(dy, cache, w):
    xhat, rstd = cache
    dw = (dy * xhat).sum(axis=(0, 1))
    dxhat = dy * w
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dw


def linear_forward(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def linear_backward(dy, x, w):
    dx = dy @ w
    dw = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    db = dy.reshape(-1, dy.shape[-1]).sum(axis=0)
    return dx, dw, db


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def attention_forward(q, k, v):
    """q (B, NH, T, HD); k, v (B, NKV, T, HD). Query head h uses kv head h // (NH / NKV)."""
    B, NH, T, HD = q.shape
    rep = NH // k.shape[1]
    kr = np.repeat(k, rep, axis=1)  # head h of kr is kv head h // rep
    vr = np.repeat(v, rep, axis=1)
    scale = 1.0 / math.sqrt(HD)
    s = (q @ kr.transpose(0, 1, 3, 2)) * scale
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    s = np.where(future, -np.inf, s)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p = p / p.sum(axis=-1, keepdims=True)
    return p @ vr, (q, kr, vr, p, scale, rep)


def attention_backward(dy, cache):
    q, kr, vr, p, scale, rep = cache
    B, NH, T, HD = q.shape
    dp = dy @ vr.transpose(0, 1, 3, 2)
    dvr = p.transpose(0, 1, 3, 2) @ dy
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * scale  # masked entries have p == 0
    dq = ds @ kr
    dkr = ds.transpose(0, 1, 3, 2) @ q
    # each kv head's gradient sums over the query heads of its group
    dk = dkr.reshape(B, NH // rep, rep, T, HD).sum(axis=2)
    dv = dvr.reshape(B, NH // rep, rep, T, HD).sum(axis=2)
    return dq, dk, dv


def forward_backward(cfg, P, inputs, targets, need_grad=True):
    """Mean cross-entropy loss over all B*T positions, and the gradient of every parameter."""
    V, L, NH, NKV, HD, eps = cfg["V"], cfg["L"], cfg["NH"], cfg["NKV"], cfg["HD"], cfg["eps"]
    B, T = inputs.shape
    assert T <= cfg["maxT"]
    assert inputs.min() >= 0 and targets.min() >= 0 and inputs.max() < V and targets.max() < V
    cos, sin = rope_tables(T, HD, cfg["theta"])

    def heads(a, n):  # (B, T, n*HD) -> (B, n, T, HD)
        return a.reshape(B, T, n, HD).transpose(0, 2, 1, 3)

    def unheads(a):  # (B, n, T, HD) -> (B, T, n*HD)
        return a.transpose(0, 2, 1, 3).reshape(B, T, -1)

    def get(name):
        return P.get(name)

    x = P["model.embed_tokens.weight"][inputs]
    caches = []
    for l in range(L):
        pre = f"model.layers.{l}."
        a = pre + "self_attn."
        c = {}
        h, c["n1"] = rmsnorm_forward(x, P[pre + "input_layernorm.weight"], eps)
        c["h"] = h
        q = heads(linear_forward(h, P[a + "q_proj.weight"], get(a + "q_proj.bias")), NH)
        k = heads(linear_forward(h, P[a + "k_proj.weight"], get(a + "k_proj.bias")), NKV)
        v = heads(linear_forward(h, P[a + "v_proj.weight"], get(a + "v_proj.bias")), NKV)
        y, c["att"] = attention_forward(rope_forward(q, cos, sin), rope_forward(k, cos, sin), v)
        c["y"] = unheads(y)
        x = x + linear_forward(c["y"], P[a + "o_proj.weight"], get(a + "o_proj.bias"))
        m = pre + "mlp."
        h2, c["n2"] = rmsnorm_forward(x, P[pre + "post_attention_layernorm.weight"], eps)
        c["h2"] = h2
        g = linear_forward(h2, P[m + "gate_proj.weight"])
        u = linear_forward(h2, P[m + "up_proj.weight"])
        sg = sigmoid(g)
        c["g"], c["u"], c["sg"] = g, u, sg
        c["act"] = g * sg * u
        x = x + linear_forward(c["act"], P[m + "down_proj.weight"])
        caches.append(c)
    xf, nf = rmsnorm_forward(x, P["model.norm.weight"], eps)
    head_name = "model.embed_tokens.weight" if cfg["tied"] else "lm_head.weight"
    W = P[head_name]
    logits = xf @ W.T
    mx = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - mx)
    z = e.sum(axis=-1, keepdims=True)
    logp = logits - mx - np.log(z)
    bi, ti = np.meshgrid(np.arange(B), np.arange(T), indexing="ij")
    loss = -logp[bi, ti, targets].mean()
    if not need_grad:
        return loss, None

    G = {name: np.zeros_like(a) for name, a in P.items()}
    dlogits = e / z
    dlogits[bi, ti, targets] -= 1.0
    dlogits /= B * T
    G[head_name] += dlogits.reshape(-1, V).T @ xf.reshape(-1, xf.shape[-1])
    dx, G["model.norm.weight"] = rmsnorm_backward(dlogits @ W, nf, P["model.norm.weight"])
    for l in reversed(range(L)):
        pre = f"model.layers.{l}."
        a = pre + "self_attn."
        m = pre + "mlp."
        c = caches[l]
        # x = x_mid + down(silu(gate(h2)) * up(h2)),  h2 = rmsnorm(x_mid) * w_post
        dact, G[m + "down_proj.weight"], _ = linear_backward(dx, c["act"], P[m + "down_proj.weight"])
        g, u, sg = c["g"], c["u"], c["sg"]
        du = dact * g * sg
        dg = dact * u * sg * (1.0 + g * (1.0 - sg))
        dh2a, G[m + "gate_proj.weight"], _ = linear_backward(dg, c["h2"], P[m + "gate_proj.weight"])
        dh2b, G[m + "up_proj.weight"], _ = linear_backward(du, c["h2"], P[m + "up_proj.weight"])
        dxm, G[pre + "post_attention_layernorm.weight"] = rmsnorm_backward(
            dh2a + dh2b, c["n2"], P[pre + "post_attention_layernorm.weight"])
        dx = dx + dxm
        # x_mid = x_in + o_proj(attn(rope(q), rope(k), v)),  q, k, v from h = rmsnorm(x_in) * w_in
        dy, G[a + "o_proj.weight"], dbo = linear_backward(dx, c["y"], P[a + "o_proj.weight"])
        if cfg["o_bias"]:
            G[a + "o_proj.bias"] = dbo
        dqr, dkr, dv = attention_backward(dy.reshape(B, T, NH, HD).transpose(0, 2, 1, 3), c["att"])
        dq = unheads(rope_backward(dqr, cos, sin))
        dk = unheads(rope_backward(dkr, cos, sin))
        dv = unheads(dv)
        dh = 0
        for nm, d in (("q", dq), ("k", dk), ("v", dv)):
            dhp, G[a + nm + "_proj.weight"], db = linear_backward(d, c["h"], P[a + nm + "_proj.weight"])
            if cfg["qkv_bias"]:
                G[a + nm + "_proj.bias"] = db
            dh = dh + dhp
        dxi, G[pre + "input_layernorm.weight"] = rmsnorm_backward(
            dh, c["n1"], P[pre + "input_layernorm.weight"])
        dx = dx + dxi
    np.add.at(G["model.embed_tokens.weight"], inputs.reshape(-1), dx.reshape(-1, dx.shape[-1]))
    return loss, G


def naive_loss(cfg, P, inputs, targets):
    """Loop-by-loop forward straight from the definition (slow; tiny models only): per token and
    per output row, the rotation per element with its own float32 angle, the kv head of every
    query head by index. It cross-checks the vectorised forward's reshapes, head grouping, RoPE
    halves, causal mask and head choice."""
    V, L, NH, NKV, HD, C, I = cfg["V"], cfg["L"], cfg["NH"], cfg["NKV"], cfg["HD"], cfg["C"], cfg["I"]
    eps = cfg["eps"]
    B, T = inputs.shape
    group = NH // NKV

    def rms(v, w):
        ms = sum(a * a for a in v) / len(v)
        r = 1.0 / math.sqrt(ms + eps)
        return np.array([v[i] * r * w[i] for i in range(len(v))])

    def lin(W, v, b=None):
        return np.array([np.dot(W[o], v) + (0.0 if b is None else b[o]) for o in range(W.shape[0])])

    def rope(vec, t):
        out = np.zeros(HD)
        H2 = HD // 2
        for i in range(H2):
            # numpy's scalar float32 power is correctly rounded
            inv = np.float32(1.0) / (np.float32(cfg["theta"]) ** (np.float32(2 * i) / np.float32(HD)))
            ang = float(np.float32(np.float32(t) * np.float32(inv)))
            cs, sn = math.cos(ang), math.sin(ang)
            out[i] = vec[i] * cs - vec[i + H2] * sn
            out[i + H2] = vec[i + H2] * cs + vec[i] * sn
        return out

    def silu(a):
        return a / (1.0 + math.exp(-a))

    head = P["model.embed_tokens.weight"] if cfg["tied"] else P["lm_head.weight"]
    total = 0.0
    for b in range(B):
        xs = [P["model.embed_tokens.weight"][inputs[b, t]].copy() for t in range(T)]
        for l in range(L):
            pre = f"model.layers.{l}."
            a = pre + "self_attn."
            qs, ks, vs = [], [], []
            for t in range(T):
                h = rms(xs[t], P[pre + "input_layernorm.weight"])
                q = lin(P[a + "q_proj.weight"], h, P.get(a + "q_proj.bias"))
                k = lin(P[a + "k_proj.weight"], h, P.get(a + "k_proj.bias"))
                v = lin(P[a + "v_proj.weight"], h, P.get(a + "v_proj.bias"))
                qs.append(np.concatenate([rope(q[hh * HD:(hh + 1) * HD], t) for hh in range(NH)]))
                ks.append(np.concatenate([rope(k[g * HD:(g + 1) * HD], t) for g in range(NKV)]))
                vs.append(v)
            new = []
            for t in range(T):
                y = np.zeros(NH * HD)
                for hh in range(NH):
                    g = hh // group
                    qh = qs[t][hh * HD:(hh + 1) * HD]
                    sc = [np.dot(qh, ks[u][g * HD:(g + 1) * HD]) / math.sqrt(HD) for u in range(t + 1)]
                    mx = max(sc)
                    ex = [math.exp(s - mx) for s in sc]
                    zz = sum(ex)
                    for u in range(t + 1):
                        y[hh * HD:(hh + 1) * HD] += ex[u] / zz * vs[u][g * HD:(g + 1) * HD]
                new.append(xs[t] + lin(P[a + "o_proj.weight"], y, P.get(a + "o_proj.bias")))
            xs = new
            new = []
            m = pre + "mlp."
            for t in range(T):
                h = rms(xs[t], P[pre + "post_attention_layernorm.weight"])
                gate = lin(P[m + "gate_proj.weight"], h)
                up = lin(P[m + "up_proj.weight"], h)
                act = np.array([silu(gate[j]) * up[j] for j in range(I)])
                new.append(xs[t] + lin(P[m + "down_proj.weight"], act))
            xs = new
        for t in range(T):
            h = rms(xs[t], P["model.norm.weight"])
            lg = [np.dot(head[i], h) for i in range(V)]
            mx = max(lg)
            total += mx + math.log(sum(math.exp(s - mx) for s in lg)) - lg[targets[b, t]]
    assert C == NH * HD
    return total / (B * T)


# ----------------------------------------------------------------------------------------------
# training

class AdamW:
    """m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p -= lr (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd p), wd only on the 2-D tensors."""

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
            m, v = self.m[k], self.v[k]
            m *= self.b1
            m += (1.0 - self.b1) * g
            v *= self.b2
            v += (1.0 - self.b2) * g * g
            wd = self.wd if decays(k, params[k].shape) else 0.0
            params[k] -= self.lr * ((m / c1) / (np.sqrt(v / c2) + self.eps) + wd * params[k])


def train(cfg, params, tokens, B, T, steps, lr, beta1, beta2, eps, wd, verbose=True):
    """Returns the loss and the global gradient norm of every step (both before its update)."""
    opt = AdamW(params, lr, beta1, beta2, eps, wd)
    losses, norms = [], []
    for s in range(steps):
        x, y = gpt2_numpy.get_batch(tokens, s, B, T)
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

    def report(name, good, detail=""):
        nonlocal ok
        ok = ok and good
        print(f"  {'ok  ' if good else 'FAIL'} {name}{': ' + detail if detail else ''}")

    B, T = 2, 7
    # GQA with 2 query heads per kv head, biases (Llama's attention_bias: q, k, v and o), an
    # untied head; then Qwen2-style biases with one kv head and a tied head; then plain Mistral.
    # A large rope theta would leave the angles tiny; 10000 with HD=8 turns them well.
    configs = [
        ("llama, GQA 4/2, q/k/v/o biases, untied",
         make_config("llama", 2, 16, 4, 2, 24, 37, 9, tied=False, bias=True)),
        ("qwen2, GQA 4/1, q/k/v biases, tied",
         make_config("qwen2", 2, 16, 4, 1, 20, 29, 9, tied=True, bias=True, theta=1e4, eps=1e-6)),
        ("mistral, no GQA, no biases, tied",
         make_config("mistral", 1, 16, 2, 2, 32, 23, 9, tied=True, bias=False, theta=500.0)),
    ]
    for title, cfg in configs:
        print(f"== {title}")
        # larger weights than 0.02 so that every nonlinearity is exercised
        params = random_params(cfg, rng, std=0.3, norm_jitter=0.3, bias_std=0.2)
        inputs = rng.integers(0, cfg["V"], size=(B, T))
        targets = rng.integers(0, cfg["V"], size=(B, T))

        print("forward vs a naive loop implementation")
        loss, grads = forward_backward(cfg, params, inputs, targets)
        ref = naive_loss(cfg, params, inputs, targets)
        rel = abs(loss - ref) / abs(ref)
        report("loss", rel < 1e-12, f"vectorised {loss:.15f} naive {ref:.15f} rel {rel:.2e}")

        print("sanity")
        zero = {k: np.zeros_like(v) for k, v in params.items()}
        for k in zero:
            if k.endswith("norm.weight"):
                zero[k][:] = 1.0
        z_loss, _ = forward_backward(cfg, zero, inputs, targets, need_grad=False)
        report("all-zero model loss == ln(V)", abs(z_loss - math.log(cfg["V"])) < 1e-12,
               f"{z_loss:.15f} vs {math.log(cfg['V']):.15f}")
        changed = inputs.copy()
        changed[:, -1] = (changed[:, -1] + 1) % cfg["V"]
        l1, _ = forward_backward(cfg, params, inputs[:, :-1], targets[:, :-1], need_grad=False)
        l2, _ = forward_backward(cfg, params, changed[:, :-1], targets[:, :-1], need_grad=False)
        report("prefix loss independent of a later token", l1 == l2, f"{l1} {l2}")
        if cfg["NKV"] < cfg["NH"]:
            # the same model as plain multi-head attention: every kv head's rows copied to each
            # query head of its group must give the same loss
            mha = dict(cfg, NKV=cfg["NH"])
            pm = {k: v.copy() for k, v in params.items()}
            rep, HD = cfg["NH"] // cfg["NKV"], cfg["HD"]
            for l in range(cfg["L"]):
                for nm in ("k", "v"):
                    for suffix in (".weight", ".bias"):
                        key = f"model.layers.{l}.self_attn.{nm}_proj{suffix}"
                        if key in pm:
                            a = pm[key].reshape((cfg["NKV"], HD) + pm[key].shape[1:])
                            pm[key] = np.repeat(a, rep, axis=0).reshape((cfg["NH"] * HD,) + a.shape[2:])
            lm, _ = forward_backward(mha, pm, inputs, targets, need_grad=False)
            rel = abs(lm - loss) / abs(loss)
            report("GQA == MHA with each kv head copied to its group", rel < 1e-13, f"rel {rel:.2e}")
        # RoPE is a rotation: the score of a rotated q and k depends on positions only through
        # their difference (up to the float32 angles)
        HD = cfg["HD"]
        cs, sn = rope_tables(T, HD, cfg["theta"])
        qv, kv = rng.standard_normal(HD), rng.standard_normal(HD)
        s1 = rope_forward(qv[None], cs[5:6], sn[5:6]) @ rope_forward(kv[None], cs[2:3], sn[2:3]).T
        s2 = rope_forward(qv[None], cs[4:5], sn[4:5]) @ rope_forward(kv[None], cs[1:2], sn[1:2]).T
        report("rope score depends on t - s only", abs(s1 - s2).max() < 1e-5, f"{float(abs(s1 - s2).max()):.1e}")
        report("rope at t = 0 is the identity",
               np.array_equal(rope_forward(qv[None], cs[0:1], sn[0:1])[0], qv))

        print("backward vs central finite differences (h = 1e-5)")
        h = 1e-5
        for name, _ in param_shapes(cfg):
            p = params[name]
            flat_idx = rng.choice(p.size, size=min(6, p.size), replace=False)
            if name == "model.embed_tokens.weight":  # an input row and a target-only row
                flat_idx = np.concatenate([flat_idx, [inputs[0, 0] * cfg["C"] + 3,
                                                      targets[1, 2] * cfg["C"] + 5]])
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
                worst = max(worst, abs(fd - an) / max(abs(fd), abs(an), 1e-7))
            report(name, worst < 1e-5, f"worst relative error {worst:.2e} over {len(flat_idx)} entries")

        d = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        an = sum(float((grads[k] * d[k]).sum()) for k in params)
        hd = 1e-6
        lp, _ = forward_backward(cfg, {k: params[k] + hd * d[k] for k in params}, inputs, targets, False)
        lm, _ = forward_backward(cfg, {k: params[k] - hd * d[k] for k in params}, inputs, targets, False)
        fd = (lp - lm) / (2 * hd)
        err = abs(fd - an) / abs(fd)
        report("directional derivative", err < 1e-6, f"analytic {an:.10f} fd {fd:.10f} rel {err:.2e}")

    print("== AdamW")
    cfg = configs[0][1]
    params = random_params(cfg, rng)
    inputs = rng.integers(0, cfg["V"], size=(B, T))
    _, grads = forward_backward(cfg, params, inputs, inputs)
    p1 = {k: v.copy() for k, v in params.items()}
    AdamW(p1, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0).step(p1, grads)
    k = "model.layers.0.self_attn.q_proj.weight"
    expect = params[k] - 1e-3 * grads[k] / (np.abs(grads[k]) + 1e-8)
    report("first step is lr * g / (|g| + eps)", np.allclose(p1[k], expect, rtol=1e-12, atol=1e-15))
    p2 = {k: v.copy() for k, v in params.items()}
    zg = {k: np.zeros_like(v) for k, v in params.items()}
    AdamW(p2, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1).step(p2, zg)
    good = True
    for name, shape in param_shapes(cfg):
        want = params[name] * (1 - 1e-4) if len(shape) == 2 else params[name]
        good = good and np.allclose(p2[name], want, rtol=1e-14, atol=0)
    report("decay on matrices and embeddings only (not norm weights or biases)", good)

    print("== files")
    import tempfile
    with tempfile.TemporaryDirectory() as td:
        for _, cfg in configs:
            params = random_params(cfg, rng)
            write_model_dir(td, cfg, params)
            cfg2, p2 = read_model_dir(td)
            same = cfg2 == cfg and all(
                np.array_equal(p2[k], params[k].astype(np.float32).astype(np.float64)) for k in params)
            report(f"{cfg['model_type']} directory round trip", same and set(p2) == set(params))
            with open(os.path.join(td, "model.safetensors"), "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
            report("safetensors header padded to 8", n % 8 == 0, f"{n} bytes")

    print("self-test", "PASSED" if ok else "FAILED")
    return ok


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("write-model")
    w.add_argument("out")
    w.add_argument("--model-type", choices=sorted(ARCHITECTURES), default="llama")
    w.add_argument("--layers", type=int, required=True)
    w.add_argument("--channels", type=int, required=True)
    w.add_argument("--heads", type=int, required=True)
    w.add_argument("--kv-heads", type=int)
    w.add_argument("--intermediate", type=int, required=True)
    w.add_argument("--vocab", type=int, required=True)
    w.add_argument("--max-seq", type=int, default=64)
    tie = w.add_mutually_exclusive_group()
    tie.add_argument("--tied", dest="tied", action="store_true", default=None)
    tie.add_argument("--untied", dest="tied", action="store_false")
    w.add_argument("--qkv-bias", action="store_true",
                   help="q/k/v biases (Qwen2 always has them; for Llama it sets attention_bias, "
                        "which in Hugging Face's Llama also biases o_proj)")
    w.add_argument("--rope-theta", type=float, default=10000.0)
    w.add_argument("--rms-eps", type=float, default=1e-5)
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
    c.add_argument("--rtol", type=float, default=1e-6)
    c.add_argument("--title", default="")

    sub.add_parser("self-test")

    a = ap.parse_args(argv)
    if a.cmd == "write-model":
        tied = a.tied if a.tied is not None else True
        try:
            cfg = make_config(a.model_type, a.layers, a.channels, a.heads, a.kv_heads or a.heads,
                              a.intermediate, a.vocab, a.max_seq, tied, a.qkv_bias, a.rope_theta,
                              a.rms_eps)
        except ValueError as e:
            ap.error(str(e))
        write_model_dir(a.out, cfg, random_params(cfg, np.random.default_rng(a.seed)))
        return 0
    if a.cmd == "write-shard":
        args = ["write-shard", a.out, "--vocab", str(a.vocab), "--tokens", str(a.tokens),
                "--seed", str(a.seed), "--successors", str(a.successors)]
        return gpt2_numpy.main(args)
    if a.cmd == "train":
        cfg, params = read_model_dir(a.model)
        tokens = gpt2_numpy.read_shard(a.data)
        losses, norms = train(cfg, params, tokens, a.batch, a.seq, a.steps, a.lr, a.beta1,
                              a.beta2, a.eps, a.weight_decay)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"config": cfg, "batch": a.batch, "seq": a.seq, "lr": a.lr,
                           "beta1": a.beta1, "beta2": a.beta2, "eps": a.eps,
                           "weight_decay": a.weight_decay, "losses": losses, "grad_norms": norms},
                          f, indent=1)
        return 0
    if a.cmd == "compare":
        return 0 if gpt2_numpy.compare(a.remat, a.reference, a.rtol, a.title) else 1
    if a.cmd == "self-test":
        return 0 if self_test() else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
