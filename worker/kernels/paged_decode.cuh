// Paged decode attention kernels (split-KV "flash decoding" + reduction) for dense and sparse
// (CSR index list) KV selection. Contract, tensor shapes and layouts: paged_decode.h.
//
// Partition: one CTA per (KV split, kv head × 16-query-head group, sequence); grid
//   (num_splits, num_kv_heads * q_groups, batch). A CTA streams its split of the attended list in
//   tiles of kTile = 64 tokens through a kStages-deep cp.async pipeline into shared memory
//   (K and V tiles [64][head_dim], 16-byte chunks XOR-swizzled by row so ldmatrix is
//   conflict-free). Each of the 4 warps owns 16 tokens of a tile and runs, on tensor cores
//   (mma.sync m16n8k16, fp32 accumulators):
//     S[16 q-heads × 16 tokens] = Q[16 × D] · K^T          (Q fragments live in registers)
//     online softmax per q-head row (exp2, running max m and sum l)
//     O[16 × D] += P[16 × 16] · V[16 × D]                   (P reused from S's accumulators)
//   so every KV byte is read from DRAM once for the whole GQA group (rows ≥ group size are zero
//   padding; the tensor cores have spare throughput for them). The 4 warps' states are merged in
//   shared memory; with one split the CTA writes out/lse directly, otherwise it writes a
//   normalised partial (o, lse2) to the workspace and MergeSplitsKernel combines the splits:
//     LSE = log2 Σ_s 2^{lse_s},   out = Σ_s 2^{lse_s - LSE} · o_s.
//   The reduction is launched with programmatic dependent launch (griddepcontrol) so its launch
//   latency overlaps the attention grid's tail; with fuse_reduction the last split CTA of each row
//   merges instead (atomic ticket), and no reduction kernel is launched. The attention kernel is
//   itself launched with programmatic dependent launch and starts with griddepcontrol.wait.
//   kTokenMask: a CTA first compacts its split's slice of the keep-mask (at most
//   kMaskSplitPositions positions, or MaskLongSplitPositions(D) with long splits, a separate
//   instantiation) into a shared-memory list of uint16 offsets (block scan), then runs the kToken
//   pipeline over that list; splits cut positions, not list entries. A long slice with more than
//   kMaskListCapacity kept positions runs in rounds: the pipeline drains, the list is rebuilt with
//   the next kMaskListCapacity kept positions, and the same accumulators go on.
//
// Workspace (several splits only):
//   tickets [batch][num_kv_heads * q_groups]  int32, fused reduction only (16-byte padded)
//   ws_o   [batch * num_q_heads][num_splits][head_dim]  f32
//   ws_lse [batch * num_q_heads][num_splits]            f32 (log2 units; -inf for an empty split)
// Fused reduction (PagedDecodeParams::fuse_reduction): instead of MergeSplitsKernel, every split
// CTA takes a ticket (atomicAdd) after writing its partial; the last of its row merges the splits
// (MergeRow) and stores 0 back.
#ifndef PREHOC_WORKER_KERNELS_PAGED_DECODE_CUH_
#define PREHOC_WORKER_KERNELS_PAGED_DECODE_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "worker/kernels/block_primitives.cuh"
#include "worker/kernels/paged_decode.h"

namespace prehoc::kernels::decode {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpTokens = 16;
constexpr int kTile = kWarps * kWarpTokens;  // tokens per pipeline stage
constexpr int kPageSize = 16;
constexpr int kQRows = 16;  // query heads per CTA (the MMA's M)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D>
constexpr int Stages() {
  return D == 128 ? 3 : 4;
}
// Pipeline (K and V tiles) + per-stage validity flags.
template <int D>
constexpr int PipelineBytes() {
  return Stages<D>() * 2 * kTile * D * 2;
}
// kTokenMask: mask positions per split CTA at most (short or long splits).
template <int D, bool kLongMask>
constexpr int MaskPositions() {
  return kLongMask ? MaskLongSplitPositions(D) : kMaskSplitPositions;
}
// Shared memory of MergeSplitsKernel: at most this many splits' lse (floats; 48 KiB, the
// default limit); more splits take the per-thread loop (MergeRow).
constexpr int kMergeSmemFloats = 12288;
// kTokenMask adds its split's compacted list (uint16 offsets from the split's first position,
// kMaskListCapacity of them) and its split's slice of the page table (int32, one per page).
template <int D, KvSelection S, bool kLongMask = false>
constexpr int SmemBytes() {
  return PipelineBytes<D>() + Stages<D>() * kTile +
         (S == KvSelection::kTokenMask
              ? kMaskListCapacity * 2 + MaskPositions<D, kLongMask>() / kPageSize * 4
              : 0);
}
static_assert(MaskLongSplitPositions(64) % (32 * kThreads) == 0);  // whole 32-position groups
static_assert(MaskLongSplitPositions(128) % (32 * kThreads) == 0);
static_assert(kMaskSplitPositions % (32 * kThreads) == 0);
static_assert(kMaskSplitPositions <= kMaskListCapacity);  // short splits: one round
static_assert(MaskLongSplitPositions(128) <= 65536);      // offsets fit in uint16
// Long splits cost no occupancy (the planner assumes the same CTAs per SM).
static_assert(SmemBytes<128, KvSelection::kTokenMask, true>() + 1024 <= 228 * 1024 / 2);
static_assert(SmemBytes<64, KvSelection::kTokenMask, true>() + 1024 <= 228 * 1024 / 3);
// Rounds restart at tile boundaries of the kept list, so a full mask runs dense's tiles.
static_assert(kMaskListCapacity % kTile == 0);
// Epilogue scratch reuses the pipeline: per warp o[16][D + 8] and m, l [16].
template <int D>
constexpr int EpilogueStride() {
  return D + 8;
}
static_assert(kWarps * kQRows * (EpilogueStride<128>() + 2) * 4 <= PipelineBytes<128>());
static_assert(kWarps * kQRows * (EpilogueStride<64>() + 2) * 4 <= PipelineBytes<64>());

// ---- element type traits ---------------------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  // d += a · b for m16n8k16, A row-major, B column-major, f32 accumulators.
  static __device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __half FromFloat(float f) { return __float2half_rn(f); }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t Pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __nv_bfloat16 FromFloat(float f) {
    return __float2bfloat16_rn(f);
  }
};

