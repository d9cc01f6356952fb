// The whole-model gradient check both families share: for every parameter tensor, its
// largest-gradient element against a central difference of the fp32 loss (taken in double),
// and the directional derivative along the normalised gradient against the gradient norm.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "io/params.h"
#include "models/model.h"
#include "tests/tiny_model.h"

namespace remat::test {

inline void expect_gradient_matches_finite_differences(const ModelConfig& c,
                                                       const std::vector<float>& p, int B, int T) {
  auto in = random_tokens(size_t(B) * T, c.vocab_size, 5),
       tg = random_tokens(size_t(B) * T, c.vocab_size, 6);
  ModelRunner r(c, B, T, parse_plan("none", c), ActDType::kFP32, {}, false);
  auto loss = [&](const std::vector<float>& q) {
    return r.forward_loss(q.data(), in.data(), tg.data());
  };
  std::vector<float> g(p.size(), 0.0f);
  r.forward_backward(p.data(), g.data(), in.data(), tg.data(), 1.0f / (B * T));
  for (float x : g) ASSERT_TRUE(std::isfinite(x));
  for (const ParamTensor& t : param_table(c)) {
    size_t best = t.offset;
    for (size_t i = t.offset; i < t.offset + t.count(); i++)
      if (std::fabs(g[i]) > std::fabs(g[best])) best = i;
    ASSERT_GT(std::fabs(g[best]), 1e-4f) << t.name << " has no gradient signal";
    const float eps = 1e-2f * std::max(1.0f, std::fabs(p[best]));
    const float hi = p[best] + eps, lo = p[best] - eps;
    auto q = p;
    q[best] = hi;
    const double up = loss(q);
    q[best] = lo;
    const double down = loss(q);
    const double fd = (up - down) / (double(hi) - double(lo));
    EXPECT_NEAR(fd, g[best], 0.03 * std::fabs(g[best]) + 2e-4)
        << "tensor " << t.name << " element " << best - t.offset;
  }
  // Along the normalised gradient the derivative is the gradient norm.
  double norm = 0;
  for (float x : g) norm += double(x) * x;
  norm = std::sqrt(norm);
  const double h = 1e-3;
  auto q = p;
  for (size_t i = 0; i < p.size(); i++) q[i] = p[i] + float(h * g[i] / norm);
  const double up = loss(q);
  for (size_t i = 0; i < p.size(); i++) q[i] = p[i] - float(h * g[i] / norm);
  const double down = loss(q);
  EXPECT_NEAR((up - down) / (2 * h), norm, 0.02 * norm);
}

}  // namespace remat::test
