#!/usr/bin/env python3
"""PyTorch GPT-2 training throughput: the anchor that remat's GPU training is measured against.

    python3 bench/gpu/torch_gpt2.py [--batch 8] [--seq 1024] [--steps 20] [--warmup 3]
                                    [--no-compile] [--compile-scope model|blocks] [--out PREFIX]

A minimal GPT-2 124M written for this benchmark: 12 layers, 768 channels, 12 heads, vocabulary
50257 padded to 50304 (the loss runs over the padded logits, as nanoGPT's does), tied token
embedding and classifier, pre-LayerNorm blocks, GeLU (tanh), attention through
F.scaled_dot_product_attention(is_causal=True). fp32 parameters under bf16 autocast, fused
AdamW (lr 6e-4, betas 0.9/0.95, weight decay 0.1 on matrices), global gradient-norm clip 1.0.
Inputs are random tokens (throughput only). The model is wrapped in torch.compile unless
--no-compile; when compiling fails (no Triton, no C compiler, ...) it says so and goes on
eagerly, and the output's "compile" field reads "eager (compile failed)".

Timing: --warmup steps first (the first one includes compilation; its wall time is reported
as compile_s), then --steps steps, each timed with CUDA events around forward, backward,
clip and optimizer step. Reports the median and mean tokens/s over the timed steps, model
TFLOP/s with llm.c's count (6N + 6*L*C*T per token), the peak of
torch.cuda.max_memory_allocated() over the timed steps and over the whole run, and the last
loss. Prints a summary and, with --out PREFIX, writes PREFIX.json and PREFIX.csv (one row).
"""
import argparse
import csv
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, channels, heads):
        super().__init__()
        self.heads = heads
        self.ln_attn = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.attn_out = nn.Linear(channels, channels)
        self.ln_mlp = nn.LayerNorm(channels)
        self.mlp_up = nn.Linear(channels, 4 * channels)
        self.mlp_down = nn.Linear(4 * channels, channels)

    def forward(self, x):
        b, t, c = x.shape
        # (B, T, 3C) -> three (B, NH, T, HD) views.
        qkv = self.qkv(self.ln_attn(x)).view(b, t, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, c))
        h = F.gelu(self.mlp_up(self.ln_mlp(x)), approximate="tanh")
        return x + self.mlp_down(h)


