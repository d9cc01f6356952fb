#include "models/trainer.h"

#include <cmath>
#include <cstring>

#include "kernels/adamw.h"
#include "kernels/common.h"
#include "kernels/gradnorm.h"
#include "models/params.h"
#include "profiling/nvtx.h"

namespace remat {

float learning_rate(const Hyper& h, int64_t step) {
  if (h.warmup > 0 && step < h.warmup) return h.lr * float(step + 1) / float(h.warmup);
  if (!h.cosine) return h.lr;
  const int64_t span = std::max<int64_t>(1, h.total_steps - h.warmup);
  double frac = std::min(1.0, double(step - h.warmup) / double(span));
  double coeff = 0.5 * (1.0 + std::cos(M_PI * frac));
  return static_cast<float>(h.lr * (h.final_frac + (1.0 - h.final_frac) * coeff));
}

Trainer::Trainer(const GPT2Config& c, int B, int T, int accum, const Hyper& h, Plan plan,
                 ScheduleOptions sched, std::vector<float> params)
    : c_(c),
      B_(B),
      T_(T),
      accum_(accum),
      h_(h),
      runner_(c, B, T, std::move(plan), ActDType::kFP32, sched, /*dry=*/false),
      params_(std::move(params)) {
  REMAT_CHECK(params_.size() == num_params(c),
              "initial parameters have " + std::to_string(params_.size()) +
                  " values, the model needs " + std::to_string(num_params(c)));
  REMAT_CHECK(accum >= 1, "gradient accumulation steps must be >= 1");
  grads_.assign(params_.size(), 0.0f);
  m_.assign(params_.size(), 0.0f);
  v_.assign(params_.size(), 0.0f);
  inputs_.resize(size_t(B) * T);
  targets_.resize(size_t(B) * T);
}

StepResult Trainer::step(DataLoader& data) {
  NvtxRange nvtx_step("step");
  StepResult r;
  std::fill(grads_.begin(), grads_.end(), 0.0f);
  runner_.reset_peaks();
  const float dloss = 1.0f / (float(B_) * float(T_) * float(accum_));
  double loss_sum = 0;
  for (int a = 0; a < accum_; a++) {
    data.next_batch(inputs_.data(), targets_.data());
    loss_sum += runner_.forward_backward(params_.data(), grads_.data(), inputs_.data(),
                                         targets_.data(), dloss);
  }
  r.loss = static_cast<float>(loss_sum / accum_);
  if (step_ >= nan_first_ && step_ <= nan_last_) r.loss = std::nanf("");
  const double norm = std::sqrt(cpu::sum_squares(grads_.data(), grads_.size()));
  r.grad_norm = static_cast<float>(norm);
  r.lr = learning_rate(h_, step_);
  if (!std::isfinite(r.loss) || !std::isfinite(norm)) {
    r.skipped = true;  // the update is not applied; the step still counts for data and schedule
    step_++;
    return r;
  }
  const float scale = cpu::clip_scale(norm, h_.grad_clip);
  auto sizes = param_sizes(c_);
  auto offs = param_offsets(c_);
  NvtxRange nvtx_optimizer("optimizer");
  for (int t = 0; t < kNumParamTensors; t++) {
    cpu::AdamWParams p{r.lr,
                       h_.beta1,
                       h_.beta2,
                       h_.eps,
                       param_decays(t) ? h_.weight_decay : 0.0f,
                       static_cast<int>(step_ + 1),
                       scale};
    cpu::adamw_update(params_.data() + offs[t], m_.data() + offs[t], v_.data() + offs[t],
                      grads_.data() + offs[t], sizes[t], p);
  }
  step_++;
  return r;
}

float Trainer::evaluate(DataLoader& data, int batches) {
  data.reset();
  double sum = 0;
  for (int i = 0; i < batches; i++) {
    data.next_batch(inputs_.data(), targets_.data());
    sum += runner_.forward_loss(params_.data(), inputs_.data(), targets_.data());
  }
  return static_cast<float>(sum / std::max(1, batches));
}

TrainState Trainer::state(const DataLoader& data) const {
  TrainState s;
  s.config = c_;
  s.step = step_;
  s.params = params_;
  s.m = m_;
  s.v = v_;
  s.loader = data.state();
  return s;
}

void Trainer::restore(const TrainState& s) {
  const GPT2Config& a = s.config;
  REMAT_CHECK(a.num_layers == c_.num_layers && a.channels == c_.channels &&
                  a.num_heads == c_.num_heads && a.vocab_size == c_.vocab_size &&
                  a.padded_vocab == c_.padded_vocab && a.max_seq_len == c_.max_seq_len,
              "the training state's model shape differs from this run's model");
  REMAT_CHECK(s.params.size() == params_.size(), "training state: wrong parameter count");
  params_ = s.params;
  if (s.m.empty()) {
    std::fill(m_.begin(), m_.end(), 0.0f);
    std::fill(v_.begin(), v_.end(), 0.0f);
  } else {
    REMAT_CHECK(s.m.size() == params_.size() && s.v.size() == params_.size(),
                "training state: wrong optimizer state size");
    m_ = s.m;
    v_ = s.v;
  }
  step_ = s.step;
}

}  // namespace remat
