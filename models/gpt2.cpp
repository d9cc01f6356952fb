#include "models/gpt2.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>

#include "kernels/common.h"
#include "models/params.h"
#include "profiling/nvtx.h"

namespace remat {

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
  Backend* be;
  int es;  // bytes per activation (and weight, gradient) element
  std::array<KindLayout, kNumKinds> layout;
  std::array<size_t, kNumParamTensors> poff;  // element offset of each parameter tensor
  std::unique_ptr<Stream> main, side;
  std::unique_ptr<Arena> arena;

  // Per step state.
  std::vector<Block> x;                            // x[l]: input of block l; x[L]: final residual
  std::vector<std::array<Block, kNumKinds>> acts;  // acts[l][kind]
  std::vector<Event> ready;                        // recompute of block l finished (side stream)
  Block lnf;                                       // (N, C) + mean, rstd
  std::vector<int> inputs, targets;                // host copies of the step's token ids
  int* tokens_dev = nullptr;                       // backend copies: inputs (N), targets (N)
  float* loss_host = nullptr;                      // the classifier's mean loss (alloc_host)
  // verify-recompute: originals of recomputed kinds, [l][kind]
  std::vector<std::array<std::vector<char>, kNumKinds>> shadow;
  bool training_ = true;

  Impl(const GPT2Config& cfg, int b, int t, Plan p, ActDType dt, ScheduleOptions o, bool d,
       Backend* backend)
      : c(cfg),
        B(b),
        T(t),
        N(b * t),
        plan(std::move(p)),
        dtype(dt),
        opt(o),
        dry(d),
        be(backend ? backend : cpu_backend()) {
    REMAT_CHECK(B > 0 && T > 0, "batch and sequence length must be positive");
    REMAT_CHECK(T <= c.max_seq_len, "sequence length " + std::to_string(T) +
                                        " exceeds the model's maximum " +
                                        std::to_string(c.max_seq_len));
    REMAT_CHECK(static_cast<int>(plan.recompute.size()) == c.num_layers,
                "plan has " + std::to_string(plan.recompute.size()) + " blocks, model has " +
                    std::to_string(c.num_layers));
    REMAT_CHECK(opt.lookahead >= 0, "--lookahead must be >= 0");
    REMAT_CHECK(dry || dtype == be->dtype(), std::string("the ") + be->name() +
                                                 " backend computes in " + dtype_name(be->dtype()) +
                                                 ", not " + dtype_name(dtype));
#ifdef REMAT_INJECT_MISSING_EVENT
    // Test-only build: the missing-event fault (see CMakeLists.txt) in every runner.
    opt.debug_skip_ready_wait = true;
    opt.debug_recompute_delay_ms = std::max(opt.debug_recompute_delay_ms, 5);
#endif
    es = act_bytes(dtype);
    for (int k = 0; k < kNumKinds; k++) layout[k] = kind_layout(c, N, k);
    poff = param_offsets(c);
    if (dry) {
      main = make_null_stream("main", 0);
      side = make_null_stream("recompute", 1);
      arena = std::make_unique<Arena>(std::numeric_limits<size_t>::max(), nullptr);
    } else {
      size_t need = 0;
      {
        Impl probe(cfg, b, t, plan, dt, o, true, be);
        probe.forward_backward(nullptr, nullptr, nullptr, nullptr, 1.0f);
        need = probe.arena->stats().extent_peak;
        Impl probe_eval(cfg, b, t, plan, dt, o, true, be);
        probe_eval.forward(nullptr, nullptr, false);
        probe_eval.finish_eval(nullptr, nullptr, -1, nullptr);
        need = std::max(need, probe_eval.arena->stats().extent_peak);
      }
      main = be->make_stream("remat-main", 0);
      side = be->make_stream("remat-recompute", 1);
      arena = std::make_unique<Arena>(std::max<size_t>(need, Arena::kAlign), be->memory());
      be->reserve_scratch(B, T, c.channels, c.num_heads, c.padded_vocab);
      tokens_dev = static_cast<int*>(be->alloc(size_t(2) * N * sizeof(int), "token ids"));
      loss_host = static_cast<float*>(be->alloc_host(sizeof(float)));
    }
    x.resize(c.num_layers + 1);
    acts.resize(c.num_layers);
    ready.resize(c.num_layers);
    if (opt.verify_recompute) shadow.resize(c.num_layers);
  }

