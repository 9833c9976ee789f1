// Kernel of skinny_gemm.h (shapes, layouts and dtypes are documented there); launched from
// skinny_gemm.cu, the only file including this one. CUDA and std headers only.
#ifndef PREHOC_WORKER_KERNELS_SKINNY_GEMM_CUH_
#define PREHOC_WORKER_KERNELS_SKINNY_GEMM_CUH_

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "worker/kernels/skinny_gemm.h"

namespace prehoc::kernels::skinny {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerCta = kWarps * 16;  // W rows (output columns) per CTA
constexpr int kChunk = 128;               // k per pipeline step
constexpr int kXStride = kChunk + 32;     // bf16 per staged X row: 320 bytes, so the two rows
                                          // read by one quarter-warp fall in different banks
constexpr int kRedStride = kRowsPerCta + 4;  // floats per row of the partial-sum tile

// Dynamic shared memory of a CTA for MT token tiles (8 rows each): two X buffers during the k
// loop, the partial-sum tile after it.
constexpr int SmemBytes(int mt) {
  return mt * 8 * (2 * kXStride * 2 > kRedStride * 4 ? 2 * kXStride * 2 : kRedStride * 4);
}

// 16 bytes of W, streamed (read once: kept out of L1).
__device__ __forceinline__ uint4 LdStream(const uint16_t* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// 16 bytes global → shared, asynchronously (L2 only); zeros when !valid.
__device__ __forceinline__ void CpAsync16(void* dst, const void* src, bool valid) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

// c += A(16×16, row) · B(16×8, col), bf16 inputs, f32 accumulators.
__device__ __forceinline__ void Mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Grid (ceil(n / kRowsPerCta), S), cluster (1, S, 1); CTA (x, y) computes rows
// [x·128, x·128 + 128) of W over k chunks [y·cps, (y + 1)·cps); then the cluster's CTAs share
// the reduction: each sums the S partials of a slice of the tile in rank order and writes Y.
//
// Index maths (lane = 4g + q): within a 32-wide k slice c of a chunk, thread (g, q) loads the
// 8 consecutive k at 32c + 8q of W rows r and r + 8 (r = warp row base + g) and of X rows
// 8j + g. MMA step s ∈ {0, 1} of the slice uses, as the logical k columns (2q, 2q+1) and
// (2q+8, 2q+9) of both operands, physical k 32c + 8q + 4s + {0,1} and + {2,3}: the same
// permutation of k for A and B, so Σ_k is unchanged. Accumulator (j, e): W row r + 8·(e / 2),
// X row 8j + 2q + e % 2.
template <int MT>
__global__ void __launch_bounds__(kThreads, 2)
    SkinnyGemmKernel(SkinnyGemmParams p, int chunks_per_split) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // thread-block clusters: sm_90 and later
  namespace cg = cooperative_groups;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* xs = reinterpret_cast<uint16_t*>(smem);  // [2][MT·8][kXStride]
  float* red = reinterpret_cast<float*>(smem);       // [MT·8][kRedStride], after the k loop
  constexpr int kRows = MT * 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int row_base = blockIdx.x * kRowsPerCta;
  const int r0 = row_base + warp * 16 + g, r1 = r0 + 8;
  const bool v0 = r0 < p.n, v1 = r1 < p.n;
  const uint16_t* w0 = p.d_w + static_cast<size_t>(v0 ? r0 : 0) * p.ldw;
  const uint16_t* w1 = p.d_w + static_cast<size_t>(v1 ? r1 : 0) * p.ldw;
  const int nchunks = (p.k + kChunk - 1) / kChunk;
  const int c_begin = blockIdx.y * chunks_per_split;
  const int c_end = min(nchunks, c_begin + chunks_per_split);

  float acc[MT][4];
#pragma unroll
  for (int j = 0; j < MT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4 wc[2][4], wn[2][4];
  auto load_w = [&](int chunk, uint4(&w)[2][4]) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int kk = chunk * kChunk + 32 * c + 8 * q;
      const bool kin = kk < p.k;  // k % 8 == 0: the whole 8-vector is inside
      w[0][c] = (v0 && kin) ? LdStream(w0 + kk) : zero;
      w[1][c] = (v1 && kin) ? LdStream(w1 + kk) : zero;
    }
  };
  // X chunk → xs buffer `buf` (asynchronous, zero-filled outside [0, m) × [0, k)).
  auto stage_x = [&](int chunk, int buf) {
    constexpr int kVecPerRow = kChunk / 8;
    uint16_t* dst = xs + buf * kRows * kXStride;
#pragma unroll
    for (int idx = threadIdx.x; idx < kRows * kVecPerRow; idx += kThreads) {
      const int row = idx / kVecPerRow, col = (idx % kVecPerRow) * 8;
      const int kk = chunk * kChunk + col;
      const bool in = row < p.m && kk < p.k;
      CpAsync16(dst + row * kXStride + col,
                p.d_x + (in ? static_cast<size_t>(row) * p.ldx + kk : 0), in);
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  };
  // Pipeline: while chunk i is multiplied, X of chunk i + 1 is in flight into the other buffer
  // and W of chunk i + 1 into registers.
  if (c_begin < c_end) {
    stage_x(c_begin, 0);
    load_w(c_begin, wc);
  }
  for (int chunk = c_begin; chunk < c_end; ++chunk) {
    const int buf = (chunk - c_begin) & 1;
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    __syncthreads();  // X(chunk) is in xs[buf]; every warp is done reading xs[buf ^ 1]
    const bool more = chunk + 1 < c_end;
    if (more) {
      stage_x(chunk + 1, buf ^ 1);
      load_w(chunk + 1, wn);
    }
    const uint16_t* xb = xs + buf * kRows * kXStride;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        const uint4 xv =
            *reinterpret_cast<const uint4*>(xb + (8 * j + g) * kXStride + 32 * c + 8 * q);
        Mma(acc[j], wc[0][c].x, wc[1][c].x, wc[0][c].y, wc[1][c].y, xv.x, xv.y);
        Mma(acc[j], wc[0][c].z, wc[1][c].z, wc[0][c].w, wc[1][c].w, xv.z, xv.w);
      }
    }
    if (more) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        wc[0][c] = wn[0][c];
        wc[1][c] = wn[1][c];
      }
    }
  }

  // Partial sums → shared memory (over xs: wait for the last chunk's readers).
  __syncthreads();
