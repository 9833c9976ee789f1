// Kernel of sampling.h (semantics, shapes and the fixed-point masses are documented there).
//
// One block of kThreads threads per row. Passes over the row (element i read by thread i mod
// kThreads, coalesced): the maximum 64-bit key (the argmax, and the max logit of the softmax);
// then up to three prefix selects (top-k by count, nucleus by mass, the draw by mass), each an
// MSB-first radix select over the 64-bit keys restricted to keys >= `limit` (the previous cut):
// per 8-bit digit, a count and a mass histogram of the keys that match the digits chosen so far;
// the 32 lanes of warp 0 scan the 256 bins from the highest digit down to find the bin where the
// cumulative reaches the target, and the select stops when that bin holds one key (one more pass
// then finds it). Histogram updates are run-length combined per thread and spread over kCopies
// copies (by warp) to cut atomic contention. Tried and dropped: a per-thread 8-entry register
// cache of (digit, mass, count) in front of the atomics at 512 threads — 1.3–1.7x slower
// (docs/benchmarks.md, "On-device sampling").
// All sums are integers: the result does not depend on the order of the atomics.
#ifndef PREHOC_WORKER_KERNELS_SAMPLING_CUH_
#define PREHOC_WORKER_KERNELS_SAMPLING_CUH_

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "worker/kernels/sampling.h"

namespace prehoc::kernels::sampling {

using u64 = unsigned long long;

constexpr int kCopies = 8;
constexpr double kFixedOne = 17592186044416.0;  // 2^44: the fixed-point unit of mass

// Order-preserving bits of a float (NaN lowest, below −inf).
__device__ __forceinline__ uint32_t OrderKey(float x) {
  const uint32_t b = __float_as_uint(x);
  if (x != x) return 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float KeyToFloat(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The total order of sampling.h as one unique key: larger = earlier (higher logit, lower id).
__device__ __forceinline__ u64 Key64(float x, int i) {
  return (static_cast<u64>(OrderKey(x)) << 32) | static_cast<u64>(0xffffffffu - static_cast<uint32_t>(i));
}

__device__ __forceinline__ int32_t IdOf(u64 key) {
  return static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(key & 0xffffffffull));
}

// W = round(exp((x − m) · inv_t) · 2^44); REQUIRES x <= m, m finite.
__device__ __forceinline__ u64 Mass(float x, double m, double inv_t) {
  if (x != x) return 0;
  const double p = exp((static_cast<double>(x) - m) * inv_t);
  return static_cast<u64>(p * kFixedOne + 0.5);
}

struct Shared {
  u64 hist_m[kCopies][256];
  unsigned int hist_c[kCopies][256];
  u64 red[32];
  u64 key;
  u64 before_m;
  unsigned int before_c, count, bin;
};

// Sum (is_max = false) or maximum over the block; every thread gets the result.
template <int kThreads>
__device__ u64 BlockReduce(u64 v, bool is_max, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const u64 o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? (o > v ? o : v) : v + o;
  }
  if (lane == 0) sh.red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? sh.red[lane] : 0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const u64 o = __shfl_xor_sync(0xffffffffu, v, off);
      v = is_max ? (o > v ? o : v) : v + o;
    }
    if (lane == 0) sh.key = v;
  }
  __syncthreads();
  v = sh.key;
  __syncthreads();
  return v;
}

struct Pick {
  u64 key;       // the selected token's key
  u64 cum;       // count (by count) or mass (by mass) of the keys >= key within the limit
  uint32_t rank; // number of keys >= key within the limit
};

// Adds (mass, count) to the digit's bin of the thread's histogram copy.
__device__ __forceinline__ void Flush(Shared& sh, int copy, int d, u64 mass, unsigned int count) {
  atomicAdd(&sh.hist_m[copy][d], mass);
  atomicAdd(&sh.hist_c[copy][d], count);
}

