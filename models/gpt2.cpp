#include "models/gpt2.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>

#include "kernels/attention.h"
#include "kernels/classifier.h"
#include "kernels/common.h"
#include "kernels/encoder.h"
#include "kernels/gelu.h"
#include "kernels/layernorm.h"
#include "kernels/matmul.h"
#include "models/params.h"
#include "profiling/nvtx.h"

namespace remat {

int act_bytes(ActDType t) {
  return t == ActDType::kBF16 ? 2 : 4;
}

namespace {

constexpr int kNumKinds = kNumActKinds;
using K = ActKind;
inline int ki(K k) {
  return static_cast<int>(k);
}
size_t align_up(size_t n) {
  return (n + Arena::kAlign - 1) / Arena::kAlign * Arena::kAlign;
}

}  // namespace

KindLayout kind_layout(const GPT2Config& c, int N, int k) {
  const size_t n = N, C = c.channels;
  switch (static_cast<K>(k)) {
    case K::kLN1:
      return {n * C, 2 * n, "ln1", "ln1.mean_rstd"};
    case K::kQKV:
      return {n * 3 * C, 0, "qkv", ""};
    case K::kAttn:
      return {n * C, n * c.num_heads, "atty", "attn.lse"};
    case K::kR2:
      return {n * C, 0, "r2", ""};
    case K::kLN2:
      return {n * C, 2 * n, "ln2", "ln2.mean_rstd"};
    case K::kFCH:
      return {n * 4 * C, 0, "fch", ""};
    case K::kGELU:
      return {n * 4 * C, 0, "gelu", ""};
    default:
      break;
  }
  throw Error("bad activation kind");
}

uint64_t kind_bytes(const GPT2Config& c, int N, ActDType dt, int k) {
  KindLayout l = kind_layout(c, N, k);
  return align_up(l.main_elems * act_bytes(dt)) + align_up(l.extra_elems * 4);
}

struct GPT2Runner::Impl {
  GPT2Config c;
  int B, T, N;
  Plan plan;
  ActDType dtype;
  ScheduleOptions opt;
  bool dry;
  int es;  // bytes per activation element
  std::array<KindLayout, kNumKinds> layout;
  std::unique_ptr<Stream> main, side;
  std::unique_ptr<Arena> arena;

  // Per step state.
  std::vector<Block> x;                            // x[l]: input of block l; x[L]: final residual
  std::vector<std::array<Block, kNumKinds>> acts;  // acts[l][kind]
  std::vector<Event> ready;                        // recompute of block l finished (side stream)
  Block lnf;                                       // (N, C) + mean, rstd
  std::vector<int> inputs, targets;                // host copies for the step's ops
  float loss = 0;
  const float* params = nullptr;
  float* grads = nullptr;
  // verify-recompute: originals of recomputed kinds, [l][kind]
  std::vector<std::array<std::vector<char>, kNumKinds>> shadow;
  bool training_ = true;

  Impl(const GPT2Config& cfg, int b, int t, Plan p, ActDType dt, ScheduleOptions o, bool d)
      : c(cfg), B(b), T(t), N(b * t), plan(std::move(p)), dtype(dt), opt(o), dry(d) {
    REMAT_CHECK(B > 0 && T > 0, "batch and sequence length must be positive");
    REMAT_CHECK(T <= c.max_seq_len, "sequence length " + std::to_string(T) +
                                        " exceeds the model's maximum " +
                                        std::to_string(c.max_seq_len));
    REMAT_CHECK(static_cast<int>(plan.recompute.size()) == c.num_layers,
                "plan has " + std::to_string(plan.recompute.size()) + " blocks, model has " +
                    std::to_string(c.num_layers));
    REMAT_CHECK(opt.lookahead >= 0, "--lookahead must be >= 0");
    REMAT_CHECK(dry || dtype == ActDType::kFP32, "the CPU backend computes in fp32");
#ifdef REMAT_INJECT_MISSING_EVENT
    // Test-only build: the missing-event fault (see CMakeLists.txt) in every runner.
    opt.debug_skip_ready_wait = true;
    opt.debug_recompute_delay_ms = std::max(opt.debug_recompute_delay_ms, 5);
#endif
    es = act_bytes(dtype);
    for (int k = 0; k < kNumKinds; k++) layout[k] = kind_layout(c, N, k);
    if (dry) {
      main = make_null_stream("main", 0);
      side = make_null_stream("recompute", 1);
      arena = std::make_unique<Arena>(std::numeric_limits<size_t>::max(), nullptr);
    } else {
      size_t need = 0;
      {
        Impl probe(cfg, b, t, plan, dt, o, true);
        probe.forward_backward(nullptr, nullptr, nullptr, nullptr, 1.0f);
        need = probe.arena->stats().extent_peak;
        Impl probe_eval(cfg, b, t, plan, dt, o, true);
        probe_eval.forward(nullptr, nullptr, false);
        probe_eval.finish_eval(nullptr, -1, nullptr);
        need = std::max(need, probe_eval.arena->stats().extent_peak);
      }
      main = make_cpu_stream("remat-main", 0);
      side = make_cpu_stream("remat-recompute", 1);
      arena = std::make_unique<Arena>(std::max<size_t>(need, Arena::kAlign), cpu_memory());
    }
    x.resize(c.num_layers + 1);
    acts.resize(c.num_layers);
    ready.resize(c.num_layers);
    if (opt.verify_recompute) shadow.resize(c.num_layers);
  }