  ~Impl() {
    if (main) main->synchronize();
    if (side) side->synchronize();
    arena.reset();
    if (tokens_dev) be->release(tokens_dev);
    if (loss_host) be->release_host(loss_host);
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
  // The fp32 part after an activation's main tensor (LN mean then rstd, or attention lse).
  float* extra_ptr(const Block& b, int k) const {
    return extra_of(b, layout[k].main_elems);
  }
  Block alloc_nc(Stream* s, Phase ph, Usage u, size_t elems, const char* name, size_t extra = 0) {
    return arena->alloc(align_up(elems * es) + align_up(extra * 4), s, ph, u, name);
  }
  float* extra_of(const Block& b, size_t main_elems) const {
    if (!b.ptr) return nullptr;
    return reinterpret_cast<float*>(static_cast<char*>(b.ptr) + align_up(main_elems * es));
  }
  // LayerNorm statistics are stored as mean (n) then rstd (n).
  static float* rstd_of(float* mean, int n) {
    return mean ? mean + n : nullptr;
  }
  static const float* rstd_of(const float* mean, int n) {
    return mean ? mean + n : nullptr;
  }

  // Element `tensor`'s slice for block l (per_layer elements per block) within a flat buffer
  // of the backend's dtype; nullptr for a null base (dry run).
  void* tensor_of(const void* base, int tensor, int l = 0, size_t per_layer = 0) const {
    if (!base) return nullptr;
    return const_cast<char*>(static_cast<const char*>(base)) + (poff[tensor] + l * per_layer) * es;
  }

  // Parameter (or gradient) pointers of block l in a flat buffer.
  struct LayerW {
    void *ln1w, *ln1b, *qkvw, *qkvb, *attprojw, *attprojb, *ln2w, *ln2b, *fcw, *fcb, *fcprojw,
        *fcprojb;
  };
  LayerW layer(const void* base, int l) const {
    const size_t C = c.channels;
    return LayerW{tensor_of(base, 2, l, C),          tensor_of(base, 3, l, C),
                  tensor_of(base, 4, l, 3 * C * C),  tensor_of(base, 5, l, 3 * C),
                  tensor_of(base, 6, l, C * C),      tensor_of(base, 7, l, C),
                  tensor_of(base, 8, l, C),          tensor_of(base, 9, l, C),
                  tensor_of(base, 10, l, 4 * C * C), tensor_of(base, 11, l, 4 * C),
                  tensor_of(base, 12, l, C * 4 * C), tensor_of(base, 13, l, C)};
  }

  bool recomputed(int l, K k, bool training) const {
    return !training || plan.recompute[l][ki(k)];
  }

  // Copies a kind's bytes aside before it is freed (verify-recompute).
  void save_shadow(int l, int k) {
    if (!opt.verify_recompute || dry || !training_) return;
    std::vector<char>& dst = shadow[l][k];
    dst.resize(kind_bytes(k));
    be->copy_to_host(main.get(), dst.data(), acts[l][k].ptr, dst.size(), "verify.save", l);
  }

  void free_kind(int l, int k, Stream* s) {
    arena->free(acts[l][k], s);
  }

  // ---- forward ----
  // training = false: every activation is freed after its last forward use (evaluation).
  void forward(const void* P, const int* tok, bool training) {
    training_ = training;
    const int L = c.num_layers, C = c.channels, NH = c.num_heads;
    Stream* s = main.get();
    const Phase ph = Phase::kForward;
    x[0] = alloc_nc(s, ph, Usage::kActivation, size_t(N) * C, "x");
    be->encoder_forward(s, x[0].ptr, tok, tensor_of(P, 0), tensor_of(P, 1), B, T, C);
    // LN1 of block 0 (later blocks get theirs from the fused residual at the block boundary).
    {
      Block& ln1 = acts[0][ki(K::kLN1)];
      ln1 = alloc_kind(ki(K::kLN1), s, ph);
      float* st = extra_ptr(ln1, ki(K::kLN1));
      const LayerW w = layer(P, 0);
      be->layernorm_forward(s, ln1.ptr, st, rstd_of(st, N), x[0].ptr, w.ln1w, w.ln1b, N, C,
                            "fwd.ln1", 0);
    }
    for (int l = 0; l < L; l++) {
      NvtxRange nvtx_block("forward.block", l);
      const LayerW w = layer(P, l);
      auto& A = acts[l];
      A[ki(K::kQKV)] = alloc_kind(ki(K::kQKV), s, ph);
      void* qkv = A[ki(K::kQKV)].ptr;
      be->matmul_forward(s, qkv, A[ki(K::kLN1)].ptr, w.qkvw, w.qkvb, N, C, 3 * C, "fwd.qkv", l);
      if (recomputed(l, K::kLN1, training)) {
        save_shadow(l, ki(K::kLN1));
        free_kind(l, ki(K::kLN1), s);
      }
      A[ki(K::kAttn)] = alloc_kind(ki(K::kAttn), s, ph);
      void* atty = A[ki(K::kAttn)].ptr;
      be->attention_forward(s, atty, extra_ptr(A[ki(K::kAttn)], ki(K::kAttn)), qkv, B, T, C, NH,
                            "fwd.attention", l);
      if (recomputed(l, K::kQKV, training)) {
        save_shadow(l, ki(K::kQKV));
        free_kind(l, ki(K::kQKV), s);
      }
      Block tmp = alloc_nc(s, ph, Usage::kActivation, size_t(N) * C, "attproj");
      be->matmul_forward(s, tmp.ptr, atty, w.attprojw, w.attprojb, N, C, C, "fwd.attproj", l);
      if (recomputed(l, K::kAttn, training)) {
        save_shadow(l, ki(K::kAttn));
        free_kind(l, ki(K::kAttn), s);
      }
      A[ki(K::kR2)] = alloc_kind(ki(K::kR2), s, ph);
      A[ki(K::kLN2)] = alloc_kind(ki(K::kLN2), s, ph);
      void* ln2 = A[ki(K::kLN2)].ptr;
      float* st2 = extra_ptr(A[ki(K::kLN2)], ki(K::kLN2));
      be->residual_layernorm_forward(s, A[ki(K::kR2)].ptr, ln2, st2, rstd_of(st2, N), x[l].ptr,
                                     tmp.ptr, w.ln2w, w.ln2b, N, C, "fwd.residual_ln2", l);
      arena->free(tmp, s);
      if (!training) arena->free(x[l], s);
      A[ki(K::kFCH)] = alloc_kind(ki(K::kFCH), s, ph);
      void* fch = A[ki(K::kFCH)].ptr;
      be->matmul_forward(s, fch, ln2, w.fcw, w.fcb, N, C, 4 * C, "fwd.fc", l);
      if (recomputed(l, K::kLN2, training)) {
        save_shadow(l, ki(K::kLN2));
        free_kind(l, ki(K::kLN2), s);
      }
      A[ki(K::kGELU)] = alloc_kind(ki(K::kGELU), s, ph);
      void* gelu = A[ki(K::kGELU)].ptr;
      be->gelu_forward(s, gelu, fch, size_t(N) * 4 * C, "fwd.gelu", l);
      if (recomputed(l, K::kFCH, training)) {
        save_shadow(l, ki(K::kFCH));
        free_kind(l, ki(K::kFCH), s);
      }
      Block tmp2 = alloc_nc(s, ph, Usage::kActivation, size_t(N) * C, "fcproj");
      be->matmul_forward(s, tmp2.ptr, gelu, w.fcprojw, w.fcprojb, N, 4 * C, C, "fwd.fcproj", l);
      if (recomputed(l, K::kGELU, training)) {
        save_shadow(l, ki(K::kGELU));
        free_kind(l, ki(K::kGELU), s);
      }
      // Block boundary: x[l+1] = r2 + fcproj, fused with the next LayerNorm (ln1 of block
      // l+1, or the final LayerNorm).
      x[l + 1] = alloc_nc(s, ph, Usage::kActivation, size_t(N) * C, "x");
      void *nw, *nb, *ln_out;
      float* ln_st;
      if (l + 1 < L) {
        Block& next = acts[l + 1][ki(K::kLN1)];
        next = alloc_kind(ki(K::kLN1), s, ph);
        const LayerW w1 = layer(P, l + 1);
        nw = w1.ln1w;
        nb = w1.ln1b;
        ln_out = next.ptr;
        ln_st = extra_ptr(next, ki(K::kLN1));
      } else {
        lnf = alloc_nc(s, ph, Usage::kActivation, size_t(N) * C, "lnf", 2 * size_t(N));
        nw = tensor_of(P, 14);
        nb = tensor_of(P, 15);
        ln_out = lnf.ptr;
        ln_st = extra_of(lnf, size_t(N) * C);
      }
      be->residual_layernorm_forward(s, x[l + 1].ptr, ln_out, ln_st, rstd_of(ln_st, N),
                                     A[ki(K::kR2)].ptr, tmp2.ptr, nw, nb, N, C,
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
  void recompute(int l, const void* P) {
    NvtxRange nvtx_block("recompute.block", l);
    const KindSet& R = plan.recompute[l];
    Stream* s = side.get();
    const Phase ph = Phase::kRecompute;
    const int C = c.channels, NH = c.num_heads;
    const LayerW w = layer(P, l);
    auto& A = acts[l];
    if (opt.debug_recompute_delay_ms > 0 && !dry) {
      int ms = opt.debug_recompute_delay_ms;
      be->host_task(
          s, [ms] { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }, "debug.delay",
          l);
    }
    const void* xin = x[l].ptr;
    if (R[ki(K::kLN1)]) {
      A[ki(K::kLN1)] = alloc_kind(ki(K::kLN1), s, ph);
      float* st = extra_ptr(A[ki(K::kLN1)], ki(K::kLN1));
      be->layernorm_forward(s, A[ki(K::kLN1)].ptr, st, rstd_of(st, N), xin, w.ln1w, w.ln1b, N, C,
                            "recompute.ln1", l);
    }
    if (R[ki(K::kQKV)]) {
      A[ki(K::kQKV)] = alloc_kind(ki(K::kQKV), s, ph);
      be->matmul_forward(s, A[ki(K::kQKV)].ptr, A[ki(K::kLN1)].ptr, w.qkvw, w.qkvb, N, C, 3 * C,
                         "recompute.qkv", l);
    }
    if (R[ki(K::kAttn)]) {
      A[ki(K::kAttn)] = alloc_kind(ki(K::kAttn), s, ph);
      be->attention_forward(s, A[ki(K::kAttn)].ptr, extra_ptr(A[ki(K::kAttn)], ki(K::kAttn)),
                            A[ki(K::kQKV)].ptr, B, T, C, NH, "recompute.attention", l);
    }
    if (R[ki(K::kR2)]) {
      Block tmp = alloc_nc(s, ph, Usage::kActivation, size_t(N) * C, "attproj");
      be->matmul_forward(s, tmp.ptr, A[ki(K::kAttn)].ptr, w.attprojw, w.attprojb, N, C, C,
                         "recompute.attproj", l);
      A[ki(K::kR2)] = alloc_kind(ki(K::kR2), s, ph);
      // The fused op also writes LayerNorm 2: into LN2's own block when it is being rebuilt
      // too, else into scratch (the kept LN2 must not be written while it may be read).
      Block ln2b;
      const bool ln2_scratch = !R[ki(K::kLN2)];
      if (ln2_scratch)
        ln2b = alloc_kind(ki(K::kLN2), s, ph);
      else
        A[ki(K::kLN2)] = ln2b = alloc_kind(ki(K::kLN2), s, ph);
      float* st2 = extra_ptr(ln2b, ki(K::kLN2));
      be->residual_layernorm_forward(s, A[ki(K::kR2)].ptr, ln2b.ptr, st2, rstd_of(st2, N), xin,
                                     tmp.ptr, w.ln2w, w.ln2b, N, C, "recompute.residual_ln2", l);
      arena->free(tmp, s);
      if (ln2_scratch) arena->free(ln2b, s);
    } else if (R[ki(K::kLN2)]) {
      A[ki(K::kLN2)] = alloc_kind(ki(K::kLN2), s, ph);
      float* st2 = extra_ptr(A[ki(K::kLN2)], ki(K::kLN2));
      be->layernorm_forward(s, A[ki(K::kLN2)].ptr, st2, rstd_of(st2, N), A[ki(K::kR2)].ptr, w.ln2w,
                            w.ln2b, N, C, "recompute.ln2", l);
    }
    if (R[ki(K::kFCH)]) {
      A[ki(K::kFCH)] = alloc_kind(ki(K::kFCH), s, ph);
      be->matmul_forward(s, A[ki(K::kFCH)].ptr, A[ki(K::kLN2)].ptr, w.fcw, w.fcb, N, C, 4 * C,
                         "recompute.fc", l);
    }
    if (R[ki(K::kGELU)]) {
      A[ki(K::kGELU)] = alloc_kind(ki(K::kGELU), s, ph);
      be->gelu_forward(s, A[ki(K::kGELU)].ptr, A[ki(K::kFCH)].ptr, size_t(N) * 4 * C,
                       "recompute.gelu", l);
    }
    ready[l] = s->record();
  }

  // Compares each recomputed kind of block l with its forward original, bit for bit (on the
  // main stream's order, after the ready event). Throws, naming block, tensor and index.
  void verify(int l) {
    if (!opt.verify_recompute || dry) return;
    for (int k = 0; k < kNumKinds; k++) {
      if (!plan.recompute[l][k]) continue;
      auto now = std::make_shared<std::vector<char>>(kind_bytes(k));
      be->copy_to_host(main.get(), now->data(), acts[l][k].ptr, now->size(), "verify.load", l);
      const std::vector<char>* orig = &shadow[l][k];
      const KindLayout lay = layout[k];
      const size_t extra_off = align_up(lay.main_elems * es);
      const int esz = es;
      be->host_task(
          main.get(),
          [orig, now, lay, extra_off, l, esz] {
            auto check = [&](size_t off, size_t elems, int size, const char* name) {
              const char* a = orig->data() + off;
              const char* r = now->data() + off;
              if (std::memcmp(a, r, elems * size) == 0) return;
              for (size_t i = 0; i < elems; i++) {
                if (std::memcmp(a + i * size, r + i * size, size) != 0) {
                  throw Error("verify-recompute: block " + std::to_string(l) + " tensor " + name +
                              " differs at index " + std::to_string(i) + ": forward " +
                              element_string(a + i * size, size) + ", recompute " +
                              element_string(r + i * size, size));
                }
              }
            };
            check(0, lay.main_elems, esz, lay.main_name);
            if (lay.extra_elems) check(extra_off, lay.extra_elems, 4, lay.extra_name);
          },
          "verify.compare", l);
    }
  }
  // One stored element (fp32, or bf16 as the top half of an fp32) as text.
  static std::string element_string(const char* p, int size) {
    uint32_t bits = 0;
    if (size == 2) {
      uint16_t h;
      std::memcpy(&h, p, 2);
      bits = uint32_t(h) << 16;
    } else {
      std::memcpy(&bits, p, 4);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return std::to_string(f);
  }

  // ---- backward of block l on the main stream; dres holds d x[l+1] and becomes d x[l] ----
  void backward_block(int l, const void* P, void* G, void* dres, void* scr4, void* scrC) {
    NvtxRange nvtx_block("backward.block", l);
    const int C = c.channels, NH = c.num_heads;
    Stream* s = main.get();
    const LayerW w = layer(P, l), g = layer(G, l);
    auto& A = acts[l];
    const float* st1 = extra_ptr(A[ki(K::kLN1)], ki(K::kLN1));
    const float* st2 = extra_ptr(A[ki(K::kLN2)], ki(K::kLN2));
    const float* lse = extra_ptr(A[ki(K::kAttn)], ki(K::kAttn));
    const void* atty = A[ki(K::kAttn)].ptr;
    be->matmul_backward(s, scr4, g.fcprojw, g.fcprojb, dres, A[ki(K::kGELU)].ptr, w.fcprojw, N,
                        4 * C, C, "bwd.fcproj", l);
    be->gelu_backward(s, scr4, A[ki(K::kFCH)].ptr, scr4, size_t(N) * 4 * C, "bwd.gelu", l);
    be->matmul_backward(s, scrC, g.fcw, g.fcb, scr4, A[ki(K::kLN2)].ptr, w.fcw, N, C, 4 * C,
                        "bwd.fc", l);
    be->layernorm_backward(s, dres, g.ln2w, g.ln2b, scrC, A[ki(K::kR2)].ptr, w.ln2w, st2,
                           rstd_of(st2, N), N, C, "bwd.ln2", l);
    be->matmul_backward(s, scrC, g.attprojw, g.attprojb, dres, atty, w.attprojw, N, C, C,
                        "bwd.attproj", l);
    be->attention_backward(s, scr4, scrC, A[ki(K::kQKV)].ptr, atty, lse, B, T, C, NH,
                           "bwd.attention", l);
    be->matmul_backward(s, scrC, g.qkvw, g.qkvb, scr4, A[ki(K::kLN1)].ptr, w.qkvw, N, C, 3 * C,
                        "bwd.qkv", l);
    be->layernorm_backward(s, dres, g.ln1w, g.ln1b, scrC, x[l].ptr, w.ln1w, st1, rstd_of(st1, N), N,
                           C, "bwd.ln1", l);
    for (int k = 0; k < kNumKinds; k++) free_kind(l, k, s);
    arena->free(x[l], s);
  }

  // Copies the step's token ids to the backend (the host copies live until the step ends).
  void stage_tokens(const int* in, const int* tg) {
    if (dry) return;
    const size_t n = size_t(N);
    if (in) {
      inputs.assign(in, in + n);
      be->upload_async(main.get(), tokens_dev, inputs.data(), n * sizeof(int), "upload.inputs");
    }
    if (tg) {
      targets.assign(tg, tg + n);
      be->upload_async(main.get(), tokens_dev + n, targets.data(), n * sizeof(int),
                       "upload.targets");
    }
  }
  const int* dev_inputs() const {
    return tokens_dev;
  }
  const int* dev_targets() const {
    return tokens_dev ? tokens_dev + N : nullptr;
  }

  float forward_backward(const void* P, void* G, const int* in, const int* tg, float dloss) {
    const int L = c.num_layers, C = c.channels, V = c.vocab_size, Vp = c.padded_vocab;
    arena->rewind();
    stage_tokens(in, tg);
    forward(P, dev_inputs(), true);
    // The side stream may start rebuilding once the forward pass has produced its inputs.
    Event fwd_done = main->record();
    side->wait(fwd_done);
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
      be->classifier(s, losses.f32(), dlnf.ptr, tensor_of(G, 0), lnf.ptr, tensor_of(P, 0),
                     dev_targets(), N, C, V, Vp, dloss, logits.ptr, chunk, loss_host);
    }
    arena->free(logits, s);
    arena->free(losses, s);
    Block dres = alloc_nc(s, ph, Usage::kWorkspace, size_t(N) * C, "dresidual");
    {
      const float* st = extra_of(lnf, size_t(N) * C);
      be->zero(s, dres.ptr, size_t(N) * C * es, "bwd.zero_dresidual");
      be->layernorm_backward(s, dres.ptr, tensor_of(G, 14), tensor_of(G, 15), dlnf.ptr, x[L].ptr,
                             tensor_of(P, 14), st, rstd_of(st, N), N, C, "bwd.lnf", -1);
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
      backward_block(l, P, G, dres.ptr, scr4.ptr, scrC.ptr);
    }
    be->encoder_backward(s, tensor_of(G, 0), tensor_of(G, 1), dres.ptr, dev_inputs(), B, T, C, Vp);
    arena->free(scr4, s);
    arena->free(scrC, s);
    arena->free(dres, s);
    side->synchronize();
    main->synchronize();
    return loss_host ? *loss_host : 0.0f;
  }

  // After forward(.., false): the loss (targets) or the logits of one row (pos >= 0).
  float finish_eval(const void* P, const int* tg, int pos, float* logits_out) {
    const int C = c.channels, V = c.vocab_size, Vp = c.padded_vocab;
    Stream* s = main.get();
    const Phase ph = Phase::kForward;
    if (pos >= 0) {
      const void* row =
          lnf.ptr ? static_cast<const char*>(lnf.ptr) + size_t(pos) * C * es : nullptr;
      be->classifier_logits(s, logits_out, row, tensor_of(P, 0), 1, C, V, Vp);
    } else {
      const int chunk = classifier_chunk();
      Block logits = arena->alloc(size_t(chunk) * Vp * es, s, ph, Usage::kWorkspace, "logits");
      Block losses = arena->alloc(size_t(N) * 4, s, ph, Usage::kWorkspace, "losses");
      be->classifier(s, losses.f32(), nullptr, nullptr, lnf.ptr, tensor_of(P, 0), tg, N, C, V, Vp,
                     0.0f, logits.ptr, chunk, loss_host);
      arena->free(logits, s);
      arena->free(losses, s);
    }
    arena->free(lnf, s);
    main->synchronize();
    return loss_host ? *loss_host : 0.0f;
  }
};

GPT2Runner::GPT2Runner(const GPT2Config& c, int B, int T, Plan plan, ActDType dtype,
                       ScheduleOptions opt, bool dry, Backend* backend)
    : impl_(std::make_unique<Impl>(c, B, T, std::move(plan), dtype, opt, dry, backend)) {}
GPT2Runner::~GPT2Runner() = default;

float GPT2Runner::forward_backward(const void* params, void* grads, const int* inputs,
                                   const int* targets, float dloss) {
  return impl_->forward_backward(params, grads, inputs, targets, dloss);
}

float GPT2Runner::forward_loss(const void* params, const int* inputs, const int* targets) {
  Impl& m = *impl_;
  m.arena->rewind();
  m.stage_tokens(inputs, targets);
  m.forward(params, m.dev_inputs(), false);
  return m.finish_eval(params, m.dev_targets(), -1, nullptr);
}

void GPT2Runner::forward_logits(const void* params, const int* inputs, int pos, float* logits) {
  Impl& m = *impl_;
  REMAT_CHECK(pos >= 0 && pos < m.T, "forward_logits: position out of range");
  m.arena->rewind();
  m.stage_tokens(inputs, nullptr);
  m.forward(params, m.dev_inputs(), false);
  m.finish_eval(params, nullptr, pos, logits);
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
Backend& GPT2Runner::backend() {
  return *impl_->be;
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
