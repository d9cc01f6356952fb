// Helpers shared by the GPU kernel tests (test_kernels_gpu.cu, test_llama_kernels_gpu.cu):
// the element types, sizes for the sanitizer (small) mode, tolerances, comparisons against the
// CPU reference, random inputs and an RAII device array.
//
// Tolerances, from principle:
// - fp32: the device and the reference sum in different orders (the reference often in
//   double) and the device may fuse a multiply-add. A sum of n fp32 terms drifts by about
//   sqrt(n) 2^-24 relative; for the reduction lengths of the tests that stays under 1e-5,
//   which tol<float> asserts (times a factor where an output sums two such reductions).
// - bf16: the reference runs in fp32 (or double) on the same bf16-rounded inputs, so what is
//   left is the device's rounding of what it stores in bf16: half an ulp each (ulp = 2^-7 of
//   the magnitude, 8 significant bits). A check allows k ulps relative to each element plus k
//   ulps of the array's rms (a rounded intermediate contributes error in units of the terms,
//   not of a result that cancels to near zero); k counts the bf16 roundings on the path
//   (derived at each call site).
// - exact (kExact): where device and reference do the same IEEE operations in the same order.
// NaN never passes a comparison; outputs are poisoned (NaN) before each launch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cuda_common.cuh"
#include "tests/gpu/require_gpu.h"

namespace remat::test {

using bf16 = __nv_bfloat16;
using Vec = std::vector<float>;

// ---------------------------------------------------------------- sizes

// REMAT_GPU_TEST_SMALL=1: only the smallest sizes (for compute-sanitizer runs).
inline bool small_mode() {
  const char* v = std::getenv("REMAT_GPU_TEST_SMALL");
  return v != nullptr && v[0] == '1';
}
// The first `small` entries in small mode, all otherwise. Lists go from small to large.
template <typename T>
std::vector<T> sizes(std::vector<T> all, size_t small) {
  if (small_mode() && all.size() > small) all.resize(small);
  return all;
}

// ---------------------------------------------------------------- element types

template <typename E>
struct Elem;
template <>
struct Elem<float> {
  static float round(float x) { return x; }
  static float to_float(float x) { return x; }
  static float from_float(float x) { return x; }
};
template <>
struct Elem<bf16> {
  static float round(float x) { return __bfloat162float(__float2bfloat16(x)); }
  static float to_float(bf16 x) { return __bfloat162float(x); }
  static bf16 from_float(float x) { return __float2bfloat16(x); }
};

// Typed-test names: fp32, bf16.
struct ElemNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "fp32" : "bf16";
  }
};
using ElemTypes = ::testing::Types<float, bf16>;

// ---------------------------------------------------------------- tolerances

// |got - ref| <= rel * |ref| + abs * scale, scale = rms(ref) unless given.
struct Tol {
  double rel;
  double abs;
};
constexpr double kBf16Ulp = 1.0 / 128;  // 2^-7
constexpr double kFp32Tol = 1e-5;
constexpr Tol kExact{0, 0};

// bf16: k ulps (see the file comment); fp32: kFp32Tol (times fp32_factor for long sums).
template <typename E>
Tol tol(double k, double fp32_factor = 1.0) {
  if constexpr (std::is_same_v<E, float>) {
    return {kFp32Tol * fp32_factor, kFp32Tol * fp32_factor};
  } else {
    return {k * kBf16Ulp, k * kBf16Ulp};
  }
}

inline double rms(const Vec& v) {
  double s = 0;
  for (float x : v) s += static_cast<double>(x) * x;
  return v.empty() ? 0.0 : std::sqrt(s / v.size());
}
inline double max_abs(const Vec& v) {
  double m = 0;
  for (float x : v) m = std::max(m, static_cast<double>(std::fabs(x)));
  return m;
}

// Expects every element within t (NaN fails); reports the count and the worst one.
inline void expect_close(const std::string& what, const Vec& got, const Vec& ref, Tol t,
                         double scale = -1.0) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  if (scale < 0) scale = rms(ref);
  size_t bad = 0, worst = 0;
  double worst_ratio = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - ref[i]);
    const double lim = t.rel * std::fabs(ref[i]) + t.abs * scale;
    if (!(err <= lim)) {  // NaN fails here
      ++bad;
      const double ratio =
          std::isnan(err) ? std::numeric_limits<double>::infinity() : err / std::max(lim, 1e-300);
      if (ratio > worst_ratio) {
        worst_ratio = ratio;
        worst = i;
      }
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size()
                     << " outside tolerance; worst at " << worst << ": got " << got[worst]
                     << ", ref " << ref[worst] << " (rel " << t.rel << ", abs " << t.abs
                     << " x scale " << scale << ")";
}

// ---------------------------------------------------------------- inputs

inline Vec random_vec(size_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  Vec v(n);
  for (float& x : v) x = d(rng);
  return v;
}
template <typename E>
Vec rounded(Vec v) {
  for (float& x : v) x = Elem<E>::round(x);
  return v;
}
template <typename E>
Vec random_elems(size_t n, float lo, float hi, uint32_t seed) {
  return rounded<E>(random_vec(n, lo, hi, seed));
}
inline std::vector<int> random_ints(size_t n, int hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(0, hi - 1);
  std::vector<int> v(n);
  for (int& x : v) x = d(rng);
  return v;
}

// Columns [c0, c0 + width) of every row of a (rows, ld) matrix.
inline Vec columns(const Vec& m, size_t rows, size_t ld, size_t c0, size_t width) {
  Vec out;
  out.reserve(rows * width);
  for (size_t r = 0; r < rows; ++r)
    out.insert(out.end(), m.begin() + r * ld + c0, m.begin() + r * ld + c0 + width);
  return out;
}

// ---------------------------------------------------------------- device memory

// Owns n elements of T on the device. Transfers use the legacy stream (the tests' streams are
// blocking ones, ordered with it); a download synchronizes the device first.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    REMAT_CUDA_CHECK(cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T)));
  }
  ~DeviceArray() { cudaFree(p_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return p_; }
  size_t size() const { return n_; }
  void poison() { REMAT_CUDA_CHECK(cudaMemset(p_, 0xFF, n_ * sizeof(T))); }
  void upload_raw(const std::vector<T>& h, size_t offset = 0) {
    REMAT_CUDA_CHECK(
        cudaMemcpy(p_ + offset, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download_raw(size_t count, size_t offset = 0) const {
    REMAT_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<T> h(count);
    REMAT_CUDA_CHECK(cudaMemcpy(h.data(), p_ + offset, count * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  std::vector<T> download_raw() const { return download_raw(n_); }

 private:
  T* p_ = nullptr;
  size_t n_;
};

template <typename E>
void upload(DeviceArray<E>& d, const Vec& h, size_t offset = 0) {
  std::vector<E> tmp(h.size());
  for (size_t i = 0; i < h.size(); ++i) tmp[i] = Elem<E>::from_float(h[i]);
  d.upload_raw(tmp, offset);
}
template <typename E>
Vec download(const DeviceArray<E>& d, size_t count, size_t offset = 0) {
  const std::vector<E> raw = d.download_raw(count, offset);
  Vec h(count);
  for (size_t i = 0; i < count; ++i) h[i] = Elem<E>::to_float(raw[i]);
  return h;
}
template <typename E>
Vec download(const DeviceArray<E>& d) {
  return download(d, d.size());
}
template <typename E>
bool bitwise_equal(const std::vector<E>& a, const std::vector<E>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(E)) == 0;
}

}  // namespace remat::test