  ~Impl() {
    if (main) main->synchronize();
    if (side) side->synchronize();
  }

  size_t kind_bytes(int k) const {
    return remat::kind_bytes(c, N, dtype, k);
  }
  // Rows per classifier chunk: ScheduleOptions::classifier_chunk, else as many as 64 MiB of logits
  // hold.
  int classifier_chunk() const {
    if (opt.classifier_chunk > 0) return opt.classifier_chunk;
    const long rows = (64l << 20) / (long(c.padded_vocab) * es);
    return static_cast<int>(std::max<long>(1, std::min<long>(N, rows)));
  }

  Block alloc_kind(int k, Stream* s, Phase ph) {
    return arena->alloc(kind_bytes(k), s, ph, Usage::kActivation, layout[k].main_name);
  }
  float* main_ptr(const Block& b) const {
    return b.f32();
  }
  float* extra_ptr(const Block& b, int k) const {
    if (!b.ptr) return nullptr;
    return reinterpret_cast<float*>(static_cast<char*>(b.ptr) +
                                    align_up(layout[k].main_elems * es));
  }
  Block alloc_nc(Stream* s, Phase ph, Usage u, size_t elems, const char* name, size_t extra = 0) {
    return arena->alloc(align_up(elems * es) + align_up(extra * 4), s, ph, u, name);
  }
  float* extra_of(const Block& b, size_t main_elems) const {
    if (!b.ptr) return nullptr;
    return reinterpret_cast<float*>(static_cast<char*>(b.ptr) + align_up(main_elems * es));
  }

  // Parameter pointers of block l (null in a dry run).
  struct LayerW {
    const float *ln1w, *ln1b, *qkvw, *qkvb, *attprojw, *attprojb, *ln2w, *ln2b, *fcw, *fcb,
        *fcprojw, *fcprojb;
  };
  LayerW weights(const float* base, int l) const {
    LayerW w{};
    if (!base) return w;
    ParamView v = view_params(const_cast<float*>(base), c);
    const size_t C = c.channels;
    w.ln1w = v.ln1w + l * C;
    w.ln1b = v.ln1b + l * C;
    w.qkvw = v.qkvw + l * 3 * C * C;
    w.qkvb = v.qkvb + l * 3 * C;
    w.attprojw = v.attprojw + l * C * C;
    w.attprojb = v.attprojb + l * C;
    w.ln2w = v.ln2w + l * C;
    w.ln2b = v.ln2b + l * C;
    w.fcw = v.fcw + l * 4 * C * C;
    w.fcb = v.fcb + l * 4 * C;
    w.fcprojw = v.fcprojw + l * C * 4 * C;
    w.fcprojb = v.fcprojb + l * C;
    return w;
  }
  float* grad_of(float* base, int tensor, int l, size_t per_layer) const {
    if (!base) return nullptr;
    return base + param_offsets(c)[tensor] + l * per_layer;
  }

  bool recomputed(int l, K k, bool training) const {
    return !training || plan.recompute[l][ki(k)];
  }

  // Copies a kind's bytes aside before it is freed (verify-recompute).
  void save_shadow(int l, int k) {
    if (!opt.verify_recompute || dry || !training_) return;
    std::vector<char>* dst = &shadow[l][k];
    const Block b = acts[l][k];
    const size_t n = kind_bytes(k);
    main->launch(
        [dst, b, n] { dst->assign(static_cast<char*>(b.ptr), static_cast<char*>(b.ptr) + n); },
        "verify.save", l);
  }

