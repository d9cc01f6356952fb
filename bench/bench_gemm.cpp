// CPU sgemm vs sgemm_naive on the GEMM shapes of one GPT-2 124M training step at B=4, T=64
// (N = 256 rows, C = 768): the forward of the four linear layers (inp @ w^T), and their backward
// (dinp = dout @ w, dw = dout^T @ inp). Each shape is checked (blocked vs naive, within the
// fp32 error bound) before it is timed.
//
// usage: bench_gemm [--write [PATH]]   (PATH defaults to bench/results/cpu_gemm.md, relative to
//        the working directory; thread count from OMP_NUM_THREADS)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels/gemm.h"

namespace {

using remat::cpu::Trans;

struct Shape {
  const char* name;  // which product of the step
  Trans ta, tb;
  int M, N, K;
};

// Best wall time of fn over reps runs, in seconds (the caller has run fn once already). The best,
// not the median: the machine is shared, and the best run is the one least disturbed by others.
template <class F>
double time_best(F&& fn, int reps) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return *std::min_element(t.begin(), t.end());
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown CPU";
}

// The 1-minute load average: other work on a shared machine skews the timings.
std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string one;
  in >> one;
  return one.empty() ? "unknown" : one;
}

const char* tr(Trans t) {
  return t == Trans::kYes ? "T" : "N";
}

}  // namespace

