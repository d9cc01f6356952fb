// Causal self-attention on the CPU, flash form: per query row the scores against keys 0..t are
// built in a row of scratch, turned into probabilities with the row's exact max, and folded
// into the output; only out and the row's log-sum-exp are stored. The forward splits work over
// (batch, query head) pairs, the backward over (batch, key/value head) pairs, which loop their
// group's query heads in increasing order; inside a pair everything runs in a fixed order, so
// results do not depend on the thread count.
#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "kernels/common.h"

namespace remat::cpu {
namespace {

// Shape of one call, derived once.
struct Dims {
  int B, T, C, NH;
  int NKV;      // key/value heads (NH without grouped-query attention)
  int group;    // query heads per key/value head, NH / NKV
  int HD;       // channels per head, C / NH
  long ld;      // row stride of qkv, C + 2 NKV HD
  long k_off;   // channel offset of the keys in a qkv row, C
  long v_off;   // channel offset of the values in a qkv row, C + NKV HD
  float scale;  // 1 / sqrt(HD)
};

Dims make_dims(const char* who, int B, int T, int C, int NH, int NKV) {
  if (NKV == 0) NKV = NH;
  REMAT_CHECK(B >= 0 && T >= 0 && C > 0 && NH > 0 && C % NH == 0 && NKV > 0 && NH % NKV == 0,
              std::string(who) + ": bad shape B=" + std::to_string(B) + " T=" + std::to_string(T) +
                  " C=" + std::to_string(C) + " NH=" + std::to_string(NH) +
                  " NKV=" + std::to_string(NKV));
  const int HD = C / NH;
  const long kv = static_cast<long>(NKV) * HD;
  const float scale = 1.0f / std::sqrt(static_cast<float>(HD));
  return Dims{B, T, C, NH, NKV, NH / NKV, HD, C + 2 * kv, C, C + kv, scale};
}

// The key/value head query head h reads.
int kv_head(const Dims& d, int h) {
  return h / d.group;
}

// dst (HD, T) = the head's slice at channel offset `off` of qkv rows b*T .. b*T+T-1, transposed.
void gather_transposed(float* dst, const float* qkv, const Dims& d, int b, int off) {
  for (int t = 0; t < d.T; ++t) {
    const float* src = qkv + (static_cast<long>(b) * d.T + t) * d.ld + off;
    for (int c = 0; c < d.HD; ++c) dst[static_cast<long>(c) * d.T + t] = src[c];
  }
}

// y[i] += a[r] * x[r][i] for r = 0..count-1 in order (one rounding per term), i < n. Rows are
// taken four at a time so y stays in registers; the per-element order is the same either way.
void accumulate_rows(float* __restrict y, const float* const* x, const float* a, int count, int n) {
  int r = 0;
  for (; r + 4 <= count; r += 4) {
    const float* __restrict x0 = x[r];
    const float* __restrict x1 = x[r + 1];
    const float* __restrict x2 = x[r + 2];
    const float* __restrict x3 = x[r + 3];
    const float a0 = a[r], a1 = a[r + 1], a2 = a[r + 2], a3 = a[r + 3];
    for (int i = 0; i < n; ++i) {
      float acc = y[i];
      acc += a0 * x0[i];
      acc += a1 * x1[i];
      acc += a2 * x2[i];
      acc += a3 * x3[i];
      y[i] = acc;
    }
  }
  for (; r < count; ++r) {
    const float* __restrict xr = x[r];
    const float ar = a[r];
    for (int i = 0; i < n; ++i) y[i] += ar * xr[i];
  }
}

// y (n) += sum over r < rows of a[r] * mat[r * ld + (0..n-1)], rows in order.
void accumulate_matrix(float* y, const float* mat, long ld, const float* a, int rows, int n) {
  const float* x[4];
  for (int c = 0; c < rows; c += 4) {
    const int count = std::min(4, rows - c);
    for (int r = 0; r < count; ++r) x[r] = mat + (c + r) * ld;
    accumulate_rows(y, x, a + c, count, n);
  }
}

// s[j] = scale * (q . k_j) for j < n, with kt (HD, T) the head's keys transposed. Summed over
// channels in order.
void scores_row(float* s, const float* q, const float* kt, int n, const Dims& d) {
  std::fill(s, s + n, 0.0f);
  accumulate_matrix(s, kt, d.T, q, d.HD, n);
  for (int j = 0; j < n; ++j) s[j] *= d.scale;
}

}  // namespace

void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int C, int NH,
                       int NKV) {
  const Dims d = make_dims("attention_forward", B, T, C, NH, NKV);
  REMAT_CHECK(B * T == 0 || (out && lse && qkv), "attention_forward: null pointer");
#pragma omp parallel
  {
    std::vector<float> kt(static_cast<size_t>(d.HD) * T);  // (HD, T) keys of the head
    std::vector<float> p(T);                               // (T) scores, then exp(s - max)
    std::vector<float> o(d.HD);                            // (HD) output accumulator
#pragma omp for schedule(dynamic)
    for (int bh = 0; bh < B * NH; ++bh) {
      const int b = bh / NH;
      const int h = bh % NH;
      const long kv = static_cast<long>(kv_head(d, h)) * d.HD;
      gather_transposed(kt.data(), qkv, d, b, static_cast<int>(d.k_off + kv));
      for (int t = 0; t < T; ++t) {
        const long row = static_cast<long>(b) * T + t;
        const float* q = qkv + row * d.ld + h * d.HD;
        const int n = t + 1;
        scores_row(p.data(), q, kt.data(), n, d);
        float m = p[0];
        for (int j = 1; j < n; ++j) m = std::max(m, p[j]);
        float sum = 0.0f;
        for (int j = 0; j < n; ++j) {
          p[j] = std::exp(p[j] - m);
          sum += p[j];
        }
        // o = sum_j p_j v_j, keys in order.
        std::fill(o.begin(), o.end(), 0.0f);
        const float* v0 = qkv + static_cast<long>(b) * T * d.ld + d.v_off + kv;
        accumulate_matrix(o.data(), v0, d.ld, p.data(), n, d.HD);
        const float inv = 1.0f / sum;
        float* dst = out + row * C + h * d.HD;
        for (int c = 0; c < d.HD; ++c) dst[c] = o[c] * inv;
        lse[(static_cast<long>(b) * NH + h) * T + t] = m + std::log(sum);
      }
    }
  }
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                        const float* lse, int B, int T, int C, int NH, int NKV) {
  const Dims d = make_dims("attention_backward", B, T, C, NH, NKV);
  REMAT_CHECK(B * T == 0 || (dqkv && dout && qkv && out && lse),
              "attention_backward: null pointer");
#pragma omp parallel
  {
    const size_t head_floats = static_cast<size_t>(d.HD) * T;
    std::vector<float> kt(head_floats);  // (HD, T) keys, transposed
    std::vector<float> vt(head_floats);  // (HD, T) values, transposed
    std::vector<float> dk(head_floats);  // (T, HD) key gradient accumulator
    std::vector<float> dv(head_floats);  // (T, HD) value gradient accumulator
    std::vector<float> p(T);             // (T) probabilities of the query row
    std::vector<float> ds(T);            // (T) dp, then the score gradient
    std::vector<float> dq(d.HD);         // (HD)
#pragma omp for schedule(dynamic)
    for (int bkv = 0; bkv < B * d.NKV; ++bkv) {
      const int b = bkv / d.NKV;
      const int kvh = bkv % d.NKV;
      const long kv = static_cast<long>(kvh) * d.HD;
      gather_transposed(kt.data(), qkv, d, b, static_cast<int>(d.k_off + kv));
      gather_transposed(vt.data(), qkv, d, b, static_cast<int>(d.v_off + kv));
      std::fill(dk.begin(), dk.end(), 0.0f);
      std::fill(dv.begin(), dv.end(), 0.0f);
      // The group's query heads in increasing order, all into the same dk, dv.
      for (int h = kvh * d.group; h < (kvh + 1) * d.group; ++h) {
        const float* lse_bh = lse + (static_cast<long>(b) * NH + h) * T;
        for (int t = 0; t < T; ++t) {
          const long row = static_cast<long>(b) * T + t;
          const float* q = qkv + row * d.ld + h * d.HD;
          const float* dy = dout + row * C + h * d.HD;
          const float* y = out + row * C + h * d.HD;
          const int n = t + 1;
          // p_j = exp(s_j - lse_t)
          scores_row(p.data(), q, kt.data(), n, d);
          for (int j = 0; j < n; ++j) p[j] = std::exp(p[j] - lse_bh[t]);
          // dp_j = dout_t . v_j
          std::fill(ds.begin(), ds.begin() + n, 0.0f);
          accumulate_matrix(ds.data(), vt.data(), T, dy, d.HD, n);
          // D_t = dout_t . out_t; ds_j = p_j (dp_j - D_t)
          double dsum = 0.0;
          for (int c = 0; c < d.HD; ++c) dsum += static_cast<double>(dy[c]) * y[c];
          const float D = static_cast<float>(dsum);
          for (int j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - D);
          // dq = scale * sum_j ds_j k_j; dk_j += scale * ds_j q; dv_j += p_j dout_t.
          std::fill(dq.begin(), dq.end(), 0.0f);
          const float* k0 = qkv + static_cast<long>(b) * T * d.ld + d.k_off + kv;
          accumulate_matrix(dq.data(), k0, d.ld, ds.data(), n, d.HD);
          for (int j = 0; j < n; ++j) {
            const float dsj_scaled = ds[j] * d.scale;
            const float pj = p[j];
            float* __restrict dkj = dk.data() + static_cast<long>(j) * d.HD;
            float* __restrict dvj = dv.data() + static_cast<long>(j) * d.HD;
            for (int c = 0; c < d.HD; ++c) {
              dkj[c] += dsj_scaled * q[c];
              dvj[c] += pj * dy[c];
            }
          }
          float* dq_dst = dqkv + row * d.ld + h * d.HD;
          for (int c = 0; c < d.HD; ++c) dq_dst[c] = dq[c] * d.scale;
        }
      }
      for (int t = 0; t < T; ++t) {
        float* dst = dqkv + (static_cast<long>(b) * T + t) * d.ld + kv;
        const float* dkt = dk.data() + static_cast<long>(t) * d.HD;
        const float* dvt = dv.data() + static_cast<long>(t) * d.HD;
        for (int c = 0; c < d.HD; ++c) {
          dst[d.k_off + c] = dkt[c];
          dst[d.v_off + c] = dvt[c];
        }
      }
    }
  }
}

}  // namespace remat::cpu