  void free_kind(int l, int k, Stream* s) {
    arena->free(acts[l][k], s);
  }

  // ---- forward ----
  // training = false: every activation is freed after its last forward use (evaluation).
  void forward(const float* P, const int* in, bool training) {
    training_ = training;
    const int L = c.num_layers, C = c.channels, NH = c.num_heads;
    const int Bv = B, Tv = T, Nv = N;
    Stream* s = main.get();
    const Phase ph = Phase::kForward;
    ParamView pv{};
    if (P) pv = view_params(const_cast<float*>(P), c);
    const int* tok = in;
    x[0] = alloc_nc(s, ph, Usage::kActivation, size_t(N) * C, "x");
    {
      float* out = x[0].f32();
      const float *wte = pv.wte, *wpe = pv.wpe;
      s->launch([=] { cpu::encoder_forward(out, tok, wte, wpe, Bv, Tv, C); }, "fwd.encoder");
    }
    // LN1 of block 0 (later blocks get theirs from the fused residual at the block boundary).
    acts[0][ki(K::kLN1)] = alloc_kind(ki(K::kLN1), s, ph);
    {
      LayerW w = weights(P, 0);
      float* out = main_ptr(acts[0][ki(K::kLN1)]);
      float* st = extra_ptr(acts[0][ki(K::kLN1)], ki(K::kLN1));
      const float* xin = x[0].f32();
      s->launch(
          [=] {
            cpu::layernorm_forward(out, st, st ? st + Nv : nullptr, xin, w.ln1w, w.ln1b, Nv, C);
          },
          "fwd.ln1", 0);
    }
    for (int l = 0; l < L; l++) {
      NvtxRange nvtx_block("forward.block", l);
      LayerW w = weights(P, l);
      auto& A = acts[l];
      const float* ln1 = main_ptr(A[ki(K::kLN1)]);
      A[ki(K::kQKV)] = alloc_kind(ki(K::kQKV), s, ph);
      float* qkv = main_ptr(A[ki(K::kQKV)]);
      s->launch([=] { cpu::matmul_forward(qkv, ln1, w.qkvw, w.qkvb, Nv, C, 3 * C); }, "fwd.qkv", l);
      if (recomputed(l, K::kLN1, training)) {
        save_shadow(l, ki(K::kLN1));
        free_kind(l, ki(K::kLN1), s);
      }
      A[ki(K::kAttn)] = alloc_kind(ki(K::kAttn), s, ph);
      float* atty = main_ptr(A[ki(K::kAttn)]);
      float* lse = extra_ptr(A[ki(K::kAttn)], ki(K::kAttn));
      s->launch([=] { cpu::attention_forward(atty, lse, qkv, Bv, Tv, C, NH); }, "fwd.attention", l);
      if (recomputed(l, K::kQKV, training)) {
        save_shadow(l, ki(K::kQKV));
        free_kind(l, ki(K::kQKV), s);
      }
      Block tmp = alloc_nc(s, ph, Usage::kActivation, size_t(N) * C, "attproj");
      float* proj = tmp.f32();
      s->launch([=] { cpu::matmul_forward(proj, atty, w.attprojw, w.attprojb, Nv, C, C); },
                "fwd.attproj", l);
      if (recomputed(l, K::kAttn, training)) {
        save_shadow(l, ki(K::kAttn));
        free_kind(l, ki(K::kAttn), s);
      }
      A[ki(K::kR2)] = alloc_kind(ki(K::kR2), s, ph);
      A[ki(K::kLN2)] = alloc_kind(ki(K::kLN2), s, ph);
      float* r2 = main_ptr(A[ki(K::kR2)]);
      float* ln2 = main_ptr(A[ki(K::kLN2)]);
      float* st2 = extra_ptr(A[ki(K::kLN2)], ki(K::kLN2));
      const float* xin = x[l].f32();
      s->launch(
          [=] {
            cpu::residual_layernorm_forward(r2, ln2, st2, st2 ? st2 + Nv : nullptr, xin, proj,
                                            w.ln2w, w.ln2b, Nv, C);
          },
          "fwd.residual_ln2", l);
      arena->free(tmp, s);
      if (!training) arena->free(x[l], s);
      A[ki(K::kFCH)] = alloc_kind(ki(K::kFCH), s, ph);
      float* fch = main_ptr(A[ki(K::kFCH)]);
      s->launch([=] { cpu::matmul_forward(fch, ln2, w.fcw, w.fcb, Nv, C, 4 * C); }, "fwd.fc", l);
      if (recomputed(l, K::kLN2, training)) {
        save_shadow(l, ki(K::kLN2));
        free_kind(l, ki(K::kLN2), s);
      }
      A[ki(K::kGELU)] = alloc_kind(ki(K::kGELU), s, ph);
      float* gelu = main_ptr(A[ki(K::kGELU)]);
      const size_t n4 = size_t(N) * 4 * C;
      s->launch([=] { cpu::gelu_forward(gelu, fch, n4); }, "fwd.gelu", l);
      if (recomputed(l, K::kFCH, training)) {
        save_shadow(l, ki(K::kFCH));
        free_kind(l, ki(K::kFCH), s);
      }
      Block tmp2 = alloc_nc(s, ph, Usage::kActivation, size_t(N) * C, "fcproj");
      float* fcp = tmp2.f32();
      s->launch([=] { cpu::matmul_forward(fcp, gelu, w.fcprojw, w.fcprojb, Nv, 4 * C, C); },
                "fwd.fcproj", l);
      if (recomputed(l, K::kGELU, training)) {
        save_shadow(l, ki(K::kGELU));
        free_kind(l, ki(K::kGELU), s);
      }
      // Block boundary: x[l+1] = r2 + fcproj, fused with the next LayerNorm (ln1 of block
      // l+1, or the final LayerNorm).
      x[l + 1] = alloc_nc(s, ph, Usage::kActivation, size_t(N) * C, "x");
      float* xn = x[l + 1].f32();
      const float *nw, *nb;
      float *ln_out, *ln_st;
      if (l + 1 < L) {
        acts[l + 1][ki(K::kLN1)] = alloc_kind(ki(K::kLN1), s, ph);
        LayerW w1 = weights(P, l + 1);
        nw = w1.ln1w;
        nb = w1.ln1b;
        ln_out = main_ptr(acts[l + 1][ki(K::kLN1)]);
        ln_st = extra_ptr(acts[l + 1][ki(K::kLN1)], ki(K::kLN1));
      } else {
        lnf = alloc_nc(s, ph, Usage::kActivation, size_t(N) * C, "lnf", 2 * size_t(N));
        nw = pv.lnfw;
        nb = pv.lnfb;
        ln_out = lnf.f32();
        ln_st = extra_of(lnf, size_t(N) * C);
      }
      s->launch(
          [=] {
            cpu::residual_layernorm_forward(xn, ln_out, ln_st, ln_st ? ln_st + Nv : nullptr, r2,
                                            fcp, nw, nb, Nv, C);
          },
          l + 1 < L ? "fwd.residual_ln1" : "fwd.residual_lnf", l);
      arena->free(tmp2, s);
      if (recomputed(l, K::kR2, training)) {
        save_shadow(l, ki(K::kR2));
        free_kind(l, ki(K::kR2), s);
      }
      if (!training) {
        for (int k = 0; k < kNumKinds; k++)
          if (acts[l][k].valid()) free_kind(l, k, s);
        if (l + 1 == L) arena->free(x[L], s);
      }
    }
  }