int main(int argc, char** argv) {
  std::string out_path;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--write") == 0) {
      out_path = (i + 1 < argc && argv[i + 1][0] != '-') ? argv[++i] : "bench/results/cpu_gemm.md";
    } else {
      std::fprintf(stderr, "usage: %s [--write [PATH]]\n", argv[0]);
      return 2;
    }
  }
  const int rows = 256, C = 768;  // B * T, n_embd
  const Shape shapes[] = {
      {"qkv fwd", Trans::kNo, Trans::kYes, rows, 3 * C, C},
      {"attproj fwd", Trans::kNo, Trans::kYes, rows, C, C},
      {"fc fwd", Trans::kNo, Trans::kYes, rows, 4 * C, C},
      {"fcproj fwd", Trans::kNo, Trans::kYes, rows, C, 4 * C},
      {"qkv dinp", Trans::kNo, Trans::kNo, rows, C, 3 * C},
      {"attproj dinp", Trans::kNo, Trans::kNo, rows, C, C},
      {"fc dinp", Trans::kNo, Trans::kNo, rows, C, 4 * C},
      {"fcproj dinp", Trans::kNo, Trans::kNo, rows, 4 * C, C},
      {"qkv dw", Trans::kYes, Trans::kNo, 3 * C, C, rows},
      {"attproj dw", Trans::kYes, Trans::kNo, C, C, rows},
      {"fc dw", Trans::kYes, Trans::kNo, 4 * C, C, rows},
      {"fcproj dw", Trans::kYes, Trans::kNo, C, 4 * C, rows},
  };
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  const std::string load_before = load_average();
  std::printf("CPU sgemm benchmark: %s, %d OpenMP thread(s), load average %s\n",
              cpu_model().c_str(), threads, load_before.c_str());
  std::printf("%-13s %-3s %5s %5s %5s %12s %12s %8s\n", "shape", "op", "M", "N", "K",
              "blocked GF/s", "naive GF/s", "speedup");

  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::string table =
      "| shape | op | M | N | K | blocked GFLOP/s | naive GFLOP/s | speedup |\n"
      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n";
  double total_flops = 0.0, total_fast = 0.0, total_naive = 0.0;
  for (const Shape& s : shapes) {
    const int lda = s.ta == Trans::kNo ? s.K : s.M, ldb = s.tb == Trans::kNo ? s.N : s.K;
    std::vector<float> A(static_cast<size_t>(s.M) * s.K), B(static_cast<size_t>(s.K) * s.N);
    for (auto& x : A) x = dist(rng);
    for (auto& x : B) x = dist(rng);
    std::vector<float> c_fast(static_cast<size_t>(s.M) * s.N), c_naive(c_fast.size());
    auto fast = [&] {
      remat::cpu::sgemm(s.ta, s.tb, s.M, s.N, s.K, 1.0f, A.data(), lda, B.data(), ldb, 0.0f,
                        c_fast.data(), s.N);
    };
    auto naive = [&] {
      remat::cpu::sgemm_naive(s.ta, s.tb, s.M, s.N, s.K, 1.0f, A.data(), lda, B.data(), ldb, 0.0f,
                              c_naive.data(), s.N);
    };
    // Correctness first (these runs also warm up): both within the fp32 bound of each other, scaled
    // by |A| @ |B|.
    fast();
    naive();
    std::vector<float> absA(A.size()), absB(B.size()), mag(c_fast.size());
    for (size_t i = 0; i < A.size(); ++i) absA[i] = std::fabs(A[i]);
    for (size_t i = 0; i < B.size(); ++i) absB[i] = std::fabs(B[i]);
    remat::cpu::sgemm(s.ta, s.tb, s.M, s.N, s.K, 1.0f, absA.data(), lda, absB.data(), ldb, 0.0f,
                      mag.data(), s.N);
    const double bound = 2e-6 * (std::sqrt(static_cast<double>(s.K)) + 2);
    for (size_t i = 0; i < c_fast.size(); ++i) {
      const double err = std::fabs(static_cast<double>(c_fast[i]) - c_naive[i]);
      if (!(err <= bound * mag[i])) {
        std::fprintf(stderr, "MISMATCH %s at %zu: blocked %g naive %g\n", s.name, i, c_fast[i],
                     c_naive[i]);
        return 1;
      }
    }
    const double flops = 2.0 * s.M * s.N * s.K;
    const double t_fast = time_best(fast, 15);
    const double t_naive = time_best(naive, 1);
    total_flops += flops;
    total_fast += t_fast;
    total_naive += t_naive;
    const double gf_fast = flops / t_fast * 1e-9, gf_naive = flops / t_naive * 1e-9;
    const std::string op = std::string(tr(s.ta)) + tr(s.tb);
    std::printf("%-13s %-3s %5d %5d %5d %12.1f %12.2f %7.1fx\n", s.name, op.c_str(), s.M, s.N, s.K,
                gf_fast, gf_naive, t_naive / t_fast);
    char row[256];
    std::snprintf(row, sizeof row, "| %s | %s | %d | %d | %d | %.1f | %.2f | %.1fx |\n", s.name,
                  op.c_str(), s.M, s.N, s.K, gf_fast, gf_naive, t_naive / t_fast);
    table += row;
  }
  std::printf("all shapes: blocked %.1f GFLOP/s, naive %.2f GFLOP/s, speedup %.1fx\n",
              total_flops / total_fast * 1e-9, total_flops / total_naive * 1e-9,
              total_naive / total_fast);
  char total_row[256];
  std::snprintf(
      total_row, sizeof total_row, "| **all 12** | | | | | **%.1f** | **%.2f** | **%.1fx** |\n",
      total_flops / total_fast * 1e-9, total_flops / total_naive * 1e-9, total_naive / total_fast);
  table += total_row;

  if (!out_path.empty()) {
    std::ofstream out(out_path);
    if (!out) {
      std::fprintf(stderr, "cannot write %s\n", out_path.c_str());
      return 1;
    }
    out << "# CPU sgemm: blocked vs naive\n\n"
        << "GPT-2 124M GEMM shapes of one training step at B=4, T=64 (256 rows, C=768), fp32, "
        << "row-major. `op` is the transposition of A and B; fwd = inp @ w^T, dinp = dout @ w, "
        << "dw = dout^T @ inp. Best of 15 timed runs (blocked), one timed run (naive), after "
        << "the correctness check's run; each shape checked against the naive result first.\n\n"
        << "Machine: " << cpu_model() << ", " << threads << " OpenMP thread(s); 1-minute load "
        << "average " << load_before << " before and " << load_average() << " after the run "
        << "(anything above 0 is other work sharing the cores). Produced by "
        << "`build/bench_gemm --write`.\n\n"
        << table;
    std::printf("wrote %s\n", out_path.c_str());
  }
  return 0;
}