// ---- PTX helpers -------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte async copy global -> shared (L2 only); writes zeros when !pred (src not read).
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(pred ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void LdMatrixX4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                           uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t addr, uint32_t& r0, uint32_t& r1,
                                                uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
// Element offset of 8-element chunk `chunk` of tile row `row` (XOR swizzle within 8 chunks).
template <int D>
__device__ __forceinline__ int SwizzledOffset(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// ---- attended-list addressing ------------------------------------------------------------------
struct RowView {
  const int32_t* pages;  // the sequence's page table (logical page -> physical page)
  const int32_t* list;   // sparse: this (sequence, kv head)'s CSR entries
  const uint16_t* mask_list;  // kTokenMask: the split's kept positions - mask_base (shared memory)
  const int32_t* mask_pages;  // kTokenMask: page table entries mask_base / 16 ... (shared memory)
  int mask_base;
  int seq_len;
  int num_pages;  // ceil(seq_len / page_size)
};

// Address generation is split in two steps so both loads can be issued one pipeline iteration
// before their results are needed (software-pipelined; the kernel never waits on them in the
// steady state):
//   LoadEntry: the CSR entry behind attended element j (kToken: a token, kPage: a page; dense:
//              j itself; -1 past the split's end).
//   Translate: entry -> physical row id page*16 + slot via the page table, or -1 when masked
//              (out of range). REQUIRES: pool pages < 2^27.
template <KvSelection S>
__device__ __forceinline__ int LoadEntry(const RowView& r, int j, int end) {
  if constexpr (S == KvSelection::kDense) {
    return j < end ? j : -1;
  } else if constexpr (S == KvSelection::kToken) {
    return j < end ? __ldg(r.list + j) : -1;
  } else if constexpr (S == KvSelection::kTokenMask) {
    return j < end ? r.mask_base + r.mask_list[j] : -1;
  } else {
    return j < end ? __ldg(r.list + j / kPageSize) : -1;
  }
}

template <KvSelection S>
__device__ __forceinline__ int Translate(const RowView& r, int j, int entry) {
  if constexpr (S == KvSelection::kTokenMask) {
    // entry is in [mask_base, seq_len) (the compaction dropped the rest); its page was preloaded.
    if (static_cast<unsigned>(entry) >= static_cast<unsigned>(r.seq_len)) return -1;
    return r.mask_pages[(entry - r.mask_base) / kPageSize] * kPageSize + entry % kPageSize;
  }
  int t;  // logical token position
  if constexpr (S == KvSelection::kPage) {
    if (static_cast<unsigned>(entry) >= static_cast<unsigned>(r.num_pages)) return -1;
    t = entry * kPageSize + j % kPageSize;
  } else {
    t = entry;
  }
  if (static_cast<unsigned>(t) >= static_cast<unsigned>(r.seq_len)) return -1;
  return __ldg(r.pages + t / kPageSize) * kPageSize + t % kPageSize;
}

// ---- split reduction ---------------------------------------------------------------------------
// Combines the num_splits partials of one (sequence, query head) row for dim d:
//   LSE = log2 Σ_s 2^{lse_s},   out = Σ_s 2^{lse_s - LSE} · o_s   (empty splits: lse_s = -inf).
// The partials are read through L2 (ld.cg): other CTAs of the same grid may have written them.
template <typename T, int D>
__device__ __forceinline__ void MergeRow(const float* ws_o, const float* ws_lse, int num_splits,
                                         size_t row, int d, T* out, float* lse) {
  const float* lse_row = ws_lse + row * num_splits;
  float m_max = -INFINITY;
  for (int s = 0; s < num_splits; ++s) m_max = fmaxf(m_max, __ldcg(lse_row + s));
  float sum = 0.f, acc = 0.f;
  if (m_max != -INFINITY) {
    for (int s = 0; s < num_splits; ++s) {
      const float ls = __ldcg(lse_row + s);
      if (ls == -INFINITY) continue;  // empty split: its o was never written
      const float w = exp2f(ls - m_max);
      sum += w;
      acc += w * __ldcg(ws_o + (row * num_splits + s) * D + d);
    }
  }
  out[row * D + d] = Elem<T>::FromFloat(sum > 0.f ? acc / sum : 0.f);
  if (d == 0 && lse != nullptr) lse[row] = sum > 0.f ? (m_max + log2f(sum)) * kLn2 : -INFINITY;
}

// Fused reduction: the last split CTA merges `rows` query rows (out_row0 ...) of all splits, with
// the same arithmetic in the same order as MergeRow (bitwise-identical results), but with the
// loads spread over the block: every lse once into shared memory (one round of independent
// loads), per-row max by a warp, the weights 2^{lse_s - max} by all threads, the per-row sums
// sequentially in split order by one thread each, then out[row][d] = Σ_s w_s · o_s / sum with the
// o loads of consecutive splits independent (unrolled). Falls back to MergeRow per element when
// rows × num_splits does not fit in `scratch` (smem_floats floats, minus 2 × kQRows).
template <typename T, int D>
__device__ __forceinline__ void MergeRowsInCta(const float* ws_o, const float* ws_lse,
                                               int num_splits, size_t out_row0, int rows, T* out,
                                               float* lse, float* scratch, int smem_floats) {
  const int n = rows * num_splits;
  if (n + 2 * kQRows > smem_floats) {
    for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
      MergeRow<T, D>(ws_o, ws_lse, num_splits, out_row0 + idx / D, idx % D, out, lse);
    }
    return;
  }
  float* m_s = scratch;           // [kQRows] per-row max (log2 units)
  float* sum_s = m_s + kQRows;    // [kQRows] per-row Σ_s w_s
  float* w_s = sum_s + kQRows;    // [rows][num_splits] lse, then weights
  for (int i = threadIdx.x; i < n; i += kThreads) w_s[i] = __ldcg(ws_lse + out_row0 * num_splits + i);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int row = warp; row < rows; row += kWarps) {
    float m = -INFINITY;
    for (int s = lane; s < num_splits; s += 32) m = fmaxf(m, w_s[row * num_splits + s]);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) m_s[row] = m;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const float m = m_s[i / num_splits];
    const float ls = w_s[i];
    // Empty splits (and rows with no split) weigh 0 and are skipped below, as in MergeRow.
    w_s[i] = m == -INFINITY || ls == -INFINITY ? 0.f : exp2f(ls - m);
  }
  __syncthreads();
  if (threadIdx.x < rows) {
    float sum = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float w = w_s[threadIdx.x * num_splits + s];
      if (w != 0.f) sum += w;
    }
    sum_s[threadIdx.x] = sum;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
    const int row = idx / D, d = idx % D;
    const float* w = w_s + row * num_splits;
    const float* o = ws_o + (out_row0 + row) * num_splits * D + d;
    float acc = 0.f;
