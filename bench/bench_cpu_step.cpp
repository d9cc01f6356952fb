// CPU training step time of a model preset (GPT-2 124M, B=4, T=64 by default; the
// Llama-family llama-100m, say): remat's blocked GEMM against the same step with plain
// OpenMP-loop GEMMs. Correctness first: the two steps' losses must agree to fp32 rounding
// before any time is reported.
//   bench_cpu_step [--model PRESET] [--steps N] [--batch B] [--seq T] [--write FILE.md]
//                  [--no-baseline]
#ifdef _OPENMP
#include <omp.h>
#endif

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "io/params.h"
#include "io/shards.h"
#include "kernels/gemm.h"
#include "models/trainer.h"

using namespace remat;

namespace {
struct Timing {
  double ms_min = 1e30, ms_mean = 0;
  float loss = 0;
};

Timing run(const ModelConfig& c, const std::string& shard, int B, int T, int steps, bool naive) {
  cpu::set_gemm_naive(naive);
  std::vector<float> p(num_params(c));
  init_params(p.data(), c, 1);
  DataLoader data(shard, B, T, c.vocab_size, false, 1);
  Hyper h;
  h.total_steps = steps + 1;
  Trainer tr(c, B, T, 1, h, parse_plan("none", c), {}, std::move(p));
  Timing t;
  if (steps == 0) {  // a single timed step that is also the correctness probe (naive GEMM)
    auto t0 = std::chrono::steady_clock::now();
    t.loss = tr.step(data).loss;
    t.ms_min = t.ms_mean =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    cpu::set_gemm_naive(false);
    return t;
  }
  t.loss = tr.step(data).loss;  // warm-up, also the correctness probe
  for (int s = 0; s < steps; s++) {
    auto t0 = std::chrono::steady_clock::now();
    tr.step(data);
    double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    t.ms_min = std::min(t.ms_min, ms);
    t.ms_mean += ms / steps;
  }
  cpu::set_gemm_naive(false);
  return t;
}
}  // namespace

int main(int argc, char** argv) {
  int steps = 3, B = 4, T = 64;
  bool baseline = true;
  std::string write, model = "gpt2";
  for (int i = 1; i < argc; i++)
    if (std::string(argv[i]) == "--no-baseline") baseline = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--no-baseline") {
      i--;
      continue;
    }
    if (a == "--steps")
      steps = std::atoi(argv[i + 1]);
    else if (a == "--batch")
      B = std::atoi(argv[i + 1]);
    else if (a == "--seq")
      T = std::atoi(argv[i + 1]);
    else if (a == "--write")
      write = argv[i + 1];
    else if (a == "--model")
      model = argv[i + 1];
  }
  ModelConfig c = preset_config(model);
  char tmpl[] = "/tmp/remat_bench_XXXXXX";
  std::string dir = mkdtemp(tmpl);
  std::vector<uint16_t> tok(size_t(B) * T * (2 * steps + 4) + 1);
  for (size_t i = 0; i < tok.size(); i++) tok[i] = static_cast<uint16_t>((i * 7919) % c.vocab_size);
  write_shard(dir + "/d.bin", tok.data(), tok.size());
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  const std::string what = model + " (" + describe(c) + ", " +
                           std::to_string(static_cast<int>(num_params(c) / 1e6 + 0.5)) + "M)";
  std::printf("%s, B=%d T=%d, %d OpenMP threads, %d timed steps\n", what.c_str(), B, T, threads,
              steps);
  Timing fast = run(c, dir + "/d.bin", B, T, steps, false);
  if (!baseline) {  // --no-baseline: the blocked step alone (no naive step, no check)
    std::printf("remat blocked sgemm: first-step loss %.6f, min %.0f ms, mean %.0f ms\n", fast.loss,
                fast.ms_min, fast.ms_mean);
    std::remove((dir + "/d.bin").c_str());
    rmdir(dir.c_str());
    return 0;
  }
  Timing slow = run(c, dir + "/d.bin", B, T, 0, true);  // one step: the naive step is slow
  std::remove((dir + "/d.bin").c_str());
  rmdir(dir.c_str());
  const float rel = std::fabs(fast.loss - slow.loss) / std::fabs(slow.loss);
  if (!(rel < 1e-4f)) {
    std::fprintf(stderr, "FAIL: losses disagree: blocked %.6f vs naive %.6f\n", fast.loss,
                 slow.loss);
    return 1;
  }
  const double flops = step_flops(c, B, T);
  std::printf("check: first-step loss %.6f (blocked) vs %.6f (naive): ok\n", fast.loss, slow.loss);
  std::printf("%-28s %10s %10s %12s\n", "GEMM", "min ms", "mean ms", "GFLOP/s");
  std::printf("%-28s %10.0f %10.0f %12.1f\n", "remat blocked sgemm", fast.ms_min, fast.ms_mean,
              flops / fast.ms_min / 1e6);
  std::printf("%-28s %10.0f %10.0f %12.1f\n", "plain OpenMP loops", slow.ms_min, slow.ms_mean,
              flops / slow.ms_min / 1e6);
  std::printf("speed-up: %.2fx\n", slow.ms_min / fast.ms_min);
  if (!write.empty()) {
    FILE* f = std::fopen(write.c_str(), "w");
    if (!f) return 1;
    std::fprintf(f, "| step (%s, B=%d, T=%d, %d threads, fp32) | min ms | mean ms | GFLOP/s |\n",
                 what.c_str(), B, T, threads);
    std::fprintf(f, "| --- | --- | --- | --- |\n");
    std::fprintf(f, "| remat blocked sgemm | %.0f | %.0f | %.1f |\n", fast.ms_min, fast.ms_mean,
                 flops / fast.ms_min / 1e6);
    std::fprintf(f, "| plain OpenMP loops | %.0f | %.0f | %.1f |\n", slow.ms_min, slow.ms_mean,
                 flops / slow.ms_min / 1e6);
    std::fprintf(f, "\nspeed-up %.2fx; first-step losses %.6f vs %.6f\n", slow.ms_min / fast.ms_min,
                 fast.loss, slow.loss);
    std::fclose(f);
  }
  return 0;
}
