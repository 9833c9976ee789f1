// Tiled tensor-core kernel of prefill_attention.h (PrefillAttentionTiled; contract there).
//
// One 128-thread CTA per (query tile of <= 64 rows of one sequence, query head); warp w owns
// rows 16w..16w+15 of the tile. The CTA walks the key tiles (64 keys) its rows need — with the
// PSAW band, the tiles meeting [0, sink) and those meeting [lo(first row), last position]; the
// tiles between are skipped whole (never loaded) — staging K and V of a tile in shared memory
// through the page table (16-byte loads; keys no row of the CTA needs, i.e. past the range or
// inside [sink, lo(first row)), are zero-filled, never read). Per tile, on tensor cores
// (mma.sync m16n8k16 bf16, fp32 accumulators): S = Q·Kᵀ with Q's A-fragments held in registers
// for the whole walk; per-element masks (causal / band of each row, sequence end); online
// softmax in the exp2 domain; O += P·V with P (fp32 softmax numerators in [0, 1]) split into
// two bf16 terms, P = P_hi + P_lo with P_hi = bf16(P) and P_lo = bf16(P − P_hi), and both
// multiplied by V (two MMAs sharing V's B-fragments): P is then carried to ~2^-17 relative
// instead of bf16's 2^-9, so the numerators agree with the fp32 row sums (the single-bf16 P of
// FlashAttention left a numerator/denominator mismatch that took the whole-model PSAW test to
// 1.49e-2 of its 1.5e-2 bound; kSplitP = false keeps that variant for tests and benchmarks).
// fp16 P (11-bit mantissa) was the other option; it would need V in fp16 too (the MMA takes one
// input type), which overflows for |V| > 65504 — the split keeps V bf16 and is more exact.
// Loads are synchronous (no cp.async pipeline): see docs/kernels.md for the measured speed.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, c = lane % 4):
//   A (16×16, row-major): a0a1 = (g, 2c..2c+1), a2a3 = (g+8, 2c..), a4a5 = (g, 2c+8..),
//                          a6a7 = (g+8, 2c+8..)
//   B (16×8, B[k][n]):     b0b1 = (k = 2c..2c+1, n = g), b2b3 = (k = 2c+8.., n = g)
//   C (16×8):              c0c1 = (g, 2c..2c+1), c2c3 = (g+8, 2c..2c+1)
#ifndef PREHOC_WORKER_KERNELS_PREFILL_TILED_CUH_
#define PREHOC_WORKER_KERNELS_PREFILL_TILED_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "worker/kernels/prefill_attention.h"

namespace prehoc::kernels::prefill_tiled {

constexpr int kTileQ = 64;
constexpr int kTileK = 64;
constexpr int kThreads = 128;

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const uint32_t l = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
  const uint32_t h = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
  return l | (h << 16);
}

// The two bf16 halves of a PackBf16 word, as floats (exact).
__device__ __forceinline__ float Bf16Lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float Bf16Hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Engine::Step's band start of a row at position pos: lo > sink when banded, else -1.
__device__ __forceinline__ int64_t BandLo(double f, int sink, int pos) {
  if (!(f > 0)) return -1;
  const int64_t lo = static_cast<int64_t>(f * static_cast<double>(pos + 1));
  return lo > sink ? lo : -1;
}

