// Paged decode attention (one new query token per sequence) over a paged KV cache, dense or
// sparse, on CUDA. Host-side API; the kernels are in paged_decode.cuh. Includes only CUDA and std
// headers so that .cu files may include it.
//
// ---------------------------------------------------------------------------------------------
// Tensors (all device pointers, row-major, T = fp16 or bf16 — the same T for q, k, v and out):
//   q        [batch][num_q_heads][head_dim]                          T
//   out      [batch][num_q_heads][head_dim]                          T   (written)
//   lse      [batch][num_q_heads]                                    f32 (written; optional)
//   k_pool   [num_pages][num_kv_heads][page_size][head_dim]          T   (one layer's K)
//   v_pool   [num_pages][num_kv_heads][page_size][head_dim]          T   (one layer's V)
//   page_indptr  [batch + 1]   int32; sequence b owns physical pages
//   page_indices [page_indptr[batch]]  page_indices[page_indptr[b] .. page_indptr[b+1])
//                              in logical order: token t of b lives in physical page
//                              page_indices[page_indptr[b] + t / page_size], slot t % page_size.
//   seq_lens [batch]           int32 tokens in each sequence (its KV, including the new token).
// Sparse only (per (sequence, kv head) CSR over logical positions, row r = b * num_kv_heads + h):
//   index_indptr  [batch * num_kv_heads + 1]  int32, non-decreasing, index_indptr[0] = 0
//   index_indices [index_indptr[last]]        int32
//     kToken: each entry is a logical token position t in [0, seq_lens[b]).
//     kPage:  each entry is a logical page number p in [0, ceil(seq_lens[b] / page_size));
//             the page's tokens p*page_size .. min((p+1)*page_size, seq_len) - 1 are attended.
//   Entries must be distinct within a row (a duplicate is counted twice); entries out of range are
//   ignored (never dereferenced). Order is free; ascending order gives the best locality.
// Keep-mask only (kTokenMask: list construction fused into the attention launch):
//   mask [batch * num_kv_heads][mask_stride]  uint8, row r = b * num_kv_heads + h; a non-zero byte
//        at position t keeps token t of sequence b for kv head h. Positions >= seq_lens[b] are
//        ignored (may hold anything). Tokens at t >= mask_stride are not attended.
//   Each split CTA compacts its own slice of the row into shared memory (no global lists); the
//   result equals kToken with the ascending list of the mask's kept positions.
//
// GQA: query head hq uses kv head hq / (num_q_heads / num_kv_heads) (Hugging Face repeat_kv).
// Result per (b, hq) over the attended set S (all tokens for dense):
//   s_j = scale * q[b,hq] · K[j],   out[b,hq] = Σ_{j∈S} softmax(s)_j V[j],
//   lse[b,hq] = log Σ_{j∈S} exp(s_j)   (natural log; the selection layer's dropped mass is
//   δ = 1 - exp(lse_sparse - lse_dense)).
// An empty S gives out = 0 and lse = -inf.
// Numerics: fp32 accumulation of q·k and of p·v; p is rounded to T before the p·v product (as in
// FlashAttention). Dense, kPage with every page and kToken with every token in ascending order
// give bitwise-identical results when planned with the same max_kv_len (same tiles, same order).
// ---------------------------------------------------------------------------------------------
#ifndef PREHOC_WORKER_KERNELS_PAGED_DECODE_H_
#define PREHOC_WORKER_KERNELS_PAGED_DECODE_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace prehoc::kernels {

enum class AttnDType : int { kFloat16 = 0, kBFloat16 = 1 };

enum class KvSelection : int {
  kDense = 0,  // every token of the sequence (page table only)
  kToken = 1,  // CSR of logical token positions per (sequence, kv head)
  kPage = 2,   // CSR of logical page numbers per (sequence, kv head)
  kTokenMask = 3,  // uint8 keep-mask of logical token positions per (sequence, kv head)
};

