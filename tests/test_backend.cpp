// The contract between the model and its backend, checked on the CPU so that the CUDA
// backend's assumptions are tested where CI runs:
// - ops that use the backend's own kernel scratch (the backward kernels, the gradient norm,
//   the one-row logits) run on the main stream only: the CUDA backend shares one scratch
//   buffer among them (runtime/cuda/cuda_backend.h);
// - the recompute stream runs forward kernels only, under "recompute.*" labels;
// - nothing is allocated from the backend during a step (only when a runner or trainer is
//   made), and the scratch is reserved before the first step;
// - every op is enqueued on a stream the runner owns.
#include <gtest/gtest.h>

#include <cctype>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "kernels/common.h"
#include "models/trainer.h"
#include "tests/tiny_model.h"

namespace remat {
namespace {

// Forwards everything to the CPU backend and records which op ran on which stream.
class CheckingBackend final : public Backend {
 public:
  struct Call {
    std::string op;
    int stream;  // Stream::id(), -1 without a stream
    std::string label;
  };
  std::vector<Call> calls;
  int allocs = 0, scratch_reservations = 0;

  const char* name() const override { return "checking-cpu"; }
  ActDType dtype() const override { return ActDType::kFP32; }
  std::string describe() const override { return "checking " + cpu().describe(); }
  std::unique_ptr<Stream> make_stream(const std::string& n, int id) override {
    return cpu().make_stream(n, id);
  }
  MemoryResource* memory() override { return cpu().memory(); }
  uint64_t available_bytes() const override { return cpu().available_bytes(); }
  void* alloc(size_t bytes, const char* what) override {
    allocs++;
    return cpu().alloc(bytes, what);
  }
  void release(void* p) override { cpu().release(p); }
  void upload(void* d, const void* s, size_t b) override { cpu().upload(d, s, b); }
  void download(void* d, const void* s, size_t b) override { cpu().download(d, s, b); }
  void upload_elems(void* d, const float* s, size_t n) override { cpu().upload_elems(d, s, n); }
  void download_elems(float* d, const void* s, size_t n) override { cpu().download_elems(d, s, n); }
  void* alloc_host(size_t bytes) override {
    allocs++;
    return cpu().alloc_host(bytes);
  }
  void release_host(void* p) override { cpu().release_host(p); }
  void reserve_scratch(int B, int T, int C, int NH, int Vp) override {
    scratch_reservations++;
    cpu().reserve_scratch(B, T, C, NH, Vp);
  }