template <int kHeadDim, bool kSplitP>
__global__ void __launch_bounds__(kThreads)
    PrefillTiledKernel(PrefillAttentionParams p, const int32_t* __restrict__ tiles,
                       float scale_log2) {
  constexpr int kStride = kHeadDim + 8;  // bf16 elements per staged row (bank-conflict padding)
  constexpr int kSteps = kHeadDim / 16;  // k-steps of Q·Kᵀ
  constexpr int kDTiles = kHeadDim / 8;  // n8 tiles of O
  __shared__ __align__(16) uint16_t k_s[kTileK * kStride];
  __shared__ __align__(16) uint16_t v_s[kTileK * kStride];

  const int tile = blockIdx.x;
  const int hq = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const int first_row = tiles[2 * tile], tile_rows = tiles[2 * tile + 1];
  const int hkv = p.num_kv_heads;
  const int kh = hq / (p.num_q_heads / hkv);
  const int b = p.d_row_seq[first_row];
  const int32_t* pages = p.d_page_indices + p.d_page_indptr[b];
  const int seq_len = p.d_seq_lens[b];
  const int pos_first = p.d_row_pos[first_row];
  const int pos_last = p.d_row_pos[first_row + tile_rows - 1];
  const bool band = p.d_band_fraction != nullptr;
  const double frac = band ? p.d_band_fraction[b] : 0.0;
  const int sink = band ? p.d_band_sink[b] : 0;

  // Keys the CTA walks: [0, key_end), minus [sink, lo_min) when the first row is banded (lo is
  // non-decreasing in the position, so no row of the tile needs those keys).
  const int key_end = p.causal ? pos_last + 1 : seq_len;
  const int64_t lo_min = band ? BandLo(frac, sink, pos_first) : -1;
  const int gap_lo = lo_min > 0 ? sink : key_end;
  const int gap_hi = lo_min > 0 ? static_cast<int>(lo_min) : key_end;

  // This thread's two rows (g and g + 8 of the warp's 16) and their key ranges.
  int row_pos[2], row_hi[2];
  int64_t row_lo[2];
  bool row_ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int t = warp * 16 + g + 8 * h;
    row_ok[h] = t < tile_rows;
    row_pos[h] = row_ok[h] ? p.d_row_pos[first_row + t] : 0;
    row_hi[h] = p.causal ? row_pos[h] + 1 : seq_len;  // keys < row_hi
    row_lo[h] = band ? BandLo(frac, sink, row_pos[h]) : -1;  // banded: skip [sink, row_lo)
  }

  // Q fragments (pre-scaled by nothing: the scale is applied to S in fp32).
  uint32_t qa[kSteps][4];
  {
    const uint32_t* q0 = nullptr;
    const uint32_t* q1 = nullptr;
    const int t0 = warp * 16 + g, t1 = t0 + 8;
    if (t0 < tile_rows) {
      q0 = reinterpret_cast<const uint32_t*>(
          p.d_q + (static_cast<size_t>(first_row + t0) * p.num_q_heads + hq) * kHeadDim);
    }
    if (t1 < tile_rows) {
      q1 = reinterpret_cast<const uint32_t*>(
          p.d_q + (static_cast<size_t>(first_row + t1) * p.num_q_heads + hq) * kHeadDim);
    }
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      const int w = ks * 8 + c;  // 32-bit word of elements 16ks + 2c, +1
      qa[ks][0] = q0 != nullptr ? q0[w] : 0u;
      qa[ks][1] = q1 != nullptr ? q1[w] : 0u;
      qa[ks][2] = q0 != nullptr ? q0[w + 4] : 0u;
      qa[ks][3] = q1 != nullptr ? q1[w + 4] : 0u;
    }
  }

  float o[kDTiles][4];
#pragma unroll
  for (int n = 0; n < kDTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

  const int n_key_tiles = (key_end + kTileK - 1) / kTileK;
  for (int kt = 0; kt < n_key_tiles; ++kt) {
    const int k0 = kt * kTileK;
    if (k0 >= gap_lo && k0 + kTileK <= gap_hi) continue;  // wholly inside the gap: skipped
    __syncthreads();  // the previous tile's readers are done
    // Stage K and V: 64 rows × kHeadDim / 8 chunks of 16 bytes.
    constexpr int kChunks = kHeadDim / 8;
    for (int i = threadIdx.x; i < kTileK * kChunks; i += kThreads) {
      const int r = i / kChunks, ch = i % kChunks;
      const int key = k0 + r;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (key < key_end && !(key >= gap_lo && key < gap_hi)) {
        const int64_t page = pages[key / p.page_size];
        // Element (page, kh, slot, 0): ((page · Hkv + kh) · page_size + slot) · hd.
        const int64_t base = ((page * hkv + kh) * p.page_size + key % p.page_size) * kHeadDim;
        kv = reinterpret_cast<const uint4*>(p.d_k_pool + base)[ch];
        vv = reinterpret_cast<const uint4*>(p.d_v_pool + base)[ch];
      }
      *reinterpret_cast<uint4*>(&k_s[r * kStride + ch * 8]) = kv;
      *reinterpret_cast<uint4*>(&v_s[r * kStride + ch * 8]) = vv;
    }
    __syncthreads();

    // S = Q·Kᵀ for the warp's 16 rows × 64 keys (8 n8 tiles).
    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
      const uint16_t* krow = &k_s[(n * 8 + g) * kStride];
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + ks * 16 + 2 * c);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + ks * 16 + 8 + 2 * c);
        Mma(s[n], qa[ks], b0, b1);
      }
    }
    // Scale to the log2 domain and mask; the new running maximum per row.
    float m_new[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2;
        const int key = k0 + n * 8 + 2 * c + (e & 1);
        const bool in_band = row_lo[h] < 0 || key < sink || key >= row_lo[h];
        const bool ok = row_ok[h] && key < row_hi[h] && in_band;
        s[n][e] = ok ? s[n][e] * scale_log2 : -INFINITY;
        m_new[h] = fmaxf(m_new[h], s[n][e]);
      }
    }
    float corr[2], m_use[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      m_new[h] = fmaxf(m_new[h], __shfl_xor_sync(0xffffffffu, m_new[h], 1));
      m_new[h] = fmaxf(m_new[h], __shfl_xor_sync(0xffffffffu, m_new[h], 2));
      m_use[h] = m_new[h] == -INFINITY ? 0.0f : m_new[h];
      corr[h] = exp2f(m_run[h] - m_use[h]);  // 0 while m_run = -inf
      m_run[h] = m_new[h];
      l_run[h] *= corr[h];
    }