  // ---- recompute of block l on the side stream: rebuild every kind the plan freed ----
  void recompute(int l, const float* P) {
    NvtxRange nvtx_block("recompute.block", l);
    const KindSet& R = plan.recompute[l];
    Stream* s = side.get();
    const Phase ph = Phase::kRecompute;
    const int C = c.channels, NH = c.num_heads, Bv = B, Tv = T, Nv = N;
    LayerW w = weights(P, l);
    auto& A = acts[l];
    if (opt.debug_recompute_delay_ms > 0 && !dry) {
      int ms = opt.debug_recompute_delay_ms;
      s->launch([ms] { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }, "debug.delay",
                l);
    }
    const float* xin = x[l].f32();
    if (R[ki(K::kLN1)]) {
      A[ki(K::kLN1)] = alloc_kind(ki(K::kLN1), s, ph);
      float* out = main_ptr(A[ki(K::kLN1)]);
      float* st = extra_ptr(A[ki(K::kLN1)], ki(K::kLN1));
      s->launch(
          [=] {
            cpu::layernorm_forward(out, st, st ? st + Nv : nullptr, xin, w.ln1w, w.ln1b, Nv, C);
          },
          "recompute.ln1", l);
    }
    const float* ln1 = main_ptr(A[ki(K::kLN1)]);
    if (R[ki(K::kQKV)]) {
      A[ki(K::kQKV)] = alloc_kind(ki(K::kQKV), s, ph);
      float* qkv = main_ptr(A[ki(K::kQKV)]);
      s->launch([=] { cpu::matmul_forward(qkv, ln1, w.qkvw, w.qkvb, Nv, C, 3 * C); },
                "recompute.qkv", l);
    }
    const float* qkv = main_ptr(A[ki(K::kQKV)]);
    if (R[ki(K::kAttn)]) {
      A[ki(K::kAttn)] = alloc_kind(ki(K::kAttn), s, ph);
      float* atty = main_ptr(A[ki(K::kAttn)]);
      float* lse = extra_ptr(A[ki(K::kAttn)], ki(K::kAttn));
      s->launch([=] { cpu::attention_forward(atty, lse, qkv, Bv, Tv, C, NH); },
                "recompute.attention", l);
    }
    const float* atty = main_ptr(A[ki(K::kAttn)]);
    if (R[ki(K::kR2)]) {
      Block tmp = alloc_nc(s, ph, Usage::kActivation, size_t(N) * C, "attproj");
      float* proj = tmp.f32();
      s->launch([=] { cpu::matmul_forward(proj, atty, w.attprojw, w.attprojb, Nv, C, C); },
                "recompute.attproj", l);
      A[ki(K::kR2)] = alloc_kind(ki(K::kR2), s, ph);
      // The fused op also writes LayerNorm 2: into LN2's own block when it is being rebuilt
      // too, else into scratch (the kept LN2 must not be written while it may be read).
      Block ln2b;
      bool ln2_scratch = !R[ki(K::kLN2)];
      if (ln2_scratch)
        ln2b = alloc_kind(ki(K::kLN2), s, ph);
      else
        A[ki(K::kLN2)] = ln2b = alloc_kind(ki(K::kLN2), s, ph);
      float* r2 = main_ptr(A[ki(K::kR2)]);
      float* ln2 = main_ptr(ln2b);
      float* st2 = extra_ptr(ln2b, ki(K::kLN2));
      s->launch(
          [=] {
            cpu::residual_layernorm_forward(r2, ln2, st2, st2 ? st2 + Nv : nullptr, xin, proj,
                                            w.ln2w, w.ln2b, Nv, C);
          },
          "recompute.residual_ln2", l);
      arena->free(tmp, s);
      if (ln2_scratch) arena->free(ln2b, s);
    } else if (R[ki(K::kLN2)]) {
      A[ki(K::kLN2)] = alloc_kind(ki(K::kLN2), s, ph);
      float* ln2 = main_ptr(A[ki(K::kLN2)]);
      float* st2 = extra_ptr(A[ki(K::kLN2)], ki(K::kLN2));
      const float* r2 = main_ptr(A[ki(K::kR2)]);
      s->launch(
          [=] {
            cpu::layernorm_forward(ln2, st2, st2 ? st2 + Nv : nullptr, r2, w.ln2w, w.ln2b, Nv, C);
          },
          "recompute.ln2", l);
    }
    const float* ln2 = main_ptr(A[ki(K::kLN2)]);
    if (R[ki(K::kFCH)]) {
      A[ki(K::kFCH)] = alloc_kind(ki(K::kFCH), s, ph);
      float* fch = main_ptr(A[ki(K::kFCH)]);
      s->launch([=] { cpu::matmul_forward(fch, ln2, w.fcw, w.fcb, Nv, C, 4 * C); }, "recompute.fc",
                l);
    }
    const float* fch = main_ptr(A[ki(K::kFCH)]);
    if (R[ki(K::kGELU)]) {
      A[ki(K::kGELU)] = alloc_kind(ki(K::kGELU), s, ph);
      float* gelu = main_ptr(A[ki(K::kGELU)]);
      const size_t n4 = size_t(N) * 4 * C;
      s->launch([=] { cpu::gelu_forward(gelu, fch, n4); }, "recompute.gelu", l);
    }
    ready[l] = s->record();
  }