#pragma unroll 8
    for (int s = 0; s < num_splits; ++s) {
      if (w[s] != 0.f) acc += w[s] * __ldcg(o + static_cast<size_t>(s) * D);
    }
    const float sum = sum_s[row];
    out[(out_row0 + row) * D + d] = Elem<T>::FromFloat(sum > 0.f ? acc / sum : 0.f);
    if (d == 0 && lse != nullptr) {
      lse[out_row0 + row] = sum > 0.f ? (m_s[row] + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
}

// kTokenMask prologue, in two steps so that the mask loads can be issued first (before anything
// that waits for the sequence length or the page table):
//   LoadMaskSlice: thread t loads the vpt = ceil(avail / 16 / kThreads) contiguous 16-byte
//     vectors of the slice `row` starting at t * vpt into m.w (zeros past the slice), vpt into
//     m.vpt. `avail`: bytes of the mask row readable at `row` (a multiple of 16, <= kMaxPositions;
//     it does not depend on the sequence length); `row` 16-byte aligned.
//   CompactMaskSlice: of the kept positions among [0, len) (len <= avail; may be <= 0), writes
//     those of rank [skip, skip + kMaskListCapacity) (ascending) into `list` (offsets from the
//     slice's start, list[rank - skip]) and returns how many there are in all. The block scan
//     over the threads' contiguous vectors gives the ranks. The caller's next barrier publishes
//     the list.
template <int kMaxPositions>
struct MaskSliceWords {
  static constexpr int kMaxVecs = kMaxPositions / 16 / kThreads;
  uint32_t w[kMaxVecs * 4];
  int vpt;
};

template <int kMaxPositions>
__device__ __forceinline__ void LoadMaskSlice(const uint8_t* row, int avail,
                                              MaskSliceWords<kMaxPositions>& m) {
  constexpr int kMaxVecs = MaskSliceWords<kMaxPositions>::kMaxVecs;
  const int num_vecs = avail / 16;
  m.vpt = (num_vecs + kThreads - 1) / kThreads;
  const uint4* vrow = reinterpret_cast<const uint4*>(row);
#pragma unroll
  for (int k = 0; k < kMaxVecs; ++k) {
    const int i = threadIdx.x * m.vpt + k;
    uint4 v = k < m.vpt && i < num_vecs ? __ldg(vrow + i) : make_uint4(0u, 0u, 0u, 0u);
    m.w[4 * k] = v.x;
    m.w[4 * k + 1] = v.y;
    m.w[4 * k + 2] = v.z;
    m.w[4 * k + 3] = v.w;
  }
}

template <int kMaxPositions>
__device__ __forceinline__ int CompactMaskSlice(MaskSliceWords<kMaxPositions>& m, int len,
                                                int skip, uint16_t* list, int* scratch) {
  // Small code on purpose (it runs once per CTA, straight-line): each group of 8 words (32
  // positions) becomes one 32-bit "kept" mask, bit i = position p_first + 32 j + i; the count is
  // a popc and the stores loop over the set bits only.
  constexpr int kMaxVecs = MaskSliceWords<kMaxPositions>::kMaxVecs;
  constexpr int kGroups = kMaxVecs / 2;  // 32 positions each
  const int p_first = threadIdx.x * m.vpt * 16;  // first position of this thread's vectors
  uint32_t bits[kGroups];
  int c = 0;
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    uint32_t g = 0;
    if (2 * j < m.vpt) {  // block-uniform: smaller slices skip the unused words
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const uint32_t x = m.w[8 * j + q];
        // 0x80 in every non-zero byte, then bytes' flags gathered into 4 bits by one multiply.
        const uint32_t hi = (((x & 0x7f7f7f7fu) + 0x7f7f7f7fu) | x) & 0x80808080u;
        g |= (((hi >> 7) * 0x00204081u) >> 21 & 0xfu) << (4 * q);
      }
      const int lim = len - (p_first + 32 * j);  // positions >= len are ignored
      g = lim <= 0 ? 0u : (lim >= 32 ? g : g & ((1u << lim) - 1u));
    }
    bits[j] = g;
    c += __popc(g);
  }
  int total;
  int rank = block::BlockExclusiveScan<kThreads>(c, scratch, &total) - skip;
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    for (uint32_t g = bits[j]; g != 0u; g &= g - 1u, ++rank) {
      if (static_cast<unsigned>(rank) < static_cast<unsigned>(kMaskListCapacity)) {
        list[rank] = static_cast<uint16_t>(p_first + 32 * j + __ffs(g) - 1);
      }
    }
  }
  return total;
}