struct PagedDecodeParams {
  AttnDType dtype = AttnDType::kFloat16;
  KvSelection selection = KvSelection::kDense;
  int batch = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;  // REQUIRES: divides num_q_heads
  int head_dim = 128;    // supported: 64, 128
  int page_size = 16;    // supported: 16

  const void* d_q = nullptr;
  void* d_out = nullptr;
  float* d_lse = nullptr;  // may be null
  const void* d_k_pool = nullptr;
  const void* d_v_pool = nullptr;
  const int32_t* d_page_indptr = nullptr;
  const int32_t* d_page_indices = nullptr;
  const int32_t* d_seq_lens = nullptr;

  const int32_t* d_index_indptr = nullptr;   // sparse only
  const int32_t* d_index_indices = nullptr;  // sparse only
  const uint8_t* d_mask = nullptr;           // kTokenMask only; 16-byte aligned
  int mask_stride = 0;                       // kTokenMask only; multiple of 16, >= 16

  // Upper bound on the number of attended tokens of any (sequence, kv head): the longest sequence
  // for kDense, the longest list for kToken, page_size × the longest list for kPage (the longest
  // sequence also bounds kToken and kPage, and gives the same split plan as dense). Sizes the
  // split-KV grid only; a row that exceeds it is still computed correctly (its last split does the
  // rest), just with less parallelism. kTokenMask: the expected number of kept tokens per row
  // (sizes the grid only; splits cut the mask's positions evenly, at most kMaskSplitPositions
  // positions each, or MaskLongSplitPositions(head_dim) with long splits, so the grid has at least
  // ceil(mask_stride / that) splits).
  int max_kv_len = 0;
  float scale = 0.0f;  // softmax scale; 0 means 1/sqrt(head_dim)

  // Multiprocessors to plan for; 0 = query the current device.
  int num_sms = 0;
  // Split-KV partition override for tests and benchmarks: 0 = heuristic; otherwise the number of
  // KV splits per (sequence, kv head) (1 = no reduction pass). kTokenMask raises it to its minimum.
  int force_num_splits = 0;
  // Split reduction fused into the attention launch: the last CTA of each (sequence, kv head,
  // query group) to finish (an atomic ticket in the workspace) merges the splits, so no reduction
  // kernel is launched. REQUIRES: the workspace was zero-filled once after allocation
  // (cudaMemset); every launch leaves its tickets (the workspace's first
  // 4 * batch * num_kv_heads * ceil(group / 16) bytes, 16-padded) at zero again, so later launches
  // need no reset as long as every launch on that workspace uses fuse_reduction with the same
  // batch, num_kv_heads and group (otherwise zero it again). Off: the reduction runs as a second
  // kernel (programmatic dependent launch), no zeroing needed. On an H100 the second kernel was
  // as fast at 32 kv heads and 2-10 us faster at 8 (docs/benchmarks.md, "Variants tried").
  bool fuse_reduction = false;
  // kTokenMask split length: 0 = the planner's choice (long splits where short ones would need
  // more than one wave of CTAs and long ones need fewer splits); kMaskSplitPositions = short
  // splits; MaskLongSplitPositions(head_dim) = long splits. Other values are rejected.
  int mask_split_positions = 0;

  // Diagnostics only (benchmarks): when set, thread 0 of attention CTA i (i = (blockIdx.z *
  // gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x, PagedDecodePlan::ctas of them) writes 8
  // values at d_timeline[8 * i]: SM id, %globaltimer (ns) at its start and end, and clock64 cycles
  // from its start to: its first copies issued, its first tile arrived (0 if it has none), its
  // main loop done, its end; then its tile count. Empty splits write nothing.
  unsigned long long* d_timeline = nullptr;

  void* d_workspace = nullptr;  // REQUIRES: >= PagedDecodeWorkspaceBytes(*this) bytes, 16-aligned
  size_t workspace_bytes = 0;
};