  // Compares each recomputed kind of block l with its forward original (main stream, after
  // the ready event). Throws from the stream, naming block, tensor and index.
  void verify(int l) {
    if (!opt.verify_recompute || dry) return;
    for (int k = 0; k < kNumKinds; k++) {
      if (!plan.recompute[l][k]) continue;
      const std::vector<char>* orig = &shadow[l][k];
      const Block b = acts[l][k];
      const KindLayout lay = layout[k];
      const size_t extra_off = align_up(lay.main_elems * 4);
      main->launch(
          [orig, b, lay, extra_off, l] {
            const char* now = static_cast<const char*>(b.ptr);
            auto check = [&](size_t off, size_t elems, const char* name) {
              const float* a = reinterpret_cast<const float*>(orig->data() + off);
              const float* r = reinterpret_cast<const float*>(now + off);
              if (std::memcmp(a, r, elems * 4) == 0) return;
              for (size_t i = 0; i < elems; i++) {
                if (std::memcmp(a + i, r + i, 4) != 0) {
                  throw Error("verify-recompute: block " + std::to_string(l) + " tensor " + name +
                              " differs at index " + std::to_string(i) + ": forward " +
                              std::to_string(a[i]) + ", recompute " + std::to_string(r[i]));
                }
              }
            };
            check(0, lay.main_elems, lay.main_name);
            if (lay.extra_elems) check(extra_off, lay.extra_elems, lay.extra_name);
          },
          "verify.compare", l);
    }
  }