#pragma unroll
    for (int n = 0; n < kDTiles; ++n) {
      o[n][0] *= corr[0];
      o[n][1] *= corr[0];
      o[n][2] *= corr[1];
      o[n][3] *= corr[1];
    }
    // P = exp2(S − m) (fp32 row sums), as bf16 A-fragments of P·V (16 keys per k-step): P_hi,
    // and with kSplitP the remainder P_lo = P − P_hi (exact in fp32), rounded to bf16 too.
    uint32_t pa[4][4];
    uint32_t pl[kSplitP ? 4 : 1][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = exp2f(s[n][e] - m_use[e / 2]);
        l_run[e / 2] += s[n][e];
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      pa[j][0] = PackBf16(s[2 * j][0], s[2 * j][1]);
      pa[j][1] = PackBf16(s[2 * j][2], s[2 * j][3]);
      pa[j][2] = PackBf16(s[2 * j + 1][0], s[2 * j + 1][1]);
      pa[j][3] = PackBf16(s[2 * j + 1][2], s[2 * j + 1][3]);
      if constexpr (kSplitP) {
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          const float* src = s[2 * j + w / 2] + 2 * (w % 2);
          pl[j][w] = PackBf16(src[0] - Bf16Lo(pa[j][w]), src[1] - Bf16Hi(pa[j][w]));
        }
      }
    }
    // O += P·V: B[k = key][n = d] = V[key][d].
#pragma unroll
    for (int n = 0; n < kDTiles; ++n) {
      const int d = n * 8 + g;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = j * 16 + 2 * c;
        const uint32_t b0 = static_cast<uint32_t>(v_s[key * kStride + d]) |
                            (static_cast<uint32_t>(v_s[(key + 1) * kStride + d]) << 16);
        const uint32_t b1 = static_cast<uint32_t>(v_s[(key + 8) * kStride + d]) |
                            (static_cast<uint32_t>(v_s[(key + 9) * kStride + d]) << 16);
        Mma(o[n], pa[j], b0, b1);
        if constexpr (kSplitP) Mma(o[n], pl[j], b0, b1);
      }
    }
  }

  // Row sums over the quad, normalise, write bf16 (rows of the tile only).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (!row_ok[h]) continue;
    const float inv = l_run[h] > 0.0f ? 1.0f / l_run[h] : 0.0f;
    const int t = warp * 16 + g + 8 * h;
    uint32_t* out = reinterpret_cast<uint32_t*>(
        p.d_out + (static_cast<size_t>(first_row + t) * p.num_q_heads + hq) * kHeadDim);
#pragma unroll
    for (int n = 0; n < kDTiles; ++n) {
      out[n * 4 + c] = PackBf16(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
    }
  }
}

}  // namespace prehoc::kernels::prefill_tiled

#endif  // PREHOC_WORKER_KERNELS_PREFILL_TILED_CUH_
