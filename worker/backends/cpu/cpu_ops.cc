#include "worker/backends/cpu/cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace prehoc::cpu {
namespace {

typedef float v8sf __attribute__((vector_size(32)));

// AVX2 clones chosen at load time through an ifunc resolver. TSan's runtime is not initialised
// when resolvers run, so every TSan binary would crash at load: plain code there.
#if defined(__SANITIZE_THREAD__)
#define PREHOC_AVX2_CLONES
#else
#define PREHOC_AVX2_CLONES __attribute__((target_clones("arch=haswell", "default")))
#endif

inline v8sf Load8(const float* p) {
  v8sf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float HSum(v8sf v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

constexpr int64_t kRowTile = 64;
constexpr int64_t kColTile = 64;

// Computes y[r, c] for rows [r0, r1) and columns [c0, c1) of y = x · w^T.
// A 4x2 register tile of 8-wide accumulators; AVX2 clone chosen at load time when available.
PREHOC_AVX2_CLONES void MatMulTile(
    const float* x, int64_t k, const float* w, int64_t m, int64_t r0, int64_t r1, int64_t c0,
    int64_t c1, float* y) {
  const int64_t k8 = k & ~int64_t{7};
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const float* x0 = x + r * k;
    const float* x1 = x0 + k;
    const float* x2 = x1 + k;
    const float* x3 = x2 + k;
    int64_t c = c0;
    for (; c + 2 <= c1; c += 2) {
      const float* w0 = w + c * k;
      const float* w1 = w0 + k;
      v8sf a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
      for (int64_t i = 0; i < k8; i += 8) {
        const v8sf b0 = Load8(w0 + i), b1 = Load8(w1 + i);
        v8sf a = Load8(x0 + i);
        a00 += a * b0;
        a01 += a * b1;
        a = Load8(x1 + i);
        a10 += a * b0;
        a11 += a * b1;
        a = Load8(x2 + i);
        a20 += a * b0;
        a21 += a * b1;
        a = Load8(x3 + i);
        a30 += a * b0;
        a31 += a * b1;
      }
      float s[8] = {HSum(a00), HSum(a01), HSum(a10), HSum(a11),
                    HSum(a20), HSum(a21), HSum(a30), HSum(a31)};
      for (int64_t i = k8; i < k; ++i) {
        s[0] += x0[i] * w0[i];
        s[1] += x0[i] * w1[i];
        s[2] += x1[i] * w0[i];
        s[3] += x1[i] * w1[i];
        s[4] += x2[i] * w0[i];
        s[5] += x2[i] * w1[i];
        s[6] += x3[i] * w0[i];
        s[7] += x3[i] * w1[i];
      }
      y[r * m + c] = s[0];
      y[r * m + c + 1] = s[1];
      y[(r + 1) * m + c] = s[2];
      y[(r + 1) * m + c + 1] = s[3];
      y[(r + 2) * m + c] = s[4];
      y[(r + 2) * m + c + 1] = s[5];
      y[(r + 3) * m + c] = s[6];
      y[(r + 3) * m + c + 1] = s[7];
    }
    for (; c < c1; ++c) {
      const float* w0 = w + c * k;
      for (int rr = 0; rr < 4; ++rr) {
        const float* xr = x + (r + rr) * k;
        v8sf a = {};
        for (int64_t i = 0; i < k8; i += 8) a += Load8(xr + i) * Load8(w0 + i);
        float s = HSum(a);
        for (int64_t i = k8; i < k; ++i) s += xr[i] * w0[i];
        y[(r + rr) * m + c] = s;
      }
    }
  }
  for (; r < r1; ++r) {
    const float* xr = x + r * k;
    int64_t c = c0;
    for (; c + 2 <= c1; c += 2) {
      const float* w0 = w + c * k;
      const float* w1 = w0 + k;
      v8sf a0 = {}, a1 = {};
      for (int64_t i = 0; i < k8; i += 8) {
        const v8sf a = Load8(xr + i);
        a0 += a * Load8(w0 + i);
        a1 += a * Load8(w1 + i);
      }
      float s0 = HSum(a0), s1 = HSum(a1);
      for (int64_t i = k8; i < k; ++i) {
        s0 += xr[i] * w0[i];
        s1 += xr[i] * w1[i];
      }
      y[r * m + c] = s0;
      y[r * m + c + 1] = s1;
    }
    for (; c < c1; ++c) {
      const float* w0 = w + c * k;
      v8sf a = {};
      for (int64_t i = 0; i < k8; i += 8) a += Load8(xr + i) * Load8(w0 + i);
      float s = HSum(a);
      for (int64_t i = k8; i < k; ++i) s += xr[i] * w0[i];
      y[r * m + c] = s;
    }
  }
}

}  // namespace

PREHOC_AVX2_CLONES float Dot(const float* a, const float* b,
                                                                     int64_t n) {
  const int64_t n8 = n & ~int64_t{7};
  v8sf acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 16 <= n8; i += 16) {
    acc0 += Load8(a + i) * Load8(b + i);
    acc1 += Load8(a + i + 8) * Load8(b + i + 8);
  }
  for (; i < n8; i += 8) acc0 += Load8(a + i) * Load8(b + i);
  float s = HSum(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void MatMulNT(const float* x, int64_t n, int64_t k, const float* w, int64_t m, const float* bias,
              float* y, ThreadPool* pool) {
  auto run = [&](int64_t cb, int64_t ce) {
    for (int64_t r0 = 0; r0 < n; r0 += kRowTile) {
      const int64_t r1 = std::min(n, r0 + kRowTile);
      for (int64_t c0 = cb; c0 < ce; c0 += kColTile) {
        const int64_t c1 = std::min(ce, c0 + kColTile);
        MatMulTile(x, k, w, m, r0, r1, c0, c1, y);
        if (bias != nullptr) {
          for (int64_t r = r0; r < r1; ++r) {
            for (int64_t c = c0; c < c1; ++c) y[r * m + c] += bias[c];
          }
        }
      }
    }
  };
  // Parallelise only when there is enough work to pay for waking the pool.
  if (pool == nullptr || n * m * k < (int64_t{1} << 16)) {
    run(0, m);
  } else {
    pool->ParallelFor(m, 16, run);
  }
}

void RmsNorm(const float* x, int64_t n, int64_t d, const float* weight, float eps, float* y) {
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * d;
    float* yi = y + i * d;
    float ss = 0.0f;
    for (int64_t j = 0; j < d; ++j) ss += xi[j] * xi[j];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (int64_t j = 0; j < d; ++j) yi[j] = weight[j] * (xi[j] * inv);
  }
}

void SiluMul(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void AddInPlace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void AttendOne(const float* q, const float* const* keys, const float* const* values,
               int64_t num_keys, int head_dim, float scale, float* scores, float* out) {
  float max_s = -INFINITY;
  for (int64_t j = 0; j < num_keys; ++j) {
    const float s = Dot(q, keys[j], head_dim) * scale;
    scores[j] = s;
    max_s = std::max(max_s, s);
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < num_keys; ++j) {
    scores[j] = std::exp(scores[j] - max_s);
    sum += scores[j];
  }
  const float inv = 1.0f / sum;
  std::fill(out, out + head_dim, 0.0f);
  for (int64_t j = 0; j < num_keys; ++j) {
    const float p = scores[j] * inv;
    scores[j] = p;
    const float* vj = values[j];
    for (int d = 0; d < head_dim; ++d) out[d] += p * vj[d];
  }
}

}  // namespace prehoc::cpu