// The same as LoadMaskSlice + CompactMaskSlice with few registers (for the rounds after the first,
// when the accumulators are live): the slice in passes of one 16-byte vector per thread, each with
// its own block scan. Ends with a barrier.
__device__ __forceinline__ void RecompactMaskSlice(const uint8_t* row, int avail, int len,
                                                   int skip, uint16_t* list, int* scratch) {
  const uint4* vrow = reinterpret_cast<const uint4*>(row);
  const int num_vecs = avail / 16;
  int base = -skip;  // rank of the pass's first kept position, minus skip
  for (int v0 = 0; v0 < num_vecs; v0 += kThreads) {
    const int i = v0 + threadIdx.x;
    const uint4 v = i < num_vecs ? __ldg(vrow + i) : make_uint4(0u, 0u, 0u, 0u);
    uint32_t w[4] = {v.x, v.y, v.z, v.w};
    int c = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int p0 = i * 16 + k * 4;
      if (p0 + 4 > len) w[k] = p0 >= len ? 0u : w[k] & (0xffffffffu >> (8 * (p0 + 4 - len)));
      c += block::NonZeroBytes(w[k]);
    }
    int total;
    int rank = base + block::BlockExclusiveScan<kThreads>(c, scratch, &total);
    base += total;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        if ((w[k] >> (8 * b)) & 0xffu) {
          if (static_cast<unsigned>(rank) < static_cast<unsigned>(kMaskListCapacity)) {
            list[rank] = static_cast<uint16_t>(i * 16 + k * 4 + b);
          }
          ++rank;
        }
      }
    }
  }
  __syncthreads();
}