  void zero(Stream* s, void* p, size_t bytes, const char* label) override {
    note("zero", s, label);
    cpu().zero(s, p, bytes, label);
  }
  void copy_to_host(Stream* s, void* d, const void* src, size_t bytes, const char* label,
                    int block) override {
    note("copy_to_host", s, label);
    cpu().copy_to_host(s, d, src, bytes, label, block);
  }
  void upload_async(Stream* s, void* d, const void* src, size_t bytes, const char* label) override {
    note("upload_async", s, label);
    cpu().upload_async(s, d, src, bytes, label);
  }
  void host_task(Stream* s, std::function<void()> fn, const char* label, int block) override {
    note("host_task", s, label);
    cpu().host_task(s, std::move(fn), label, block);
  }
  void encoder_forward(Stream* s, void* out, const int* tok, const void* wte, const void* wpe,
                       int B, int T, int C) override {
    note("encoder_forward", s, "fwd.encoder");
    cpu().encoder_forward(s, out, tok, wte, wpe, B, T, C);
  }
  void encoder_backward(Stream* s, void* dwte, void* dwpe, const void* dout, const int* tok, int B,
                        int T, int C, int Vp) override {
    note("encoder_backward", s, "bwd.encoder");
    cpu().encoder_backward(s, dwte, dwpe, dout, tok, B, T, C, Vp);
  }
  void layernorm_forward(Stream* s, void* out, float* mean, float* rstd, const void* inp,
                         const void* w, const void* b, int N, int C, const char* label,
                         int block) override {
    note("layernorm_forward", s, label);
    cpu().layernorm_forward(s, out, mean, rstd, inp, w, b, N, C, label, block);
  }
  void residual_layernorm_forward(Stream* s, void* residual, void* out, float* mean, float* rstd,
                                  const void* x, const void* y, const void* w, const void* b, int N,
                                  int C, const char* label, int block) override {
    note("residual_layernorm_forward", s, label);
    cpu().residual_layernorm_forward(s, residual, out, mean, rstd, x, y, w, b, N, C, label, block);
  }
  void layernorm_backward(Stream* s, void* dinp, void* dw, void* db, const void* dout,
                          const void* inp, const void* w, const float* mean, const float* rstd,
                          int N, int C, const char* label, int block) override {
    note("layernorm_backward", s, label);
    cpu().layernorm_backward(s, dinp, dw, db, dout, inp, w, mean, rstd, N, C, label, block);
  }
  void matmul_forward(Stream* s, void* out, const void* inp, const void* w, const void* bias, int N,
                      int C, int OC, const char* label, int block) override {
    note("matmul_forward", s, label);
    cpu().matmul_forward(s, out, inp, w, bias, N, C, OC, label, block);
  }
  void matmul_backward(Stream* s, void* dinp, void* dw, void* dbias, const void* dout,
                       const void* inp, const void* w, int N, int C, int OC, const char* label,
                       int block) override {
    note("matmul_backward", s, label);
    cpu().matmul_backward(s, dinp, dw, dbias, dout, inp, w, N, C, OC, label, block);
  }
  void gelu_forward(Stream* s, void* out, const void* inp, size_t n, const char* label,
                    int block) override {
    note("gelu_forward", s, label);
    cpu().gelu_forward(s, out, inp, n, label, block);
  }
  void gelu_backward(Stream* s, void* dinp, const void* inp, const void* dout, size_t n,
                     const char* label, int block) override {
    note("gelu_backward", s, label);
    cpu().gelu_backward(s, dinp, inp, dout, n, label, block);
  }
  void rmsnorm_forward(Stream* s, void* out, float* rstd, const void* inp, const void* w, int N,
                       int C, float eps, const char* label, int block) override {
    note("rmsnorm_forward", s, label);
    cpu().rmsnorm_forward(s, out, rstd, inp, w, N, C, eps, label, block);
  }
  void residual_rmsnorm_forward(Stream* s, void* residual, void* out, float* rstd, const void* x,
                                const void* y, const void* w, int N, int C, float eps,
                                const char* label, int block) override {
    note("residual_rmsnorm_forward", s, label);
    cpu().residual_rmsnorm_forward(s, residual, out, rstd, x, y, w, N, C, eps, label, block);
  }
  void rmsnorm_backward(Stream* s, void* dinp, void* dw, const void* dout, const void* inp,
                        const void* w, const float* rstd, int N, int C, const char* label,
                        int block) override {
    note("rmsnorm_backward", s, label);
    cpu().rmsnorm_backward(s, dinp, dw, dout, inp, w, rstd, N, C, label, block);
  }
  void swiglu_forward(Stream* s, void* out, const void* inp, int N, int I, const char* label,
                      int block) override {
    note("swiglu_forward", s, label);
    cpu().swiglu_forward(s, out, inp, N, I, label, block);
  }
  void swiglu_backward(Stream* s, void* dinp, const void* inp, const void* dout, int N, int I,
                       const char* label, int block) override {
    note("swiglu_backward", s, label);
    cpu().swiglu_backward(s, dinp, inp, dout, N, I, label, block);
  }
  void rope_forward(Stream* s, void* out, const void* inp, int B, int T, int NH, int NKV, int HD,
                    const float* inv_freq, const char* label, int block) override {
    note("rope_forward", s, label);
    cpu().rope_forward(s, out, inp, B, T, NH, NKV, HD, inv_freq, label, block);
  }
  void rope_backward(Stream* s, void* dinp, const void* dout, int B, int T, int NH, int NKV, int HD,
                     const float* inv_freq, const char* label, int block) override {
    note("rope_backward", s, label);
    cpu().rope_backward(s, dinp, dout, B, T, NH, NKV, HD, inv_freq, label, block);
  }
  void attention_forward(Stream* s, void* out, float* lse, const void* qkv, int B, int T, int C,
                         int NH, int NKV, const char* label, int block) override {
    note("attention_forward", s, label);
    cpu().attention_forward(s, out, lse, qkv, B, T, C, NH, NKV, label, block);
  }
  void attention_backward(Stream* s, void* dqkv, const void* dout, const void* qkv, const void* out,
                          const float* lse, int B, int T, int C, int NH, int NKV, const char* label,
                          int block) override {
    note("attention_backward", s, label);
    cpu().attention_backward(s, dqkv, dout, qkv, out, lse, B, T, C, NH, NKV, label, block);
  }
  void classifier(Stream* s, float* losses, void* dx, void* dwte, const void* x, const void* wte,
                  const int* targets, int N, int C, int V, int Vp, float dloss, void* ws,
                  int chunk_rows, float* mean_loss_host) override {
    note("classifier", s, "classifier");
    cpu().classifier(s, losses, dx, dwte, x, wte, targets, N, C, V, Vp, dloss, ws, chunk_rows,
                     mean_loss_host);
  }
  void classifier_logits(Stream* s, float* host_logits, const void* x, const void* wte, int N,
                         int C, int V, int Vp) override {
    note("classifier_logits", s, "classifier.logits");
    cpu().classifier_logits(s, host_logits, x, wte, N, C, V, Vp);
  }
  double sum_squares(Stream* s, const void* g, size_t n) override {
    note("sum_squares", s, "optimizer.grad_norm");
    return cpu().sum_squares(s, g, n);
  }
  void adamw(Stream* s, float* master, float* m, float* v, const void* grads, void* params,
             size_t n, const cpu::AdamWParams& p) override {
    note("adamw", s, "optimizer.adamw");
    cpu().adamw(s, master, m, v, grads, params, n, p);
  }