class GPT2(nn.Module):
    def __init__(self, layers=12, channels=768, heads=12, vocab=50257, padded_vocab=50304,
                 max_seq=1024):
        super().__init__()
        self.vocab, self.padded_vocab = vocab, padded_vocab
        self.tok_emb = nn.Embedding(padded_vocab, channels)
        self.pos_emb = nn.Embedding(max_seq, channels)
        self.blocks = nn.ModuleList(Block(channels, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(channels)
        # Tied: the classifier multiplies by the token embedding matrix itself.
        self.init_weights(layers)

    def init_weights(self, layers):
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln_" in name:
                nn.init.ones_(p)
            elif name.endswith(("attn_out.weight", "mlp_down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * layers))  # residual projections
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(self.ln_final(x), self.tok_emb.weight)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def make_optimizer(model, lr, weight_decay, fused):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": other, "weight_decay": 0.0}]
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True), "fused"
        except (RuntimeError, TypeError, ValueError) as e:
            print(f"torch_gpt2: fused AdamW unavailable ({e}); using foreach", flush=True)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=True), "foreach"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps, compilation included")
    p.add_argument("--no-compile", action="store_true", help="eager mode")
    p.add_argument("--compile-scope", choices=("model", "blocks"), default="model",
                   help="compile the whole model (default) or each block on its own (faster "
                        "to compile; classifier and loss stay eager)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--channels", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu, for a smoke test")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default="", help="write PREFIX.json and PREFIX.csv")
    a = p.parse_args(argv)
    if a.batch < 1 or a.seq < 1 or a.seq > 1024 or a.steps < 1 or a.warmup < 1:
        p.error("need batch >= 1, 1 <= seq <= 1024, steps >= 1, warmup >= 1")

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("torch_gpt2: torch.cuda.is_available() is False: no GPU to measure", file=sys.stderr)
        return 3
    torch.manual_seed(a.seed)
    torch.set_float32_matmul_precision("high")  # TF32 for any fp32 product left outside autocast

    vocab, padded = 50257, 50304
    model = GPT2(a.layers, a.channels, a.heads, vocab, padded, 1024).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    opt, opt_kind = make_optimizer(model, 6e-4, 0.1, fused=cuda)
    params = list(model.parameters())
    flops_per_token = 6 * n_params + 6 * a.layers * a.channels * a.seq

    # A few batches of random tokens, made once on the device and cycled.
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    batches = []
    for _ in range(4):
        tok = torch.randint(0, vocab, (a.batch, a.seq + 1), device=dev, generator=gen)
        batches.append((tok[:, :-1].contiguous(), tok[:, 1:].contiguous()))

    def run_model(m):
        def step(i):
            inputs, targets = batches[i % len(batches)]
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
                loss = m(inputs, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return step

    def sync():
        if cuda:
            torch.cuda.synchronize()

    mode, note = "eager", ""
    step = run_model(model)
    compile_s = 0.0
    if not a.no_compile:
        t0 = time.perf_counter()
        try:
            if a.compile_scope == "blocks":
                for blk in model.blocks:
                    blk.compile()
                step = run_model(model)
            else:
                step = run_model(torch.compile(model))
            step(0).item()  # compilation happens here, on the first call
            sync()
            mode = f"torch.compile ({a.compile_scope})"
        except Exception as e:  # noqa: BLE001 - any compiler failure means: measure eagerly
            note = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"torch_gpt2: {note}; falling back to eager", flush=True)
            try:
                torch._dynamo.reset()
            except Exception:  # noqa: BLE001
                pass
            if a.compile_scope == "blocks":  # undo the in-place compile
                for blk in model.blocks:
                    blk._compiled_call_impl = None
            opt.zero_grad(set_to_none=True)
            mode = "eager (compile failed)"
            step = run_model(model)
        compile_s = time.perf_counter() - t0
        print(f"torch_gpt2: {mode}, first step (compilation included) {compile_s:.1f} s",
              flush=True)

    for i in range(0 if a.no_compile else 1, a.warmup):  # step 0 ran above when compiling
        step(i)
    sync()
    peak_run = torch.cuda.max_memory_allocated() if cuda else -1
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    times_ms, loss = [], None
    for i in range(a.steps):
        if cuda:
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev0.record()
            loss = step(a.warmup + i)
            ev1.record()
            ev1.synchronize()
            times_ms.append(ev0.elapsed_time(ev1))
        else:
            t0 = time.perf_counter()
            loss = step(a.warmup + i)
            times_ms.append(1e3 * (time.perf_counter() - t0))
    final_loss = float(loss.item())
    peak = torch.cuda.max_memory_allocated() if cuda else -1
    peak_run = max(peak_run, peak)

    tokens = a.batch * a.seq
    med_ms = statistics.median(times_ms)
    tps = [tokens / (ms / 1e3) for ms in times_ms]
    res = {
        "name": f"torch gpt2 L={a.layers} C={a.channels} B={a.batch} T={a.seq}",
        "compile": mode,
        "batch": a.batch,
        "seq": a.seq,
        "steps": a.steps,
        "warmup": a.warmup,
        "compile_s": round(compile_s, 2),
        "step_ms_median": round(med_ms, 3),
        "tokens_per_s_median": round(tokens / (med_ms / 1e3), 1),
        "tokens_per_s_mean": round(statistics.mean(tps), 1),
        "model_tflops": round(flops_per_token * tokens / (med_ms / 1e3) / 1e12, 2),
        "peak_bytes": peak,
        "peak_bytes_with_warmup": peak_run,
        "final_loss": round(final_loss, 4),
        "params": n_params,
        "optimizer": opt_kind,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "note": note,
    }
    print(f"torch_gpt2: {res['name']}, {mode}: median {res['step_ms_median']:.1f} ms/step, "
          f"{res['tokens_per_s_median']:.0f} tokens/s (mean {res['tokens_per_s_mean']:.0f}), "
          f"{res['model_tflops']:.1f} model TFLOP/s, peak {peak / 2**30:.2f} GiB, "
          f"loss {final_loss:.4f}", flush=True)
    if a.out:
        with open(a.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
        with open(a.out + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(res))
            w.writeheader()
            w.writerow(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