#pragma unroll
  for (int j = 0; j < MT; ++j) {
    const int t = 8 * j + 2 * q, rr = warp * 16 + g;
    red[t * kRedStride + rr] = acc[j][0];
    red[(t + 1) * kRedStride + rr] = acc[j][1];
    red[t * kRedStride + rr + 8] = acc[j][2];
    red[(t + 1) * kRedStride + rr + 8] = acc[j][3];
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every CTA's partials are visible cluster-wide
  // Every CTA of the cluster reduces a share of the tile: 4 consecutive W rows of one X row per
  // item, the S partials loaded together and summed in rank order (deterministic).
  const int splits = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  constexpr int kQuads = kRowsPerCta / 4;
  for (int it = rank * kThreads + threadIdx.x; it < kRows * kQuads; it += splits * kThreads) {
    const int t = it / kQuads, rr = (it % kQuads) * 4;
    if (t >= p.m) continue;
    float4 v[8];
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      if (r < splits) {
        v[r] = *reinterpret_cast<const float4*>(cluster.map_shared_rank(red, r) +
                                                t * kRedStride + rr);
      }
    }
    float4 sum = v[0];
#pragma unroll
    for (int r = 1; r < 8; ++r) {
      if (r < splits) {
        sum.x += v[r].x;
        sum.y += v[r].y;
        sum.z += v[r].z;
        sum.w += v[r].w;
      }
    }
    const float vals[4] = {sum.x, sum.y, sum.z, sum.w};
    float* y = p.d_y + static_cast<size_t>(t) * p.ldy + row_base + rr;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (row_base + rr + e < p.n) y[e] = p.beta != 0.0f ? vals[e] + p.beta * y[e] : vals[e];
    }
  }
  cluster.sync();  // the other CTAs' shared memory stays alive until rank 0 has read it
#endif
}

}  // namespace prehoc::kernels::skinny

#endif  // PREHOC_WORKER_KERNELS_SKINNY_GEMM_CUH_