// How a launch is partitioned (for logs and benchmarks).
struct PagedDecodePlan {
  int num_splits = 1;       // KV splits per (sequence, kv head, 16-query-head group)
  int split_tokens = 0;     // attended tokens per split (multiple of the tile)
  int q_groups = 1;         // ceil(group size / 16)
  int ctas = 0;             // attention CTAs launched
  int ctas_per_sm = 0;      // occupancy of the attention kernel
  int split_positions = 0;  // kTokenMask: mask positions per split (multiple of the tile)
  bool mask_long_splits = false;  // kTokenMask: long splits (kept positions in rounds)
  size_t workspace_bytes = 0;
};

// kTokenMask: the most mask positions one short split CTA covers (its whole slice fits in its
// shared-memory list of kMaskListCapacity positions).
constexpr int kMaskSplitPositions = 4096;
// kTokenMask long splits: the most mask positions one split CTA covers, 16384 at head_dim 128 and
// 8192 at 64 (as many CTAs per SM as short splits). The slice and its page-table slice are
// loaded at once; its kept positions are consumed in rounds of kMaskListCapacity (the list is
// rebuilt between rounds; a full mask in one split still runs dense's tiles in dense's order).
constexpr int MaskLongSplitPositions(int head_dim) { return head_dim == 64 ? 8192 : 16384; }
constexpr int kMaskListCapacity = 4096;

// Returns nullptr when the configuration is supported and well-formed, otherwise a static message
// naming the offending field (e.g. "head_dim must be 64 or 128"). Pointers are checked for null
// only; their contents are not read.
const char* PagedDecodeCheck(const PagedDecodeParams& p);

// The partition the launcher will use. Errors: cudaErrorInvalidValue when PagedDecodeCheck fails
// (message via PagedDecodeCheck), or a device query error.
cudaError_t PagedDecodePlanFor(const PagedDecodeParams& p, PagedDecodePlan* plan);

// Workspace bytes the launch needs (0 when no reduction pass is needed); SIZE_MAX on error.
size_t PagedDecodeWorkspaceBytes(const PagedDecodeParams& p);

// Enqueues the attention (and, with several splits and fuse_reduction off, the reduction) on
// `stream`. The attention kernel is launched with programmatic dependent launch: its CTAs may be
// scheduled while the previous kernel in the stream drains, and wait (griddepcontrol.wait) for it
// to finish before reading anything. Returns
// cudaErrorInvalidValue for an unsupported/ill-formed config or too small a workspace, otherwise
// the launch error. Asynchronous: device-side faults surface at the next synchronisation.
// Thread-compatible: concurrent calls need distinct workspaces.
cudaError_t PagedDecodeAttention(const PagedDecodeParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Index-list construction: compacts a keep-mask into the CSR the sparse kernel reads.
//   d_mask    [num_rows][mask_stride] uint8 (non-zero = keep item i of row r), row r = b*Hkv + h;
//             items at i >= the row's length must be 0.
//   d_indptr  [num_rows + 1] int32 (written), d_indices [<= num_rows * mask_stride] int32 (written,
//             ascending within a row).
//   d_counts  [num_rows] int32 scratch.
// REQUIRES: mask_stride % 16 == 0, d_mask 16-byte aligned, num_rows * mask_stride < 2^31.
// Two kernels (count, then compact with a per-row prefix); the compact kernel is launched with
// programmatic dependent launch and loads its first mask vectors before waiting for the counts.
// Returns the launch error.
cudaError_t BuildIndexListsFromMask(const uint8_t* d_mask, int num_rows, int mask_stride,
                                    int32_t* d_counts, int32_t* d_indptr, int32_t* d_indices,
                                    cudaStream_t stream);

}  // namespace prehoc::kernels

#endif  // PREHOC_WORKER_KERNELS_PAGED_DECODE_H_