  // ---- backward of block l on the main stream; dres holds d x[l+1] and becomes d x[l] ----
  void backward_block(int l, const float* P, float* G, float* dres, float* scr4, float* scrC) {
    NvtxRange nvtx_block("backward.block", l);
    const int C = c.channels, NH = c.num_heads, Bv = B, Tv = T, Nv = N;
    Stream* s = main.get();
    LayerW w = weights(P, l);
    auto& A = acts[l];
    const float* ln1 = main_ptr(A[ki(K::kLN1)]);
    const float* st1 = extra_ptr(A[ki(K::kLN1)], ki(K::kLN1));
    const float* qkv = main_ptr(A[ki(K::kQKV)]);
    const float* atty = main_ptr(A[ki(K::kAttn)]);
    const float* lse = extra_ptr(A[ki(K::kAttn)], ki(K::kAttn));
    const float* r2 = main_ptr(A[ki(K::kR2)]);
    const float* ln2 = main_ptr(A[ki(K::kLN2)]);
    const float* st2 = extra_ptr(A[ki(K::kLN2)], ki(K::kLN2));
    const float* fch = main_ptr(A[ki(K::kFCH)]);
    const float* gelu = main_ptr(A[ki(K::kGELU)]);
    const float* xin = x[l].f32();
    const size_t Cs = C;
    float* g_ln1w = grad_of(G, 2, l, Cs);
    float* g_ln1b = grad_of(G, 3, l, Cs);
    float* g_qkvw = grad_of(G, 4, l, 3 * Cs * Cs);
    float* g_qkvb = grad_of(G, 5, l, 3 * Cs);
    float* g_attprojw = grad_of(G, 6, l, Cs * Cs);
    float* g_attprojb = grad_of(G, 7, l, Cs);
    float* g_ln2w = grad_of(G, 8, l, Cs);
    float* g_ln2b = grad_of(G, 9, l, Cs);
    float* g_fcw = grad_of(G, 10, l, 4 * Cs * Cs);
    float* g_fcb = grad_of(G, 11, l, 4 * Cs);
    float* g_fcprojw = grad_of(G, 12, l, Cs * 4 * Cs);
    float* g_fcprojb = grad_of(G, 13, l, Cs);
    const size_t n4 = size_t(N) * 4 * C;
    s->launch(
        [=] {
          cpu::matmul_backward(scr4, g_fcprojw, g_fcprojb, dres, gelu, w.fcprojw, Nv, 4 * C, C);
        },
        "bwd.fcproj", l);
    s->launch([=] { cpu::gelu_backward(scr4, fch, scr4, n4); }, "bwd.gelu", l);
    s->launch([=] { cpu::matmul_backward(scrC, g_fcw, g_fcb, scr4, ln2, w.fcw, Nv, C, 4 * C); },
              "bwd.fc", l);
    s->launch(
        [=] {
          cpu::layernorm_backward(dres, g_ln2w, g_ln2b, scrC, r2, w.ln2w, st2,
                                  st2 ? st2 + Nv : nullptr, Nv, C);
        },
        "bwd.ln2", l);
    s->launch(
        [=] {
          cpu::matmul_backward(scrC, g_attprojw, g_attprojb, dres, atty, w.attprojw, Nv, C, C);
        },
        "bwd.attproj", l);
    s->launch([=] { cpu::attention_backward(scr4, scrC, qkv, atty, lse, Bv, Tv, C, NH); },
              "bwd.attention", l);
    s->launch([=] { cpu::matmul_backward(scrC, g_qkvw, g_qkvb, scr4, ln1, w.qkvw, Nv, C, 3 * C); },
              "bwd.qkv", l);
    s->launch(
        [=] {
          cpu::layernorm_backward(dres, g_ln1w, g_ln1b, scrC, xin, w.ln1w, st1,
                                  st1 ? st1 + Nv : nullptr, Nv, C);
        },
        "bwd.ln1", l);
    for (int k = 0; k < kNumKinds; k++) free_kind(l, k, s);
    arena->free(x[l], s);
  }

