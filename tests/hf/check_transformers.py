#!/usr/bin/env python3
"""remat against Hugging Face transformers: per-step training losses of models saved by
transformers.

For each model type (llama with grouped-query attention, qwen2 with q/k/v biases and a separate
output embedding, gpt2, and llama with Llama 3's rope scaling and a tied embedding), this script builds a small random model with transformers, saves it
with save_pretrained (fp32 safetensors), writes a random llm.c token shard, trains the model
for N steps with torch.optim.AdamW (fp32 on the CPU, weight decay 0, no clipping, constant
learning rate) on the batches remat reads (batch k: tokens [k*B*T, k*B*T + B*T + 1), inputs the
first B*T, targets shifted by one), trains remat on the same directory and shard, and requires
every step's loss to agree to RTOL relative.

  check_transformers.py REMAT_BINARY [--types llama,qwen2,gpt2] [--steps 10] [--rtol 1e-4]
                        [--keep DIR]
Exit status: 0 pass, 1 a loss disagrees, 2 setup error (no torch/transformers: 77 = skip).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))

try:
    import numpy as np
    import torch
    import transformers
except ImportError as e:  # the caller skips
    print(f"skip: {e}")
    sys.exit(77)

import gpt2_numpy  # noqa: E402  (the shard format)


def make_model(kind, vocab, seq):
    torch.manual_seed({"llama": 1, "qwen2": 2, "gpt2": 3, "llama3": 4}[kind])
    if kind == "llama3":
        # Llama 3.1/3.2's rope scaling, with a short original context so that T=32 reaches
        # all three bands (kept, blended, divided by the factor) of a 16-channel head.
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * seq,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            hidden_act="silu")
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
            attention_bias=False, hidden_act="silu")
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(
            vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=seq,
            rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
            use_sliding_window=False, hidden_act="silu")
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=seq,
            activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    # Biases and norm weights away from their initial 0 and 1, so every parameter matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
            # (Llama family) sharp, position-dependent attention, so the rotary frequencies (and the rope
            # scaling) change the losses well beyond the tolerance.
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8.0)
    model.config.attn_implementation = "eager"
    return model.float()


def torch_losses(model, tokens, B, T, steps, lr):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.0)
    losses = []
    for k in range(steps):
        chunk = torch.tensor(tokens[k * B * T: k * B * T + B * T + 1], dtype=torch.long)
        x = chunk[:-1].view(B, T)
        y = chunk[1:].view(B, T)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                 y.reshape(-1))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def remat_losses(remat, model_dir, shard, B, T, steps, lr, work, out_dir):
    log = os.path.join(work, "remat.jsonl")
    if os.path.exists(log):
        os.remove(log)
    cmd = [remat, "train", "--model", model_dir, "--data", shard, "--device", "cpu",
           "--batch", str(B), "--seq", str(T), "--steps", str(steps), "--lr", str(lr),
           "--beta1", "0.9", "--beta2", "0.95", "--eps", "1e-8", "--weight-decay", "0",
           "--grad-clip", "0", "--eval-every", "0", "--sample-tokens", "0", "--out", out_dir,
           "--log", log]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout, r.stderr)
        raise SystemExit(f"remat failed: {' '.join(cmd)}")
    out = []
    with open(log) as f:
        for line in f:
            j = json.loads(line)
            if "loss" in j:
                out.append(float(j["loss"]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("remat")
    ap.add_argument("--types", default="llama,qwen2,gpt2,llama3")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--keep", default="")
    a = ap.parse_args()
    torch.set_num_threads(2)
    B, T, V = 4, 32, 300
    work = a.keep or tempfile.mkdtemp(prefix="remat_hf_")
    os.makedirs(work, exist_ok=True)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, V, size=B * T * (a.steps + 1) + 1)
    shard = os.path.join(work, "train.bin")
    gpt2_numpy.write_shard(shard, tokens)
    ok = True
    for kind in a.types.split(","):
        model = make_model(kind, V, T)
        d = os.path.join(work, kind)
        model.save_pretrained(d, safe_serialization=True)
        theirs = torch_losses(model, tokens, B, T, a.steps, a.lr)
        out_dir = os.path.join(work, kind + "_remat")
        ours = remat_losses(a.remat, d, shard, B, T, a.steps, a.lr, work, out_dir)
        # What remat wrote loads in transformers as it is and holds the weights torch's
        # AdamW reached (to fp32 drift).
        back = type(model).from_pretrained(out_dir).float()
        theirs_p = dict(model.named_parameters())
        drift = max((p - theirs_p[n]).abs().max().item() for n, p in back.named_parameters())
        worst = 0.0
        print(f"{kind} (transformers {transformers.__version__}, torch {torch.__version__}):")
        print(f"  {'step':>4} {'transformers':>14} {'remat':>14} {'rel diff':>10}")
        for s, (t, r) in enumerate(zip(theirs, ours)):
            rel = abs(t - r) / abs(t)
            worst = max(worst, rel)
            print(f"  {s + 1:>4} {t:>14.8f} {r:>14.8f} {rel:>10.2e}")
        good = len(ours) == len(theirs) and worst <= a.rtol and drift <= 1e-4
        print(f"  {'PASS' if good else 'FAIL'}: worst relative difference {worst:.2e} "
              f"(tolerance {a.rtol:g}); remat's --out loaded by transformers: largest weight "
              f"difference to torch's after {a.steps} steps {drift:.2e} (tolerance 1e-4)")
        ok = ok and good
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