// ---- attention kernel --------------------------------------------------------------------------
// split_tokens: attended elements per split (kTokenMask: mask positions per split).
// ws_tickets: fused reduction only, one zero-initialised counter per (sequence, kv head, group).
// kLongMask (kTokenMask only): long splits (MaskLongSplitPositions(D) positions, rounds).
template <typename T, int D, KvSelection S, bool kLongMask = false>
__global__ void __launch_bounds__(kThreads)
    PagedDecodeKernel(const PagedDecodeParams p, int q_groups, int split_tokens, int num_splits,
                      float scale_log2, float* __restrict__ ws_o, float* __restrict__ ws_lse,
                      int* __restrict__ ws_tickets) {
  // Launched with programmatic dependent launch: wait for the previous kernel's results (q, the
  // KV pools, lists, masks) before reading anything.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  // Diagnostics (PagedDecodeParams::d_timeline): thread 0 stamps this CTA's phases.
  unsigned long long* timeline =
      p.d_timeline != nullptr && threadIdx.x == 0
          ? p.d_timeline + 8 * ((static_cast<size_t>(blockIdx.z) * gridDim.y + blockIdx.y) *
                                    gridDim.x + blockIdx.x)
          : nullptr;
  unsigned long long tl_clock[4] = {0, 0, 0, 0};
  uint64_t tl_start = 0;
  if (timeline != nullptr) {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(tl_start));
    tl_clock[0] = clock64();
  }
  constexpr int kStages = Stages<D>();
  constexpr int kChunksPerRow = D / 8;
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static_assert(kTile % kRowsPerPass == 0);

  extern __shared__ __align__(128) unsigned char smem[];
  T* k_s = reinterpret_cast<T*>(smem);               // [kStages][kTile][D], swizzled
  T* v_s = k_s + kStages * kTile * D;                // [kStages][kTile][D], swizzled
  uint8_t* valid_s = smem + PipelineBytes<D>();      // [kStages][kTile]

  const int split = blockIdx.x;
  const int hkv = blockIdx.y / q_groups;
  const int g0 = (blockIdx.y % q_groups) * kQRows;
  const int b = blockIdx.z;
  const int num_kv_heads = p.num_kv_heads;
  const int group = p.num_q_heads / num_kv_heads;
  const int rows = min(kQRows, group - g0);  // valid query rows of this CTA
  const int hq0 = hkv * group + g0;
  const size_t out_row0 = static_cast<size_t>(b) * p.num_q_heads + hq0;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int gid = lane / 4;  // MMA row group
  const int tid4 = lane % 4;

  // kTokenMask: the split's mask slice is loaded first (it depends on nothing loaded), so that it
  // is in flight with the sequence length and the page-table offset.
  constexpr int kMaskPositions = MaskPositions<D, kLongMask>();
  MaskSliceWords<kMaskPositions> words;
  const int mask_pos_begin = split * split_tokens;  // kTokenMask: a multiple of the tile
  const int mask_avail = min(mask_pos_begin + split_tokens, p.mask_stride) - mask_pos_begin;
  const uint8_t* mask_row =
      p.d_mask + static_cast<size_t>(b * num_kv_heads + hkv) * p.mask_stride + mask_pos_begin;
  if constexpr (S == KvSelection::kTokenMask) LoadMaskSlice(mask_row, mask_avail, words);

  RowView view;
  view.seq_len = max(p.d_seq_lens[b], 0);
  view.num_pages = (view.seq_len + kPageSize - 1) / kPageSize;
  view.pages = p.d_page_indices + p.d_page_indptr[b];
  view.list = nullptr;
  view.mask_list = nullptr;
  view.mask_pages = nullptr;
  view.mask_base = 0;
  int list_len;
  int chunk_begin, chunk_end;
  // kTokenMask: for the rounds after the first (see CompactMaskSlice).
  int mask_len = 0, mask_total = 0;
  int* scan_scratch = nullptr;
  uint16_t* mask_list_w = nullptr;
  if constexpr (S == KvSelection::kDense) {
    list_len = view.seq_len;
  } else if constexpr (S == KvSelection::kTokenMask) {
    __shared__ int scan_scratch_s[kThreads / 32];
    scan_scratch = scan_scratch_s;
    uint16_t* mask_list = reinterpret_cast<uint16_t*>(valid_s + kStages * kTile);
    int32_t* mask_pages = reinterpret_cast<int32_t*>(mask_list + kMaskListCapacity);
    const int pos_begin = mask_pos_begin;
    mask_len = min(pos_begin + mask_avail, view.seq_len) - pos_begin;
    // The split's page-table entries (only pages of the sequence): all of a thread's loads issued
    // at once, in flight during the compaction, stored after it; the barrier publishes both.
    const int page0 = pos_begin / kPageSize;
    constexpr int kSplitPages = kMaskPositions / kPageSize;
    const int num_split_pages = min(view.num_pages - page0, kSplitPages);
    constexpr int kPagesPerThread = kSplitPages / kThreads;
    int32_t pg[kPagesPerThread];
#pragma unroll
    for (int k = 0; k < kPagesPerThread; ++k) {
      const int i = threadIdx.x + k * kThreads;
      pg[k] = i < num_split_pages ? __ldg(view.pages + page0 + i) : 0;
    }
    mask_total = CompactMaskSlice(words, mask_len, 0, mask_list, scan_scratch);
#pragma unroll
    for (int k = 0; k < kPagesPerThread; ++k) mask_pages[threadIdx.x + k * kThreads] = pg[k];
    __syncthreads();
    list_len = min(mask_total, kMaskListCapacity);  // round 0; later rounds: the main loop
    view.mask_list = mask_list;
    mask_list_w = mask_list;
    view.mask_pages = mask_pages;
    view.mask_base = pos_begin;
  } else {
    const int r = b * num_kv_heads + hkv;
    const int beg = p.d_index_indptr[r];
    const int end = p.d_index_indptr[r + 1];
    view.list = p.d_index_indices + beg;
    list_len = max(end - beg, 0) * (S == KvSelection::kPage ? kPageSize : 1);
  }
  if constexpr (S == KvSelection::kTokenMask) {
    chunk_begin = 0;  // the CTA compacted exactly its split (its first round)
    chunk_end = list_len;
  } else {
    chunk_begin = split * split_tokens;
    chunk_end = split == num_splits - 1 ? list_len : min(list_len, chunk_begin + split_tokens);
  }
  const bool single = num_splits == 1;
  // Fused reduction: after writing its partial, every split CTA takes a ticket; the last one of
  // its (sequence, kv head, group) merges all splits and puts the ticket back to zero.
  T* out = static_cast<T*>(p.d_out);
  int* last_flag = reinterpret_cast<int*>(valid_s);  // epilogue only (the pipeline is drained)
  auto finish_split = [&]() {
    if (ws_tickets == nullptr) return;
    __threadfence();  // this CTA's partials are visible device-wide before its ticket
    __syncthreads();
    if (threadIdx.x == 0) {
      int* ticket = ws_tickets + static_cast<size_t>(blockIdx.z) * gridDim.y + blockIdx.y;
      const bool last = atomicAdd(ticket, 1) == num_splits - 1;
      if (last) *ticket = 0;  // every other split has taken its ticket
      *last_flag = last ? 1 : 0;
    }
    __syncthreads();
    if (*last_flag == 0) return;
    __threadfence();
    MergeRowsInCta<T, D>(ws_o, ws_lse, num_splits, out_row0, rows, out, p.d_lse,
                         reinterpret_cast<float*>(smem), PipelineBytes<D>() / 4);
  };
  if (!single && chunk_begin >= chunk_end) {
    // Empty split: mark it so the reduction skips it.
    if (threadIdx.x < rows) {
      ws_lse[(out_row0 + threadIdx.x) * num_splits + split] = -INFINITY;
    }
    finish_split();
    return;
  }
  const T* __restrict__ k_pool = static_cast<const T*>(p.d_k_pool);
  const T* __restrict__ v_pool = static_cast<const T*>(p.d_v_pool);
  const int load_col = threadIdx.x % kChunksPerRow;
  const int load_row0 = threadIdx.x / kChunksPerRow;

  // Per-thread rows of a tile: load_row0 + i * kRowsPerPass, i < kRowsPerThread.
  constexpr int kRowsPerThread = kTile / kRowsPerPass;
  auto load_entries = [&](int tile, int (&entry)[kRowsPerThread]) {
    const int base = chunk_begin + tile * kTile + load_row0;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      entry[i] = LoadEntry<S>(view, base + i * kRowsPerPass, chunk_end);
    }
  };
  auto translate = [&](int tile, const int (&entry)[kRowsPerThread], int (&phys)[kRowsPerThread]) {
    const int base = chunk_begin + tile * kTile + load_row0;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      phys[i] = Translate<S>(view, base + i * kRowsPerPass, entry[i]);
    }
  };
  // Issues the cp.async copies of a tile (physical rows `phys`) into `stage`; no barrier.
  auto issue = [&](int stage, const int (&phys)[kRowsPerThread]) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = load_row0 + i * kRowsPerPass;
      const bool ok = phys[i] >= 0;
      // element offset of K[page][hkv][slot][load_col*8] in [num_pages][Hkv][16][D]
      const size_t off =
          ok ? ((static_cast<size_t>(phys[i] / kPageSize) * num_kv_heads + hkv) * kPageSize +
                phys[i] % kPageSize) *
                       D +
                   load_col * 8
             : 0;
      const int s_off = stage * kTile * D + SwizzledOffset<D>(r, load_col);
      CpAsync16(SmemAddr(k_s + s_off), k_pool + off, ok);
      CpAsync16(SmemAddr(v_s + s_off), v_pool + off, ok);
      if (load_col == 0) valid_s[stage * kTile + r] = ok ? 1 : 0;
    }
  };

  // Starts a round's pipeline: copies of its first kStages - 1 tiles issued; entries two tiles
  // ahead of the copies and physical rows one tile ahead (the steady state of the main loop).
  int entry[kRowsPerThread];
  int phys[kRowsPerThread];
  int num_tiles = 0;
  auto start_round = [&]() {
    num_tiles = chunk_end > chunk_begin ? (chunk_end - chunk_begin + kTile - 1) / kTile : 0;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < num_tiles) {
        load_entries(s, entry);
        translate(s, entry, phys);
        issue(s, phys);
      }
      CpAsyncCommit();
    }
    load_entries(kStages - 1, entry);
    translate(kStages - 1, entry, phys);
    load_entries(kStages, entry);
  };
  start_round();

  // Q as MMA A fragments: rows = query heads g0 + {gid, gid + 8}, cols = dims.
  uint32_t qa[D / 16][4];
  {
    const T* q = static_cast<const T*>(p.d_q) + out_row0 * D;
    const bool lo_ok = gid < rows;
    const bool hi_ok = gid + 8 < rows;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int c = kk * 16 + tid4 * 2;
      qa[kk][0] = lo_ok ? *reinterpret_cast<const uint32_t*>(q + gid * D + c) : 0u;
      qa[kk][1] = hi_ok ? *reinterpret_cast<const uint32_t*>(q + (gid + 8) * D + c) : 0u;
      qa[kk][2] = lo_ok ? *reinterpret_cast<const uint32_t*>(q + gid * D + c + 8) : 0u;
      qa[kk][3] = hi_ok ? *reinterpret_cast<const uint32_t*>(q + (gid + 8) * D + c + 8) : 0u;
    }
  }

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // log2 units, rows gid and gid + 8
  float l_run[2] = {0.f, 0.f};              // this thread's partial sums (quad-reduced at the end)

  if (timeline != nullptr) tl_clock[1] = clock64();  // prologue issued
  const int mi = lane / 8;  // ldmatrix: which 8x8 matrix this lane addresses
  const int ri = lane % 8;  // ... and which row of it
  const int n0 = warp * kWarpTokens;

  int total_tiles = 0;  // for the timeline
  // One round, except for a kTokenMask split with more than kMaskListCapacity kept positions.
  for (int round = 0;; ++round) {
    total_tiles += num_tiles;
    for (int tile = 0; tile < num_tiles; ++tile) {
      CpAsyncWait<kStages - 2>();
      __syncthreads();
      if (timeline != nullptr && round == 0 && tile == 0) tl_clock[2] = clock64();  // 1st tile
      {
        const int next = tile + kStages - 1;
        if (next < num_tiles) issue(next % kStages, phys);
        CpAsyncCommit();
        translate(next + 1, entry, phys);    // results used by the next iteration's issue
        load_entries(next + 2, entry);       // results used by the next iteration's translate
      }
      const int stage = tile % kStages;
      const T* k_tile = k_s + stage * kTile * D;
      const T* v_tile = v_s + stage * kTile * D;
      const uint8_t* valid = valid_s + stage * kTile + n0;

      // S = Q · K^T over this warp's 16 tokens (two n8 tiles).
      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      {
        const int row = n0 + ri + ((mi >> 1) << 3);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t b0, b1, b2, b3;
          LdMatrixX4(SmemAddr(k_tile + SwizzledOffset<D>(row, 2 * kk + (mi & 1))), b0, b1, b2, b3);
          Elem<T>::Mma(s[0], qa[kk], b0, b1);
          Elem<T>::Mma(s[1], qa[kk], b2, b3);
        }
      }
      // Scale to log2 units and mask; s[nt][e]: row gid + 8*(e/2), token nt*8 + tid4*2 + e%2.
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool ok = valid[nt * 8 + tid4 * 2 + (e & 1)] != 0;
          s[nt][e] = ok ? s[nt][e] * scale_log2 : -INFINITY;
          tile_max[e / 2] = fmaxf(tile_max[e / 2], s[nt][e]);
        }
      }
      float m_use[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
        const float m_new = fmaxf(m_run[h], tile_max[h]);
        m_use[h] = m_new == -INFINITY ? 0.f : m_new;  // all masked so far: keep exp2 finite
        const float alpha = exp2f(m_run[h] - m_use[h]);
        m_run[h] = m_new;
        l_run[h] *= alpha;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          o[i][2 * h] *= alpha;
          o[i][2 * h + 1] *= alpha;
        }
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nt][e] = exp2f(s[nt][e] - m_use[e / 2]);
          l_run[e / 2] += s[nt][e];
        }
      }
      // P as the A fragment of P · V (k = the warp's 16 tokens).
      const uint32_t pa[4] = {Elem<T>::Pack(s[0][0], s[0][1]), Elem<T>::Pack(s[0][2], s[0][3]),
                              Elem<T>::Pack(s[1][0], s[1][1]), Elem<T>::Pack(s[1][2], s[1][3])};
      {
        const int row = n0 + ri + ((mi & 1) << 3);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t b0, b1, b2, b3;
          LdMatrixX4Trans(SmemAddr(v_tile + SwizzledOffset<D>(row, 2 * dp + (mi >> 1))), b0, b1, b2,
                          b3);
          Elem<T>::Mma(o[2 * dp], pa, b0, b1);
          Elem<T>::Mma(o[2 * dp + 1], pa, b2, b3);
        }
      }
    }
    if constexpr (S != KvSelection::kTokenMask || !kLongMask) {
      break;  // short mask splits: kMaskSplitPositions <= kMaskListCapacity, one round
    } else {
      // Next round: the next kMaskListCapacity kept positions of the split. Every copy has landed
      // (the last groups are empty) and every warp is done with the list and the stages.
      const int done = (round + 1) * kMaskListCapacity;
      if (mask_total <= done) break;
      CpAsyncWait<0>();
      __syncthreads();
      RecompactMaskSlice(mask_row, mask_avail, mask_len, done, mask_list_w, scan_scratch);
      chunk_end = min(mask_total - done, kMaskListCapacity);
      start_round();
    }
  }  // rounds
  if (timeline != nullptr) tl_clock[3] = clock64();  // main loop done
  CpAsyncWait<0>();
  // Lets the reduction kernel (launched with programmatic stream serialization) start its launch
  // now; it still waits (griddepcontrol.wait) until this grid has finished and flushed.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  __syncthreads();  // pipeline smem is reused below

  // ---- merge the 4 warps' (m, l, o) in shared memory --------------------------------------------
  constexpr int kStride = EpilogueStride<D>();
  float* o_s = reinterpret_cast<float*>(smem);  // [kWarps][16][kStride]
  float* m_s = o_s + kWarps * kQRows * kStride;  // [kWarps][16]
  float* l_s = m_s + kWarps * kQRows;            // [kWarps][16]
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
  }
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    const int col = i * 8 + tid4 * 2;
    *reinterpret_cast<float2*>(o_s + (warp * kQRows + gid) * kStride + col) =
        make_float2(o[i][0], o[i][1]);
    *reinterpret_cast<float2*>(o_s + (warp * kQRows + gid + 8) * kStride + col) =
        make_float2(o[i][2], o[i][3]);
  }
  if (tid4 == 0) {
    m_s[warp * kQRows + gid] = m_run[0];
    m_s[warp * kQRows + gid + 8] = m_run[1];
    l_s[warp * kQRows + gid] = l_run[0];
    l_s[warp * kQRows + gid + 8] = l_run[1];
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
    const int row = idx / D;
    const int d = idx % D;
    float m_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_max = fmaxf(m_max, m_s[w * kQRows + row]);
    float l_sum = 0.f, acc = 0.f;
    if (m_max != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = exp2f(m_s[w * kQRows + row] - m_max);
        l_sum += l_s[w * kQRows + row] * f;
        acc += o_s[(w * kQRows + row) * kStride + d] * f;
      }
    }
    const float val = l_sum > 0.f ? acc / l_sum : 0.f;
    const float lse2 = l_sum > 0.f ? m_max + log2f(l_sum) : -INFINITY;
    if (single) {
      out[(out_row0 + row) * D + d] = Elem<T>::FromFloat(val);
      if (d == 0 && p.d_lse != nullptr) p.d_lse[out_row0 + row] = lse2 * kLn2;
    } else {
      const size_t w = (out_row0 + row) * num_splits + split;
      ws_o[w * D + d] = val;
      if (d == 0) ws_lse[w] = lse2;
    }
  }
  if (!single) finish_split();
  if (timeline != nullptr) {
    uint64_t end, smid;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(end));
    uint32_t id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    smid = id;
    const unsigned long long now = clock64();
    timeline[0] = smid;
    timeline[1] = tl_start;
    timeline[2] = end;
    timeline[3] = tl_clock[1] - tl_clock[0];
    timeline[4] = tl_clock[2] - tl_clock[0];
    timeline[5] = tl_clock[3] - tl_clock[0];
    timeline[6] = now - tl_clock[0];
    timeline[7] = static_cast<unsigned long long>(total_tiles);
  }
}