  float forward_backward(const float* P, float* G, const int* in, const int* tg, float dloss) {
    const int L = c.num_layers, C = c.channels, V = c.vocab_size, Vp = c.padded_vocab;
    const int Nv = N;
    if (!dry) {
      inputs.assign(in, in + N);
      targets.assign(tg, tg + N);
    }
    const int* tok = dry ? nullptr : inputs.data();
    const int* tgt = dry ? nullptr : targets.data();
    forward(P, tok, true);
    // The side stream may start rebuilding once the forward pass has produced its inputs.
    Event fwd_done = main->record();
    side->wait(fwd_done);
    ParamView pv{}, gv{};
    if (P) pv = view_params(const_cast<float*>(P), c);
    if (G) gv = view_params(G, c);
    Stream* s = main.get();
    int next_rc = L - 1;  // next block to hand to the side stream
    auto issue_recompute_down_to = [&](int lowest) {
      for (; next_rc >= std::max(lowest, 0); next_rc--) {
        if (plan.recompute[next_rc] != KindSet{}) recompute(next_rc, P);
      }
    };
    // Classifier: loss and its gradient in row chunks. Its buffers are taken before the
    // look-ahead recompute allocates, so they come from bytes the main stream freed and the
    // classifier never waits on the side stream.
    const Phase ph = Phase::kBackward;
    const int chunk = classifier_chunk();
    Block dlnf = alloc_nc(s, ph, Usage::kWorkspace, size_t(N) * C, "dlnf");
    Block logits = arena->alloc(size_t(chunk) * Vp * es, s, ph, Usage::kWorkspace, "logits");
    Block losses = arena->alloc(size_t(N) * 4, s, ph, Usage::kWorkspace, "losses");
    // Start the look-ahead: the side stream rebuilds the top blocks while the main stream
    // runs the classifier.
    issue_recompute_down_to(L - 1 - opt.lookahead);
    {
      NvtxRange nvtx_classifier("classifier");
      float *lo = losses.f32(), *dx = dlnf.f32(), *ws = logits.f32();
      const float *xf = lnf.f32(), *wte = pv.wte;
      float* dwte = gv.wte;
      float* out = &loss;
      s->launch(
          [=] {
            *out = cpu::classifier_forward_backward(lo, dx, dwte, xf, wte, tgt, Nv, C, V, Vp, dloss,
                                                    ws, chunk);
          },
          "classifier");
    }
    arena->free(logits, s);
    arena->free(losses, s);
    Block dres = alloc_nc(s, ph, Usage::kWorkspace, size_t(N) * C, "dresidual");
    {
      float* d = dres.f32();
      const float *dx = dlnf.f32(), *xL = x[L].f32();
      const float* st = extra_of(lnf, size_t(N) * C);
      const float* w = pv.lnfw;
      float *gw = gv.lnfw, *gb = gv.lnfb;
      const size_t n = size_t(N) * C;
      s->launch(
          [=] {
            std::memset(d, 0, n * sizeof(float));
            cpu::layernorm_backward(d, gw, gb, dx, xL, w, st, st ? st + Nv : nullptr, Nv, C);
          },
          "bwd.lnf");
    }
    arena->free(dlnf, s);
    arena->free(lnf, s);
    arena->free(x[L], s);
    Block scr4 = alloc_nc(s, ph, Usage::kWorkspace, size_t(N) * 4 * C, "dscratch4c");
    Block scrC = alloc_nc(s, ph, Usage::kWorkspace, size_t(N) * C, "dscratch");
    for (int l = L - 1; l >= 0; l--) {
      issue_recompute_down_to(l - opt.lookahead);
      if (plan.recompute[l] != KindSet{}) {
        if (!opt.debug_skip_ready_wait) s->wait(ready[l]);
        verify(l);
      }
      backward_block(l, P, G, dres.f32(), scr4.f32(), scrC.f32());
    }
    {
      const float* d = dres.f32();
      float *dwte = gv.wte, *dwpe = gv.wpe;
      const int Bv = B, Tv = T;
      s->launch([=] { cpu::encoder_backward(dwte, dwpe, d, tok, Bv, Tv, C); }, "bwd.encoder");
    }
    arena->free(scr4, s);
    arena->free(scrC, s);
    arena->free(dres, s);
    side->synchronize();
    main->synchronize();
    return loss;
  }

