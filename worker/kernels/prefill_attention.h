// Paged attention for any number of new query rows per sequence (prefill chunks, decode rows,
// bidirectional DLM steps), causal or not, for any even head_dim <= 256 and any page size. A
// simple, exact kernel: the CUDA backend uses it for prefill and for decode when the fast decode
// kernel (paged_decode.h: head_dim 64/128, page size 16) does not apply. Host API; kernel in
// prefill_attention.cuh, instantiated in prefill_attention.cu. CUDA and std headers only.
//
// ---------------------------------------------------------------------------------------------
// Tensors (device pointers, row-major; bf16 = bfloat16 bits in uint16_t):
//   q        [rows][num_q_heads][head_dim]                          bf16
//   out      [rows][num_q_heads][head_dim]                          bf16 (written)
//   k_pool   [num_pages][num_kv_heads][page_size][head_dim]         bf16 (one layer's K)
//   v_pool   [num_pages][num_kv_heads][page_size][head_dim]         bf16 (one layer's V)
//   page_indptr [batch + 1], page_indices [page_indptr[batch]]  int32: sequence b's logical page
//              p is physical page page_indices[page_indptr[b] + p] (as in paged_decode.h)
//   seq_lens [batch]  int32 tokens in each sequence's KV (including this step's rows)
//   row_seq  [rows]   int32 sequence b of each query row
//   row_pos  [rows]   int32 logical position of each query row (its own K/V is already in the
//                     pools at that position)
// Row r (sequence b, position p) with query head hq attends, through kv head hq / (Hq / Hkv),
//   causal:        tokens t in [0, p]
//   bidirectional: tokens t in [0, seq_lens[b])
//   causal with the PSAW band (d_band_fraction set, per sequence b: f = d_band_fraction[b],
//   s = d_band_sink[b]): lo = (int64) (f · (double) (p + 1)) when f > 0, else 0; if lo > s the row
//   attends to [0, s) ∪ [lo, p], otherwise to [0, p] — exactly Engine::Step's prefill band
//   (worker/engine.cc; f = the layer's psaw_drop_fraction, s its sink, same double arithmetic).
//   Keys in [s, lo) are never loaded (the walk jumps over them), so there is nothing to mask.
//   out = Σ_t softmax_t(scale · q · K[t]) V[t]   (fp32 scores, softmax and accumulation; the
//   output is rounded to bf16 once). An empty key set gives out = 0.
// ---------------------------------------------------------------------------------------------
#ifndef PREHOC_WORKER_KERNELS_PREFILL_ATTENTION_H_
#define PREHOC_WORKER_KERNELS_PREFILL_ATTENTION_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

namespace prehoc::kernels {

struct PrefillAttentionParams {
  int rows = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;  // REQUIRES: divides num_q_heads
  int head_dim = 0;      // REQUIRES: even, <= 256
  int page_size = 16;
  bool causal = true;
  float scale = 0.0f;  // 0 means 1 / sqrt(head_dim)
  const uint16_t* d_q = nullptr;
  uint16_t* d_out = nullptr;
  const uint16_t* d_k_pool = nullptr;
  const uint16_t* d_v_pool = nullptr;
  const int32_t* d_page_indptr = nullptr;
  const int32_t* d_page_indices = nullptr;
  const int32_t* d_seq_lens = nullptr;
  const int32_t* d_row_seq = nullptr;
  const int32_t* d_row_pos = nullptr;
  // PSAW band (optional; REQUIRES causal): per sequence, the drop fraction f in [0, 1) (0 = no
  // band for that sequence) and the sink count s >= 0. Null = no band anywhere.
  const double* d_band_fraction = nullptr;  // [batch]
  const int32_t* d_band_sink = nullptr;     // [batch], required with d_band_fraction
  // Tiled kernel only: round P to a single bf16 before P·V (the first variant: faster, less
  // exact; kept for tests and benchmarks) instead of the default P_hi + P_lo split.
  bool tiled_single_bf16_p = false;
};

// nullptr when supported and well-formed, otherwise a static message naming the field.
const char* PrefillAttentionCheck(const PrefillAttentionParams& p);

// ---- Tiled tensor-core variant (prefill_tiled.cuh): the same contract and semantics (incl. the
// PSAW band) for head_dim 64 or 128. P (the fp32 softmax numerators) enters P·V as two bf16
// terms P_hi + P_lo (~2^-17 relative, vs bf16's 2^-9 when tiled_single_bf16_p), so the only
// roundings beyond the simple kernel's are the order of the fp32 sums. Query rows go in tiles:
//   tiles [num_tiles][2] int32 (device): (first row, row count in [1, 64]); the rows of a tile
//   belong to one sequence and have non-decreasing positions (PrefillQueryTiles makes them).
// Keys are walked in 64-key tiles; a key tile that no row of the query tile needs (with the band:
// wholly inside [sink, lo(first row)), lo being non-decreasing in the position) is skipped, never
// loaded; partly needed tiles are loaded (keys no row needs are zero-filled instead of read) and
// masked per row. One 128-thread CTA per (query tile, query head).
const char* PrefillAttentionTiledCheck(const PrefillAttentionParams& p, int num_tiles,
                                       const int32_t* d_tiles);
// cudaErrorInvalidValue when PrefillAttentionTiledCheck fails, otherwise the launch error.
cudaError_t PrefillAttentionTiled(const PrefillAttentionParams& p, int num_tiles,
                                  const int32_t* d_tiles, cudaStream_t stream);
// Host: query tiles of `rows` rows (host arrays row_seq, row_pos): consecutive rows while the
// sequence is the same, the position does not decrease and the tile has < 64 rows.
std::vector<int32_t> PrefillQueryTiles(const int32_t* row_seq, const int32_t* row_pos, int rows);

// Enqueues the attention on `stream`: one 128-thread block per (row, query head).
// cudaErrorInvalidValue when PrefillAttentionCheck fails, otherwise the launch error.
cudaError_t PrefillAttention(const PrefillAttentionParams& p, cudaStream_t stream);

}  // namespace prehoc::kernels

#endif  // PREHOC_WORKER_KERNELS_PREFILL_ATTENTION_H_