// The first key, in descending order among the keys >= limit, at which the cumulative count
// (kByMass = false) or mass reaches `target`. REQUIRES: 1 <= target <= the total over the limit.
template <int kThreads, bool kByMass>
__device__ Pick PrefixSelect(const float* x, int vocab, u64 limit, u64 target, double m,
                             double inv_t, Shared& sh) {
  u64 prefix = 0, mask = 0, cum = 0;
  uint32_t rank0 = 0;
  int shift = 56;
  for (;; shift -= 8) {
    for (int j = threadIdx.x; j < kCopies * 256; j += kThreads) {
      (&sh.hist_m[0][0])[j] = 0;
      (&sh.hist_c[0][0])[j] = 0;
    }
    __syncthreads();
    const int copy = (threadIdx.x >> 5) % kCopies;
    int run_d = -1;
    u64 run_m = 0;
    unsigned int run_c = 0;
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const float xi = x[i];
      const u64 k = Key64(xi, i);
      if (k < limit || (k & mask) != prefix) continue;
      const int d = static_cast<int>((k >> shift) & 0xff);
      if (d != run_d) {
        if (run_c != 0) Flush(sh, copy, run_d, run_m, run_c);
        run_d = d;
        run_m = 0;
        run_c = 0;
      }
      run_m += kByMass ? Mass(xi, m, inv_t) : 1ull;
      ++run_c;
    }
    if (run_c != 0) Flush(sh, copy, run_d, run_m, run_c);
    __syncthreads();
    for (int d = threadIdx.x; d < 256; d += kThreads) {
#pragma unroll
      for (int c = 1; c < kCopies; ++c) {
        sh.hist_m[0][d] += sh.hist_m[c][d];
        sh.hist_c[0][d] += sh.hist_c[c][d];
      }
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l owns bins 255 − 8l down to 248 − 8l; an inclusive scan over the lanes.
      const int lane = threadIdx.x;
      u64 lm = 0;
      unsigned int lc = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        lm += sh.hist_m[0][255 - 8 * lane - e];
        lc += sh.hist_c[0][255 - 8 * lane - e];
      }
      u64 im = lm;
      unsigned int ic = lc;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const u64 tm = __shfl_up_sync(0xffffffffu, im, off);
        const unsigned int tc = __shfl_up_sync(0xffffffffu, ic, off);
        if (lane >= off) {
          im += tm;
          ic += tc;
        }
      }
      const unsigned int ballot = __ballot_sync(0xffffffffu, im >= target);
      const int first = ballot != 0 ? __ffs(ballot) - 1 : 31;  // 31: unreachable by REQUIRES
      if (lane == first) {
        u64 r = im - lm;
        unsigned int rc = ic - lc;
        int bin = 248 - 8 * lane;
        for (int e = 0; e < 8; ++e) {
          const int d = 255 - 8 * lane - e;
          if (r + sh.hist_m[0][d] >= target) {
            bin = d;
            break;
          }
          r += sh.hist_m[0][d];
          rc += sh.hist_c[0][d];
        }
        sh.bin = static_cast<unsigned int>(bin);
        sh.before_m = r;
        sh.before_c = rc;
        sh.count = sh.hist_c[0][bin];
      }
    }
    __syncthreads();
    prefix |= static_cast<u64>(sh.bin) << shift;
    mask |= 0xffull << shift;
    target -= sh.before_m;
    cum += sh.before_m;
    rank0 += sh.before_c;
    const bool unique = sh.count <= 1;
    __syncthreads();  // every thread has read the bin before the next pass clears it
    if (unique || shift == 0) break;
  }
  if (shift > 0) {
    // The bin holds one key: find its low digits.
    if (threadIdx.x == 0) sh.key = prefix;
    __syncthreads();
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const u64 k = Key64(x[i], i);
      if (k >= limit && (k & mask) == prefix) sh.key = k;
    }
    __syncthreads();
    prefix = sh.key;
    __syncthreads();
  }
  Pick pick;
  pick.key = prefix;
  pick.rank = rank0 + 1;
  pick.cum = cum + (kByMass ? Mass(KeyToFloat(static_cast<uint32_t>(prefix >> 32)), m, inv_t) : 1ull);
  return pick;
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads) SampleRowsKernel(SampleRowsParams p) {
  __shared__ Shared sh;
  const int row = blockIdx.x;
  const int vocab = p.vocab;
  const int64_t stride = p.row_stride != 0 ? p.row_stride : vocab;
  const float* x = p.d_logits + row * stride;
  const SamplingRow rp = p.d_row_params[row];

  u64 best = 0;
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const u64 k = Key64(x[i], i);
    best = k > best ? k : best;
  }
  best = BlockReduce<kThreads>(best, /*is_max=*/true, sh);
  const float mx = KeyToFloat(static_cast<uint32_t>(best >> 32));
  int32_t token = IdOf(best);
  int32_t candidates = 1;
  if (rp.temperature > 0.0f && isfinite(mx)) {
    const double m = mx;
    const double inv_t = 1.0 / static_cast<double>(rp.temperature);
    u64 limit = 0;
    candidates = vocab;
    if (rp.top_k > 0 && rp.top_k < vocab) {
      limit = PrefixSelect<kThreads, false>(x, vocab, 0, static_cast<u64>(rp.top_k), m,
                                                    inv_t, sh)
                  .key;
      candidates = rp.top_k;
    }
    u64 mass = 0;
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const float xi = x[i];
      if (Key64(xi, i) >= limit) mass += Mass(xi, m, inv_t);
    }
    mass = BlockReduce<kThreads>(mass, /*is_max=*/false, sh);  // >= 2^44: the maximum is kept
    if (rp.top_p < 1.0f) {
      // First prefix with mass >= top_p · mass, i.e. >= ceil(top_p · mass) in integers.
      const double t = ceil(static_cast<double>(rp.top_p) * static_cast<double>(mass));
      const u64 target = t < 1.0 ? 1ull : (t >= static_cast<double>(mass) ? mass : static_cast<u64>(t));
      const Pick nucleus =
          PrefixSelect<kThreads, true>(x, vocab, limit, target, m, inv_t, sh);
      limit = nucleus.key;
      mass = nucleus.cum;
      candidates = static_cast<int32_t>(nucleus.rank);
    }
    // The first token whose cumulative mass exceeds u · mass: >= floor(u · mass) + 1.
    const double u = p.d_uniform != nullptr ? p.d_uniform[row] : SamplingUniform(rp.seed, rp.step);
    const double t = floor(u * static_cast<double>(mass)) + 1.0;
    const u64 target = t >= static_cast<double>(mass) ? mass : (t < 1.0 ? 1ull : static_cast<u64>(t));
    token = IdOf(PrefixSelect<kThreads, true>(x, vocab, limit, target, m, inv_t, sh).key);
  }
  if (threadIdx.x == 0) {
    p.d_out[row] = token;
    if (p.d_candidates != nullptr) p.d_candidates[row] = candidates;
  }
}

}  // namespace prehoc::kernels::sampling

#endif  // PREHOC_WORKER_KERNELS_SAMPLING_CUH_
