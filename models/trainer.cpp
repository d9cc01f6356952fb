#include "models/trainer.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "base/rng.h"
#include "io/params.h"
#include "kernels/adamw.h"
#include "kernels/common.h"
#include "kernels/gradnorm.h"
#include "runtime/nvtx.h"

namespace remat {

float learning_rate(const Hyper& h, int64_t step) {
  if (h.warmup > 0 && step < h.warmup) return h.lr * float(step + 1) / float(h.warmup);
  if (!h.cosine) return h.lr;
  const int64_t span = std::max<int64_t>(1, h.total_steps - h.warmup);
  double frac = std::min(1.0, double(step - h.warmup) / double(span));
  double coeff = 0.5 * (1.0 + std::cos(M_PI * frac));
  return static_cast<float>(h.lr * (h.final_frac + (1.0 - h.final_frac) * coeff));
}

Trainer::Trainer(const ModelConfig& c, int B, int T, int accum, const Hyper& h, Plan plan,
                 ScheduleOptions sched, std::vector<float> params, Backend* backend,
                 const DataParallelOptions& dp)
    : c_(c),
      B_(B),
      T_(T),
      accum_(accum),
      h_(h),
      be_(backend ? backend : cpu_backend()),
      runner_(c, B, T, std::move(plan), be_->dtype(), sched, /*dry=*/false, be_),
      n_(num_params(c)) {
  REMAT_CHECK(params.size() == n_, "initial parameters have " + std::to_string(params.size()) +
                                       " values, the model needs " + std::to_string(n_));
  REMAT_CHECK(accum >= 1, "gradient accumulation steps must be >= 1");
  inputs_.resize(size_t(B) * T);
  targets_.resize(size_t(B) * T);
  opt_n_ = n_;
  if (dp.comm != nullptr && dp.comm->world() > 1) {
    REMAT_REQUIRE(dp.zero == 0 || dp.zero == 1, "--zero must be 0 or 1");
    dp_ = std::make_unique<DataParallel>(
        *dp.comm, runner_.program(),
        grad_ready_order(model_program(c, B, T), runner_.plan(), be_->dtype(), sched),
        dp.bucket_bytes, dp.zero == 1, be_->dtype(),
        on_host() ? ReduceMode::kFold : ReduceMode::kInPlace);
    runner_.set_grad_ready_hook([this](ParamId q, Stream* main) { dp_->on_grad_ready(q, main); });
    if (dp_->zero()) {
      opt_begin_ = dp_->shard_begin();
      opt_n_ = dp_->shard_size();
    }
  }
  if (on_host()) {
    params_ = std::move(params);
    grads_.assign(n_, 0.0f);
    m_.assign(opt_n_, 0.0f);
    v_.assign(opt_n_, 0.0f);
    if (dp_) acc_.assign(dp_->shard_size(), 0.0f);
    if (!dp_ && accum_ > 1) micro_.assign(n_, 0.0f);
    master_ = params_.data();
    weights_ = params_.data();
    grads_dev_ = grads_.data();
    m_dev_ = m_.data();
    v_dev_ = v_.data();
    return;
  }
  const size_t es = be_->elem_bytes();
  // --offload-optimizer: the fp32 master weights and moments live in pinned host memory,
  // which the update kernel reads and writes across the link (the same kernel on the same
  // values: bitwise the update of device-resident state); working weights and gradients stay.
  offload_optimizer_ = sched.offload_optimizer;
  // ZeRO-1 keeps only this rank's shard of the moments, and of the master weights when they
  // are not the working weights themselves.
  master_sharded_ = opt_n_ != n_ && (be_->dtype() != ActDType::kFP32 || offload_optimizer_);
  auto state_alloc = [&](size_t n, const char* what) {
    n = std::max<size_t>(n, 1);
    return static_cast<float*>(offload_optimizer_ ? be_->alloc_host(n * 4)
                                                  : be_->alloc(n * 4, what));
  };
  master_ = state_alloc(master_sharded_ ? opt_n_ : n_, "master weights");
  m_dev_ = state_alloc(opt_n_, "AdamW first moments");
  v_dev_ = state_alloc(opt_n_, "AdamW second moments");
  grads_dev_ = be_->alloc(n_ * es, "gradients");
  weights_ = be_->dtype() == ActDType::kFP32 && !offload_optimizer_
                 ? static_cast<void*>(master_)
                 : be_->alloc(n_ * es, "working weights");
  TrainState s;
  s.params = std::move(params);
  load_weights_and_moments(s);
}

Trainer::~Trainer() {
  runner_.main_stream()->synchronize();
  if (on_host()) return;
  if (weights_ != master_) be_->release(weights_);
  be_->release(grads_dev_);
  for (float* p : {v_dev_, m_dev_, master_}) {
    if (offload_optimizer_)
      be_->release_host(p);
    else
      be_->release(p);
  }
}

void Trainer::load_weights_and_moments(const TrainState& s) {
  REMAT_CHECK(s.params.size() == n_, "training state: wrong parameter count");
  REMAT_CHECK(s.m.empty() || (s.m.size() == n_ && s.v.size() == n_),
              "training state: wrong optimizer state size");
  runner_.main_stream()->synchronize();
  const size_t lo = opt_begin_, hi = opt_begin_ + opt_n_;  // the optimizer's range
  if (on_host()) {
    params_ = s.params;
    if (s.m.empty()) {
      std::fill(m_.begin(), m_.end(), 0.0f);
      std::fill(v_.begin(), v_.end(), 0.0f);
    } else {
      m_.assign(s.m.begin() + lo, s.m.begin() + hi);
      v_.assign(s.v.begin() + lo, s.v.begin() + hi);
    }
    master_ = params_.data();
    weights_ = params_.data();
    return;
  }
  if (master_sharded_)
    put_state(master_, s.params.data() + lo, opt_n_);
  else
    put_state(master_, s.params.data(), n_);
  if (weights_ != master_) be_->upload_elems(weights_, s.params.data(), n_);
  if (s.m.empty()) {
    const std::vector<float> zeros(opt_n_, 0.0f);
    put_state(m_dev_, zeros.data(), opt_n_);
    put_state(v_dev_, zeros.data(), opt_n_);
  } else {
    put_state(m_dev_, s.m.data() + lo, opt_n_);
    put_state(v_dev_, s.v.data() + lo, opt_n_);
  }
}

// The fp32 optimizer state (n floats) in and out of where it lives: device memory, or with
// --offload-optimizer pinned host memory (a plain copy once the streams are idle).
void Trainer::put_state(float* dst, const float* host, size_t n) {
  if (offload_optimizer_)
    std::memcpy(dst, host, n * 4);
  else
    be_->upload(dst, host, n * 4);
}
void Trainer::get_state(float* host, const float* src, size_t n) {
  if (offload_optimizer_)
    std::memcpy(host, src, n * 4);
  else
    be_->download(host, src, n * 4);
}

const std::vector<float>& Trainer::params() {
  runner_.main_stream()->synchronize();
  if (!on_host() && master_sharded_) {
    std::vector<float> shard(opt_n_);
    get_state(shard.data(), master_, opt_n_);
    params_ = dp_->gather_shards(shard);
  } else if (!on_host()) {
    params_.resize(n_);
    get_state(params_.data(), master_, n_);
  }
  return params_;
}

const std::vector<float>& Trainer::grads() {
  runner_.main_stream()->synchronize();
  if (!on_host()) {
    grads_.resize(n_);
    be_->download_elems(grads_.data(), grads_dev_, n_);
  }
  return grads_;
}

StepResult Trainer::step(DataLoader& data) {
  NvtxRange nvtx_step("step");
  StepResult r;
  Stream* s = runner_.main_stream();
  runner_.reset_peaks();
  r.loss = accumulate(data);
  if (step_ >= nan_first_ && step_ <= nan_last_) r.loss = std::nanf("");
  const double norm = std::sqrt(grad_sum_squares());
  r.grad_norm = static_cast<float>(norm);
  r.lr = learning_rate(h_, step_);
  if (!std::isfinite(r.loss) || !std::isfinite(norm)) {
    r.skipped = true;  // the update is not applied; the step still counts for data and schedule
    step_++;
    return r;
  }
  const float scale = cpu::clip_scale(norm, h_.grad_clip);
  NvtxRange nvtx_optimizer("optimizer");
  const size_t es = be_->elem_bytes();
  // One update per run of neighbouring tensors with the same decay (elementwise: the grouping
  // changes no value).
  // With ZeRO-1 each rank updates the part of each run inside its shard, then the owners'
  // weights are broadcast.
  const std::vector<ParamTensor> table = param_table(c_);
  const size_t lo = opt_begin_, hi = opt_begin_ + opt_n_;
  const bool zero = dp_ && dp_->zero();
  for (size_t a = 0; a < table.size();) {
    size_t b = a + 1;
    while (b < table.size() && table[b].decay == table[a].decay) b++;
    const size_t run_begin = std::max(lo, table[a].offset);
    const size_t run_end = std::min(hi, table[b - 1].offset + table[b - 1].count());
    if (run_begin >= run_end) {
      a = b;
      continue;
    }
    const size_t off = run_begin, n = run_end - run_begin;
    cpu::AdamWParams p{r.lr,
                       h_.beta1,
                       h_.beta2,
                       h_.eps,
                       table[a].decay ? h_.weight_decay : 0.0f,
                       static_cast<int>(step_ + 1),
                       scale};
    void* w = weights_ == master_ ? nullptr : static_cast<char*>(weights_) + off * es;
    const void* g = zero && on_host() ? static_cast<const void*>(acc_.data() + (off - lo))
                                      : static_cast<char*>(grads_dev_) + off * es;
    be_->adamw(s, master_ + (master_sharded_ ? off - lo : off), m_dev_ + (off - lo),
               v_dev_ + (off - lo), g, w, n, p);
    a = b;
  }
  if (zero) {
    Stream* cs = dp_->comm().stream();
    cs->wait(s->record());
    dp_->broadcast_shards(weights_, es, "comm.gather_weights");
    s->wait(cs->record());
  }
  s->synchronize();
  step_++;
  return r;
}

float Trainer::accumulate(DataLoader& data) {
  Stream* s = runner_.main_stream();
  const size_t es = be_->elem_bytes();
  const int W = dp_ ? dp_->world() : 1;
  const float dloss = 1.0f / (float(B_) * float(T_) * float(accum_ * W));
  if (dp_) {
    // Micro-step j reads micro-batch j W + rank; its gradient buffer is reduced bucket by
    // bucket under its backward pass (fold mode: every micro-step, from a zeroed buffer; in
    // place: the backward accumulates, the last micro-step reduces).
    std::vector<float> losses(accum_);
    Event reduced;
    for (int j = 0; j < accum_; j++) {
      s->wait(reduced);  // the reductions of micro-step j - 1 have read the buffer
      if (dp_->mode() == ReduceMode::kFold || j == 0)
        be_->zero(s, grads_dev_, n_ * es, "zero_grad");
      dp_->next_batch(data, inputs_.data(), targets_.data());
      dp_->begin_micro_step(j, accum_, grads_dev_, acc_.empty() ? nullptr : acc_.data());
      losses[j] =
          runner_.forward_backward(weights_, grads_dev_, inputs_.data(), targets_.data(), dloss);
      reduced = dp_->end_micro_step();
    }
    s->wait(reduced);
    return dp_->mean_loss(losses);
  }
  be_->zero(s, grads_dev_, n_ * es, "zero_grad");
  double loss_sum = 0;
  for (int a = 0; a < accum_; a++) {
    data.next_batch(inputs_.data(), targets_.data());
    // The CPU folds micro-batches 1, 2, ... in from a buffer of their own (see trainer.h).
    void* g = a > 0 && !micro_.empty() ? static_cast<void*>(micro_.data()) : grads_dev_;
    if (g != grads_dev_) be_->zero(s, g, n_ * 4, "zero_grad");
    loss_sum += runner_.forward_backward(weights_, g, inputs_.data(), targets_.data(), dloss);
    if (g != grads_dev_) {
      float* acc = grads_.data();
      const float* add = micro_.data();
      const size_t n = n_;
      s->launch(
          [acc, add, n] {
            for (size_t i = 0; i < n; i++) acc[i] += add[i];
          },
          "accumulate_grads");
    }
  }
  return static_cast<float>(loss_sum / accum_);
}

double Trainer::grad_sum_squares() {
  Stream* s = runner_.main_stream();
  if (!dp_ || !dp_->zero()) return be_->sum_squares(s, grads_dev_, n_);
  if (on_host()) {
    // cpu::sum_squares's 4096-element block sums of this rank's shard (its boundaries are
    // block boundaries), added in block order across the ranks: the bits of the whole.
    dp_->comm().stream()->synchronize();
    s->synchronize();
    const size_t blk = ShardLayout::kAlign;
    std::vector<double> partial((acc_.size() + blk - 1) / blk);
    for (size_t k = 0; k < partial.size(); k++)
      partial[k] = cpu::sum_squares(acc_.data() + k * blk, std::min(blk, acc_.size() - k * blk));
    return dp_->sum_squares(partial);
  }
  const size_t es = be_->elem_bytes();
  const double mine =
      opt_n_ == 0 ? 0.0
                  : be_->sum_squares(s, static_cast<char*>(grads_dev_) + opt_begin_ * es, opt_n_);
  return dp_->sum_squares({mine});
}

float Trainer::evaluate(DataLoader& data, int batches) {
  data.reset();
  double sum = 0;
  for (int i = 0; i < batches; i++) {
    data.next_batch(inputs_.data(), targets_.data());
    sum += runner_.forward_loss(weights_, inputs_.data(), targets_.data());
  }
  return static_cast<float>(sum / std::max(1, batches));
}

TrainState Trainer::state(const DataLoader& data) {
  TrainState s;
  s.config = c_;
  s.step = step_;
  s.params = params();
  if (on_host()) {
    s.m = m_;
    s.v = v_;
  } else {
    s.m.resize(opt_n_);
    s.v.resize(opt_n_);
    get_state(s.m.data(), m_dev_, opt_n_);
    get_state(s.v.data(), v_dev_, opt_n_);
  }
  if (dp_ && dp_->zero()) {  // every rank's shard, so any world size can resume
    s.m = dp_->gather_shards(s.m);
    s.v = dp_->gather_shards(s.v);
  }
  s.loader = data.state();
  return s;
}

void Trainer::restore(const TrainState& s) {
  const ModelConfig& a = s.config;
  REMAT_CHECK(a.family == c_.family && a.kv_heads() == c_.kv_heads() &&
                  a.mlp_width() == c_.mlp_width() && a.qkv_bias == c_.qkv_bias &&
                  a.tied_embeddings == c_.tied_embeddings && a.num_layers == c_.num_layers &&
                  a.channels == c_.channels && a.num_heads == c_.num_heads &&
                  a.vocab_size == c_.vocab_size && a.padded_vocab == c_.padded_vocab &&
                  a.max_seq_len == c_.max_seq_len,
              "the training state's model shape differs from this run's model");
  load_weights_and_moments(s);
  step_ = s.step;
}

std::vector<int> sample_tokens(const ModelConfig& c, const float* params,
                               const std::vector<int>& prompt, int n, float temperature,
                               uint64_t seed, uint64_t stream) {
  REMAT_CHECK(!prompt.empty(), "sampling needs at least one prompt token");
  const int T = std::min<int>(c.max_seq_len, static_cast<int>(prompt.size()) + n);
  ModelRunner runner(c, 1, T, parse_plan("none", c), ActDType::kFP32, {}, false);
  std::vector<int> seq = prompt, window(T), out;
  std::vector<float> logits(c.padded_vocab);
  Philox rng(seed, stream);
  for (int i = 0; i < n; i++) {
    const int len = std::min<int>(T, static_cast<int>(seq.size()));
    std::fill(window.begin(), window.end(), 0);
    std::copy(seq.end() - len, seq.end(), window.begin());
    runner.forward_logits(params, window.data(), len - 1, logits.data());
    int next = 0;
    if (temperature <= 0) {
      for (int v = 1; v < c.vocab_size; v++)
        if (logits[v] > logits[next]) next = v;
    } else {
      float mx = -INFINITY;
      for (int v = 0; v < c.vocab_size; v++) mx = std::max(mx, logits[v]);
      double sum = 0;
      for (int v = 0; v < c.vocab_size; v++) sum += std::exp((logits[v] - mx) / temperature);
      double u = rng.uniform() * sum, acc = 0;
      next = c.vocab_size - 1;
      for (int v = 0; v < c.vocab_size; v++) {
        acc += std::exp((logits[v] - mx) / temperature);
        if (acc > u) {
          next = v;
          break;
        }
      }
    }
    seq.push_back(next);
    out.push_back(next);
  }
  return out;
}

}  // namespace remat
