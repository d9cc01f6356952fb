// What the CPU kernel tests share: float/double vectors, a seeded generator of inputs, bit
// comparison and running a function at a given OpenMP thread count.
#pragma once
#include <algorithm>
#include <cstring>
#include <limits>
#include <random>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace remat::cpu::test {

using Vec = std::vector<float>;
using DVec = std::vector<double>;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

class Rng {
 public:
  explicit Rng(unsigned seed) : gen_(seed) {}
  Vec uniform(size_t n, float lo, float hi) {
    std::uniform_real_distribution<float> d(lo, hi);
    Vec v(n);
    for (auto& x : v) x = d(gen_);
    return v;
  }
  Vec normal(size_t n, float stddev, float mean = 0.0f) {
    std::normal_distribution<float> d(mean, stddev);
    Vec v(n);
    for (auto& x : v) x = d(gen_);
    return v;
  }
  std::vector<int> ints(size_t n, int lo, int hi) {
    std::uniform_int_distribution<int> d(lo, hi);
    std::vector<int> v(n);
    for (auto& x : v) x = d(gen_);
    return v;
  }
  // Up to `count` distinct indices of [0, n), sorted; all of them when n <= count.
  std::vector<size_t> subset(size_t n, size_t count) {
    std::vector<size_t> idx(n);
    for (size_t i = 0; i < n; ++i) idx[i] = i;
    if (n > count) {
      std::shuffle(idx.begin(), idx.end(), gen_);
      idx.resize(count);
      std::sort(idx.begin(), idx.end());
    }
    return idx;
  }

 private:
  std::mt19937 gen_;
};

inline DVec to_double(const Vec& v) {
  return DVec(v.begin(), v.end());
}

inline bool same_bits(const Vec& a, const Vec& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Runs f with OpenMP limited to n threads (just runs f without OpenMP).
template <class F>
void with_threads(int n, F&& f) {
#ifdef _OPENMP
  const int old = omp_get_max_threads();
  omp_set_num_threads(n);
  f();
  omp_set_num_threads(old);
#else
  (void)n;
  f();
#endif
}

}  // namespace remat::cpu::test