  // After forward(.., false): the loss (targets) or the logits of one row (pos >= 0).
  float finish_eval(const int* tg, int pos, float* logits_out) {
    const int C = c.channels, V = c.vocab_size, Vp = c.padded_vocab, Nv = N;
    Stream* s = main.get();
    const Phase ph = Phase::kForward;
    ParamView pv{};
    if (params) pv = view_params(const_cast<float*>(params), c);
    if (pos >= 0) {
      const float* row = lnf.ptr ? lnf.f32() + size_t(pos) * C : nullptr;
      const float* wte = pv.wte;
      s->launch([=] { cpu::classifier_logits(logits_out, row, wte, 1, C, V, Vp); },
                "classifier.logits");
    } else {
      const int chunk = classifier_chunk();
      Block logits = arena->alloc(size_t(chunk) * Vp * es, s, ph, Usage::kWorkspace, "logits");
      Block losses = arena->alloc(size_t(N) * 4, s, ph, Usage::kWorkspace, "losses");
      float *lo = losses.f32(), *ws = logits.f32();
      const float *xf = lnf.f32(), *wte = pv.wte;
      float* out = &loss;
      s->launch(
          [=] {
            *out = cpu::classifier_forward_backward(lo, nullptr, nullptr, xf, wte, tg, Nv, C, V, Vp,
                                                    0.0f, ws, chunk);
          },
          "classifier");
      arena->free(logits, s);
      arena->free(losses, s);
    }
    arena->free(lnf, s);
    main->synchronize();
    return loss;
  }
};

GPT2Runner::GPT2Runner(const GPT2Config& c, int B, int T, Plan plan, ActDType dtype,
                       ScheduleOptions opt, bool dry)
    : impl_(std::make_unique<Impl>(c, B, T, std::move(plan), dtype, opt, dry)) {}
GPT2Runner::~GPT2Runner() = default;

float GPT2Runner::forward_backward(const float* params, float* grads, const int* inputs,
                                   const int* targets, float dloss) {
  impl_->params = params;
  impl_->grads = grads;
  return impl_->forward_backward(params, grads, inputs, targets, dloss);
}

float GPT2Runner::forward_loss(const float* params, const int* inputs, const int* targets) {
  Impl& m = *impl_;
  m.params = params;
  m.inputs.assign(inputs, inputs + m.N);
  m.targets.assign(targets, targets + m.N);
  m.forward(params, m.inputs.data(), false);
  return m.finish_eval(m.targets.data(), -1, nullptr);
}

void GPT2Runner::forward_logits(const float* params, const int* inputs, int pos, float* logits) {
  Impl& m = *impl_;
  REMAT_CHECK(pos >= 0 && pos < m.T, "forward_logits: position out of range");
  m.params = params;
  m.inputs.assign(inputs, inputs + m.N);
  m.forward(params, m.inputs.data(), false);
  m.finish_eval(nullptr, pos, logits);
}

const ArenaStats& GPT2Runner::stats() const {
  return impl_->arena->stats();
}
void GPT2Runner::reset_peaks() {
  impl_->arena->reset_peaks();
}
Arena& GPT2Runner::arena() {
  return *impl_->arena;
}
Stream* GPT2Runner::main_stream() {
  return impl_->main.get();
}
Stream* GPT2Runner::side_stream() {
  return impl_->side.get();
}
const Plan& GPT2Runner::plan() const {
  return impl_->plan;
}
int GPT2Runner::B() const {
  return impl_->B;
}
int GPT2Runner::T() const {
  return impl_->T;
}

}  // namespace remat
