// Counter-based random numbers: (seed, stream, counter) -> bits, so any draw can be
// reproduced from its position alone (resume, recompute). Philox-4x32-10.
#pragma once
#include <cmath>
#include <cstdint>

namespace remat {

class Philox {
 public:
  Philox(uint64_t seed, uint64_t stream, uint64_t counter = 0)
      : key_{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)},
        stream_(stream),
        counter_(counter) {}

  // 32 random bits; the counter advances by one per call.
  uint32_t next_u32() {
    uint32_t out[4];
    block(counter_ >> 2, out);
    uint32_t r = out[counter_ & 3];
    counter_++;
    return r;
  }
  float uniform() { return (next_u32() >> 8) * (1.0f / 16777216.0f); }  // [0, 1)
  float normal() {                                                      // Box-Muller
    float u1 = uniform(), u2 = uniform();
    if (u1 < 1e-30f) u1 = 1e-30f;
    return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.2831853071795864f * u2);
  }
  uint64_t counter() const { return counter_; }
  void set_counter(uint64_t c) { counter_ = c; }

 private:
  void block(uint64_t ctr, uint32_t out[4]) const {
    uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32);
    uint32_t c2 = static_cast<uint32_t>(stream_), c3 = static_cast<uint32_t>(stream_ >> 32);
    uint32_t k0 = key_[0], k1 = key_[1];
    for (int r = 0; r < 10; r++) {
      uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
      uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
      uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
      c0 = n0;
      c2 = n2;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
  }
  uint32_t key_[2];
  uint64_t stream_;
  uint64_t counter_;
};

}  // namespace remat