 private:
  static Backend& cpu() { return *cpu_backend(); }
  void note(const char* op, Stream* s, const char* label) {
    std::lock_guard<std::mutex> lk(mu_);
    calls.push_back(Call{op, s ? s->id() : -1, label ? label : ""});
  }
  std::mutex mu_;
};

// The ops whose CUDA kernels use the backend's shared scratch.
const std::set<std::string> kScratchOps = {"encoder_backward", "layernorm_backward",
                                           "rmsnorm_backward", "attention_backward",
                                           "sum_squares",      "classifier_logits"};
// What the recompute stream may run: the forward kernels.
const std::set<std::string> kForwardOps = {"layernorm_forward", "residual_layernorm_forward",
                                           "rmsnorm_forward",   "residual_rmsnorm_forward",
                                           "matmul_forward",    "gelu_forward",
                                           "swiglu_forward",    "rope_forward",
                                           "attention_forward", "host_task"};

class BackendContract : public ::testing::TestWithParam<const char*> {};

TEST_P(BackendContract, ScratchOpsOnMainRecomputeForwardOnlyNoAllocationInSteps) {
  test::TempDir dir;
  const ModelConfig c = test::tiny_config(3);
  test::write_random_shard(dir / "d.bin", 3000, c.vocab_size, 5);
  DataLoader data(dir / "d.bin", 2, 8, c.vocab_size, false, 1);
  CheckingBackend be;
  Hyper h;
  h.total_steps = 3;
  ScheduleOptions so;
  so.verify_recompute = true;  // its copies and host compares go through the backend too
  Trainer tr(c, 2, 8, 2, h, parse_plan(GetParam(), c), so, test::init(c), &be);
  const int main_id = tr.runner().main_stream()->id();
  const int side_id = tr.runner().side_stream()->id();
  ASSERT_NE(main_id, side_id);
  EXPECT_GE(be.scratch_reservations, 1) << "scratch is reserved before the first step";
  const int allocs_before = be.allocs;
  for (int s = 0; s < 3; s++) ASSERT_FALSE(tr.step(data).skipped);
  (void)tr.evaluate(data, 2);
  EXPECT_EQ(be.allocs, allocs_before) << "a step or an evaluation allocated backend memory";

  std::map<std::string, int> on_side;
  int recompute_ops = 0;
  for (const auto& call : be.calls) {
    ASSERT_TRUE(call.stream == main_id || call.stream == side_id)
        << call.op << " (" << call.label << ") ran on stream " << call.stream;
    if (kScratchOps.count(call.op)) {
      EXPECT_EQ(call.stream, main_id)
          << call.op << " (" << call.label << ") uses the shared scratch off the main stream";
    }
    if (call.stream == side_id) {
      on_side[call.op]++;
      EXPECT_TRUE(kForwardOps.count(call.op)) << call.op << " on the recompute stream";
      EXPECT_EQ(call.label.rfind("recompute.", 0), 0u)
          << call.op << " on the recompute stream is labelled " << call.label;
      recompute_ops++;
    } else {
      EXPECT_NE(call.label.rfind("recompute.", 0), 0u) << call.label << " ran on the main stream";
    }
  }
  EXPECT_GT(recompute_ops, 0) << GetParam() << " rebuilds something on the side stream";
}

INSTANTIATE_TEST_SUITE_P(Policies, BackendContract,
                         ::testing::Values("selective", "attention", "full", "ln1+gelu,1-1=full"),
                         [](const ::testing::TestParamInfo<const char*>& i) {
                           std::string n;
                           for (const char* p = i.param; *p; ++p)
                             n += std::isalnum(static_cast<unsigned char>(*p)) ? *p : '_';
                           return n;
                         });

// The trainer keeps a non-CPU backend's weights, gradients and moments in backend buffers
// (the CUDA layout: master, moments, working weights, gradients), uploaded and downloaded
// through the backend. Over the CPU kernels that path must give the CPU path's bits, and a
// state saved from it and restored must continue bit for bit.
// The device path with `so` (and --offload `offload`) against the host path with neither.
void check_device_path(const ScheduleOptions& so, const std::string& offload) {
  test::TempDir dir;
  const ModelConfig c = test::tiny_config(2);
  test::write_random_shard(dir / "d.bin", 3000, c.vocab_size, 6);
  Hyper h;
  h.lr = 3e-3f;
  h.weight_decay = 0.1f;
  h.total_steps = 6;
  const Plan host_plan = parse_plan("full", c);
  Plan plan = host_plan;
  apply_offload(plan, offload);
  auto run = [&](Backend* be, int steps, std::vector<float>* losses) {
    DataLoader data(dir / "d.bin", 2, 8, c.vocab_size, true, 3);
    const bool host = be == cpu_backend();
    auto tr = std::make_unique<Trainer>(c, 2, 8, 1, h, host ? host_plan : plan,
                                        host ? ScheduleOptions{} : so, test::init(c), be);
    for (int s = 0; s < steps; s++) losses->push_back(tr->step(data).loss);
    return std::make_pair(std::move(tr), data.state());
  };
  std::vector<float> host_losses, dev_losses;
  auto host = run(cpu_backend(), 6, &host_losses);
  CheckingBackend be;
  auto dev = run(&be, 6, &dev_losses);
  ASSERT_EQ(host_losses.size(), dev_losses.size());
  EXPECT_EQ(std::memcmp(host_losses.data(), dev_losses.data(), host_losses.size() * 4), 0);
  const std::vector<float> hp = host.first->params(), dp = dev.first->params();
  EXPECT_EQ(std::memcmp(hp.data(), dp.data(), hp.size() * 4), 0) << "weights differ";
  const std::vector<float> hg = host.first->grads(), dg = dev.first->grads();
  EXPECT_EQ(std::memcmp(hg.data(), dg.data(), hg.size() * 4), 0) << "gradients differ";

  // Stop the device path after 3 steps, restore its state into a fresh trainer, continue.
  std::vector<float> first3;
  CheckingBackend be2;
  auto part = run(&be2, 3, &first3);
  const TrainState st = part.first->state(DataLoader(dir / "d.bin", 2, 8, c.vocab_size, true, 3));
  CheckingBackend be3;
  Trainer resumed(c, 2, 8, 1, h, plan, so, test::init(c, 99), &be3);
  resumed.restore(st);
  DataLoader data(dir / "d.bin", 2, 8, c.vocab_size, true, 3);
  data.restore(part.second);
  std::vector<float> rest;
  for (int s = 3; s < 6; s++) rest.push_back(resumed.step(data).loss);
  for (int s = 0; s < 3; s++) EXPECT_EQ(rest[s], dev_losses[3 + s]) << "resumed step " << 3 + s;
  const std::vector<float> rp = resumed.params();
  EXPECT_EQ(std::memcmp(rp.data(), dp.data(), dp.size() * 4), 0) << "resumed weights differ";
}

TEST(BackendTrainer, DevicePathEqualsHostPathAndResumesBitForBit) {
  check_device_path(ScheduleOptions{}, "none");
}

// --offload-optimizer (master weights and moments in the backend's host memory) and --offload
// input on the device path: bitwise the host path, and a resume continues bit for bit.
TEST(BackendTrainer, OffloadedOptimizerAndInputsEqualHostPathAndResumeBitForBit) {
  ScheduleOptions so;
  so.offload_optimizer = true;
  check_device_path(so, "input");
}

TEST(BackendChoice, AutoFallsBackToTheCpuAndSaysWhy) {
  const BackendChoice b = choose_backend("auto", "auto");
  if (cuda_device_count() > 0) GTEST_SKIP() << "a GPU is present";
  EXPECT_EQ(b.backend, cpu_backend());
  EXPECT_NE(b.note.find("CPU backend"), std::string::npos) << b.note;
  EXPECT_EQ(choose_backend("cpu", "fp32").backend, cpu_backend());
  EXPECT_THROW(choose_backend("cpu", "bf16"), Error);
  EXPECT_THROW(choose_backend("cuda", "auto"), Error);
  EXPECT_THROW(choose_backend("gpu", "auto"), Error);
}

}  // namespace
}  // namespace remat