// ---- split reduction ---------------------------------------------------------------------------
// One CTA of D threads per (sequence, query head) row; thread d computes dim d. Same arithmetic
// in the same order as MergeRow (bitwise-identical results), but the row's lse values are loaded
// once, in one round, into shared memory (dynamic, min(num_splits, kMergeSmemFloats) floats), and
// the o loads of kMergeBatch consecutive splits are issued together: a chain of
// 1 + ceil(num_splits / kMergeBatch) L2 round trips instead of ~2 × num_splits / unroll.
constexpr int kMergeBatch = 16;
template <typename T, int D>
__global__ void __launch_bounds__(D)
    MergeSplitsKernel(const float* __restrict__ ws_o, const float* __restrict__ ws_lse,
                      int num_splits, T* __restrict__ out, float* __restrict__ lse) {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");  // the attention grid's partials
  if (num_splits > kMergeSmemFloats) {
    MergeRow<T, D>(ws_o, ws_lse, num_splits, blockIdx.x, threadIdx.x, out, lse);
    return;
  }
  extern __shared__ float lse_s[];  // [num_splits]
  const size_t row = blockIdx.x;
  const int d = threadIdx.x;
  for (int s = d; s < num_splits; s += D) lse_s[s] = __ldcg(ws_lse + row * num_splits + s);
  __syncthreads();
  float m_max = -INFINITY;
  for (int s = 0; s < num_splits; ++s) m_max = fmaxf(m_max, lse_s[s]);
  float sum = 0.f, acc = 0.f;
  if (m_max != -INFINITY) {
    const float* o_row = ws_o + row * num_splits * D + d;
    for (int s0 = 0; s0 < num_splits; s0 += kMergeBatch) {
      float ov[kMergeBatch];
#pragma unroll
      for (int i = 0; i < kMergeBatch; ++i) {
        // Empty splits' o was never written: loaded (inside the workspace) but not used.
        ov[i] = s0 + i < num_splits ? __ldcg(o_row + static_cast<size_t>(s0 + i) * D) : 0.f;
      }
#pragma unroll
      for (int i = 0; i < kMergeBatch; ++i) {
        if (s0 + i >= num_splits) break;
        const float ls = lse_s[s0 + i];
        if (ls == -INFINITY) continue;
        const float w = exp2f(ls - m_max);
        sum += w;
        acc += w * ov[i];
      }
    }
  }
  out[row * D + d] = Elem<T>::FromFloat(sum > 0.f ? acc / sum : 0.f);
  if (d == 0 && lse != nullptr) lse[row] = sum > 0.f ? (m_max + log2f(sum)) * kLn2 : -INFINITY;
}

