// CPU reference kernels (float32). These define the numerics every other backend is checked
// against. All pointers are to contiguous row-major arrays.
#ifndef PREHOC_WORKER_BACKENDS_CPU_CPU_OPS_H_
#define PREHOC_WORKER_BACKENDS_CPU_CPU_OPS_H_

#include <cstdint>
#include <span>

#include "common/thread_pool.h"

namespace prehoc::cpu {

// y[n, m] = x[n, k] · w[m, k]^T (+ bias[m] when bias != nullptr). Parallel over m.
void MatMulNT(const float* x, int64_t n, int64_t k, const float* w, int64_t m, const float* bias,
              float* y, ThreadPool* pool);

// y[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * weight. x and y may alias.
void RmsNorm(const float* x, int64_t n, int64_t d, const float* weight, float eps, float* y);

// out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)). out may alias gate or up.
void SiluMul(const float* gate, const float* up, int64_t n, float* out);

// Σ a[i]·b[i] over n elements (8-wide vector accumulation; AVX2 when the CPU has it).
float Dot(const float* a, const float* b, int64_t n);

// x[i] += y[i].
void AddInPlace(float* x, const float* y, int64_t n);

// Softmax-weighted sum over a set of keys, for one query vector:
//   s_j = scale * q · K[j],  p = softmax(s),  out = Σ_j p_j V[j]
// The keys are given as `num_keys` pointers to head_dim-vectors (so paged and sparse layouts
// share one implementation). `scores` is scratch of at least num_keys floats; on return it holds
// the probabilities p. REQUIRES: num_keys >= 1.
void AttendOne(const float* q, const float* const* keys, const float* const* values,
               int64_t num_keys, int head_dim, float scale, float* scores, float* out);

}  // namespace prehoc::cpu

#endif  // PREHOC_WORKER_BACKENDS_CPU_CPU_OPS_H_
