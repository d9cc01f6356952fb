#include "models/trainer.h"

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
                 ScheduleOptions sched, std::vector<float> params, Backend* backend)
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
  if (on_host()) {
    params_ = std::move(params);
    grads_.assign(n_, 0.0f);
    m_.assign(n_, 0.0f);
    v_.assign(n_, 0.0f);
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
  auto state_alloc = [&](const char* what) {
    return static_cast<float*>(offload_optimizer_ ? be_->alloc_host(n_ * 4)
                                                  : be_->alloc(n_ * 4, what));
  };
  master_ = state_alloc("master weights");
  m_dev_ = state_alloc("AdamW first moments");
  v_dev_ = state_alloc("AdamW second moments");
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
  if (on_host()) {
    params_ = s.params;
    if (s.m.empty()) {
      std::fill(m_.begin(), m_.end(), 0.0f);
      std::fill(v_.begin(), v_.end(), 0.0f);
    } else {
      m_ = s.m;
      v_ = s.v;
    }
    master_ = params_.data();
    weights_ = params_.data();
    return;
  }
  put_state(master_, s.params.data());
  if (weights_ != master_) be_->upload_elems(weights_, s.params.data(), n_);
  if (s.m.empty()) {
    const std::vector<float> zeros(n_, 0.0f);
    put_state(m_dev_, zeros.data());
    put_state(v_dev_, zeros.data());
  } else {
    put_state(m_dev_, s.m.data());
    put_state(v_dev_, s.v.data());
  }
}

// The fp32 optimizer state (n floats) in and out of where it lives: device memory, or with
// --offload-optimizer pinned host memory (a plain copy once the streams are idle).
void Trainer::put_state(float* dst, const float* host) {
  if (offload_optimizer_)
    std::memcpy(dst, host, n_ * 4);
  else
    be_->upload(dst, host, n_ * 4);
}
void Trainer::get_state(float* host, const float* src) {
  if (offload_optimizer_)
    std::memcpy(host, src, n_ * 4);
  else
    be_->download(host, src, n_ * 4);
}

const std::vector<float>& Trainer::params() {
  runner_.main_stream()->synchronize();
  if (!on_host()) {
    params_.resize(n_);
    get_state(params_.data(), master_);
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
  be_->zero(s, grads_dev_, n_ * be_->elem_bytes(), "zero_grad");
  runner_.reset_peaks();
  const float dloss = 1.0f / (float(B_) * float(T_) * float(accum_));
  double loss_sum = 0;
  for (int a = 0; a < accum_; a++) {
    data.next_batch(inputs_.data(), targets_.data());
    loss_sum +=
        runner_.forward_backward(weights_, grads_dev_, inputs_.data(), targets_.data(), dloss);
  }
  r.loss = static_cast<float>(loss_sum / accum_);
  if (step_ >= nan_first_ && step_ <= nan_last_) r.loss = std::nanf("");
  const double norm = std::sqrt(be_->sum_squares(s, grads_dev_, n_));
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
  const std::vector<ParamTensor> table = param_table(c_);
  for (size_t a = 0; a < table.size();) {
    size_t b = a + 1;
    while (b < table.size() && table[b].decay == table[a].decay) b++;
    const size_t off = table[a].offset, n = table[b - 1].offset + table[b - 1].count() - off;
    cpu::AdamWParams p{r.lr,
                       h_.beta1,
                       h_.beta2,
                       h_.eps,
                       table[a].decay ? h_.weight_decay : 0.0f,
                       static_cast<int>(step_ + 1),
                       scale};
    void* w = weights_ == master_ ? nullptr : static_cast<char*>(weights_) + off * es;
    be_->adamw(s, master_ + off, m_dev_ + off, v_dev_ + off,
               static_cast<char*>(grads_dev_) + off * es, w, n, p);
    a = b;
  }
  s->synchronize();
  step_++;
  return r;
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
    s.m.resize(n_);
    s.v.resize(n_);
    get_state(s.m.data(), m_dev_);
    get_state(s.v.data(), v_dev_);
  }
  s.loader = data.state();
  return s;
}

void Trainer::restore(const TrainState& s) {
  const ModelConfig& a = s.config;
  REMAT_CHECK(a.family == c_.family && a.kv_heads() == c_.kv_heads() &&
                  a.mlp_width() == c_.mlp_width() && a.qkv_bias == c_.qkv_bias &&
                  a.tied_embeddings == c_.tied_embeddings && a.num_layers == c_.num_layers &&
                  a.channels == c_.channels &&
                  a.num_heads == c_.num_heads && a.vocab_size == c_.vocab_size &&
                  a.padded_vocab == c_.padded_vocab && a.max_seq_len == c_.max_seq_len,
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