// Bytes of the fused reduction's tickets at the start of the workspace (16-byte padded).
inline size_t FusedTicketBytes(int batch, int num_kv_heads, int q_groups) {
  return (static_cast<size_t>(batch) * num_kv_heads * q_groups * sizeof(int) + 15) / 16 * 16;
}

// ---- host-side per-variant entry points (instantiated in paged_decode_{f16,bf16}.cu) -----------
// The kernel of a variant and its dynamic shared memory (long_mask: kTokenMask long splits).
template <typename T, int D, KvSelection S>
struct KernelOf {
  using Fn = void (*)(const PagedDecodeParams, int, int, int, float, float*, float*, int*);
  Fn fn;
  int smem;
  explicit KernelOf(bool long_mask) {
    if constexpr (S == KvSelection::kTokenMask) {
      if (long_mask) {
        fn = PagedDecodeKernel<T, D, S, true>;
        smem = SmemBytes<D, S, true>();
        return;
      }
    }
    fn = PagedDecodeKernel<T, D, S>;
    smem = SmemBytes<D, S>();
  }
};

template <typename T, int D, KvSelection S>
cudaError_t CtasPerSm(int* ctas, bool long_mask) {
  const KernelOf<T, D, S> k(long_mask);
  cudaError_t err =
      cudaFuncSetAttribute(k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, k.smem);
  if (err != cudaSuccess) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas, k.fn, kThreads, k.smem);
}

using block::LaunchPdl;

template <typename T, int D, KvSelection S>
cudaError_t Launch(const PagedDecodeParams& p, const PagedDecodePlan& plan, float scale,
                   cudaStream_t stream) {
  const KernelOf<T, D, S> k(plan.mask_long_splits);
  cudaError_t err =
      cudaFuncSetAttribute(k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, k.smem);
  if (err != cudaSuccess) return err;
  // Workspace: [tickets (fused reduction), 16-byte padded][ws_o][ws_lse]; the tickets come first
  // so that their place does not depend on the split count.
  float* ws_o = static_cast<float*>(p.d_workspace);
  float* ws_lse = nullptr;
  int* ws_tickets = nullptr;
  if (plan.num_splits > 1) {
    if (p.fuse_reduction) {
      ws_tickets = static_cast<int*>(p.d_workspace);
      ws_o = reinterpret_cast<float*>(static_cast<char*>(p.d_workspace) +
                                      FusedTicketBytes(p.batch, p.num_kv_heads, plan.q_groups));
    }
    ws_lse = ws_o + static_cast<size_t>(p.batch) * p.num_q_heads * plan.num_splits * D;
  }
  const int split_len = S == KvSelection::kTokenMask ? plan.split_positions : plan.split_tokens;
  const dim3 grid(plan.num_splits, p.num_kv_heads * plan.q_groups, p.batch);
  err = LaunchPdl(k.fn, grid, dim3(kThreads), k.smem, stream, p, plan.q_groups, split_len,
                  plan.num_splits, scale * kLog2e, ws_o, ws_lse, ws_tickets);
  if (err != cudaSuccess || plan.num_splits == 1 || ws_tickets != nullptr) return err;
  // Programmatic dependent launch: the reduction's launch overlaps the attention grid's tail.
  const size_t merge_smem = sizeof(float) * std::min(plan.num_splits, kMergeSmemFloats);
  return LaunchPdl(MergeSplitsKernel<T, D>, dim3(p.batch * p.num_q_heads), dim3(D), merge_smem,
                   stream, static_cast<const float*>(ws_o), static_cast<const float*>(ws_lse),
                   plan.num_splits, static_cast<T*>(p.d_out), p.d_lse);
}

}  // namespace prehoc::kernels::decode

// Explicit instantiation of every (head_dim, selection) variant for element type T.
#define PREHOC_INSTANTIATE_PAGED_DECODE_D_S(T, D, S)                                             \
  template cudaError_t prehoc::kernels::decode::CtasPerSm<T, D, S>(int*, bool);                 \
  template cudaError_t prehoc::kernels::decode::Launch<T, D, S>(                                \
      const prehoc::kernels::PagedDecodeParams&, const prehoc::kernels::PagedDecodePlan&, float, \
      cudaStream_t);
#define PREHOC_INSTANTIATE_PAGED_DECODE(T)                                                        \
  PREHOC_INSTANTIATE_PAGED_DECODE_D_S(T, 64, prehoc::kernels::KvSelection::kDense)                \
  PREHOC_INSTANTIATE_PAGED_DECODE_D_S(T, 64, prehoc::kernels::KvSelection::kToken)                \
  PREHOC_INSTANTIATE_PAGED_DECODE_D_S(T, 64, prehoc::kernels::KvSelection::kPage)                 \
  PREHOC_INSTANTIATE_PAGED_DECODE_D_S(T, 64, prehoc::kernels::KvSelection::kTokenMask)            \
  PREHOC_INSTANTIATE_PAGED_DECODE_D_S(T, 128, prehoc::kernels::KvSelection::kDense)               \
  PREHOC_INSTANTIATE_PAGED_DECODE_D_S(T, 128, prehoc::kernels::KvSelection::kToken)               \
  PREHOC_INSTANTIATE_PAGED_DECODE_D_S(T, 128, prehoc::kernels::KvSelection::kPage)                \
  PREHOC_INSTANTIATE_PAGED_DECODE_D_S(T, 128, prehoc::kernels::KvSelection::kTokenMask)

#endif  // PREHOC_WORKER_KERNELS_PAGED_DECODE_CUH_
