// Host side of the PrHS selection kernels: checks, workspace layout, the one switch from
// (dtype, head_dim) to template parameters, and the explicit instantiations (4 gate + 8 score
// variants: score also by group 1 / 2..8 inside LaunchScore; select and list are type-independent).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "worker/kernels/selection_prhs.cuh"
#include "worker/kernels/selection_prhs_h2o.cuh"
#include "worker/kernels/selection_prhs_hshare.cuh"

PREHOC_INSTANTIATE_PRHS_SELECT(__half, 64)
PREHOC_INSTANTIATE_PRHS_SELECT(__half, 128)
PREHOC_INSTANTIATE_PRHS_SELECT(__nv_bfloat16, 64)
PREHOC_INSTANTIATE_PRHS_SELECT(__nv_bfloat16, 128)
PREHOC_INSTANTIATE_PRHS_HEAVY(__half, 64)
PREHOC_INSTANTIATE_PRHS_HEAVY(__half, 128)
PREHOC_INSTANTIATE_PRHS_HEAVY(__nv_bfloat16, 64)
PREHOC_INSTANTIATE_PRHS_HEAVY(__nv_bfloat16, 128)
PREHOC_INSTANTIATE_PRHS_HSHARE(__half, 64)
PREHOC_INSTANTIATE_PRHS_HSHARE(__half, 128)
PREHOC_INSTANTIATE_PRHS_HSHARE(__nv_bfloat16, 64)
PREHOC_INSTANTIATE_PRHS_HSHARE(__nv_bfloat16, 128)

namespace prehoc::kernels {
namespace {

using prhs::Args;

// Calls f.template operator()<T, D>() for the runtime (dtype, head_dim).
// REQUIRES: PrhsSelectCheck(p) == nullptr.
template <typename F>
cudaError_t Dispatch(const PrhsSelectParams& p, F&& f) {
  auto by_dim = [&]<typename T>() -> cudaError_t {
    return p.head_dim == 64 ? f.template operator()<T, 64>() : f.template operator()<T, 128>();
  };
  return p.dtype == AttnDType::kFloat16 ? by_dim.template operator()<__half>()
                                        : by_dim.template operator()<__nv_bfloat16>();
}

int Rows(const PrhsSelectParams& p) { return p.batch * p.num_kv_heads; }
int Group(const PrhsSelectParams& p) { return p.num_q_heads / p.num_kv_heads; }
int64_t RowStride(const PrhsSelectParams& p) {
  return (static_cast<int64_t>(std::max(p.max_seq_len, 1)) + prhs::kRowAlign - 1) /
         prhs::kRowAlign * prhs::kRowAlign;
}
size_t Align256(size_t x) { return (x + 255) / 256 * 256; }

struct Layout {
  size_t logits = 0, probs = 0, flags = 0, lse = 0, total = 0;
};
Layout LayoutFor(const PrhsSelectParams& p) {
  const size_t rows = static_cast<size_t>(Rows(p)), g = static_cast<size_t>(Group(p));
  const size_t L = static_cast<size_t>(RowStride(p));
  Layout l;
  l.logits = 0;
  l.probs = l.logits + Align256(rows * g * L * sizeof(float));
  l.flags = l.probs + Align256(rows * L * sizeof(float));
  l.lse = l.flags + Align256(rows * L);
  l.total = l.lse + Align256(rows * g * sizeof(float));
  return l;
}

Args MakeArgs(const PrhsSelectParams& p) {
  Args a{};
  a.batch = p.batch;
  a.hq = p.num_q_heads;
  a.hkv = p.num_kv_heads;
  a.group = Group(p);
  a.rows = Rows(p);
  a.sink = p.sink;
  a.local = p.local;
  a.max_reuse = p.max_reuse;
  a.dilate_r = p.dilate_r;
  a.anchor_stride = p.anchor_stride;
  a.tau = p.tau;
  a.scale = p.scale > 0.f ? p.scale : 1.0f / std::sqrt(static_cast<float>(p.head_dim));
  a.m_fraction = p.dilate_m_fraction;
  a.L = RowStride(p);
  a.index_capacity = p.index_capacity;
  a.q = p.d_q;
  a.k_pool = p.d_k_pool;
  a.page_indptr = p.d_page_indptr;
  a.page_indices = p.d_page_indices;
  a.seq_lens = p.d_seq_lens;
  a.topk = p.d_topk;
  a.cand_lo = p.d_cand_lo;
  a.topk_per_head = p.topk_per_head ? 1 : 0;
  a.mode = p.d_mode;
  a.sink_b = p.d_sink;
  a.local_b = p.d_local;
  a.page_bounds = p.d_page_bounds;
  a.bounds_from = p.d_bounds_from;
  a.state_slot = p.d_state_slot;
  a.anchor_q = p.d_anchor_q;
  a.reuse = p.d_reuse;
  a.valid = p.d_valid;
  a.anchor_set = p.d_anchor_set;
  a.anchor_count = p.d_anchor_count;
  a.h2o_pos = p.d_h2o_pos;
  a.h2o_acc = p.d_h2o_acc;
  a.h2o_count = p.d_h2o_count;
  a.h2o_stride = p.h2o_stride;
  a.hs_channels = p.d_hs_channels;
  a.hs_source = p.d_hs_source;
  a.hs_r = p.hs_r;
  a.hs_interval = std::max(p.hs_interval, 1);
  a.aset_base = p.d_anchor_set_base;
  a.acount_base = p.d_anchor_count_base;
  a.layer_rows = p.layer_rows;
  a.refresh = p.d_refresh;
  a.cos = p.d_cos;
  a.delta = p.d_delta;
  a.index_indptr = p.d_index_indptr;
  a.index_indices = p.d_index_indices;
  const Layout l = LayoutFor(p);
  char* ws = static_cast<char*>(p.d_workspace);
  a.logits = reinterpret_cast<float*>(ws + l.logits);
  a.probs = reinterpret_cast<float*>(ws + l.probs);
  a.flags = reinterpret_cast<uint8_t*>(ws + l.flags);
  a.lse = reinterpret_cast<float*>(ws + l.lse);
  return a;
}

// Checks the workspace as well as the parameters.
bool Ready(const PrhsSelectParams& p) {
  if (PrhsSelectCheck(p) != nullptr) return false;
  if (p.batch == 0) return true;
  const size_t need = LayoutFor(p).total;
  return p.d_workspace != nullptr && p.workspace_bytes >= need &&
         reinterpret_cast<uintptr_t>(p.d_workspace) % 256 == 0;
}

std::atomic<int> g_score_ctas[8];  // index: dtype * 4 + (head_dim == 128) * 2 + (group > 1)

cudaError_t ScoreGrid(const PrhsSelectParams& p, int64_t items, int* grid) {
  int num_sms = p.num_sms;
  if (num_sms <= 0) {
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return err;
  }
  const int slot = static_cast<int>(p.dtype) * 4 + (p.head_dim == 128 ? 2 : 0) + (Group(p) > 1 ? 1 : 0);
  int ctas = g_score_ctas[slot].load(std::memory_order_relaxed);
  if (ctas <= 0) {
    cudaError_t err = Dispatch(p, [&]<typename T, int D>() {
      return prhs::ScoreCtasPerSm<T, D>(Group(p), &ctas);
    });
    if (err != cudaSuccess) return err;
    ctas = std::max(ctas, 1);
    g_score_ctas[slot].store(ctas, std::memory_order_relaxed);
  }
  *grid = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(items, static_cast<int64_t>(num_sms) * ctas)));
  return cudaSuccess;
}

}  // namespace

const char* PrhsSelectCheck(const PrhsSelectParams& p) {
  if (p.dtype != AttnDType::kFloat16 && p.dtype != AttnDType::kBFloat16) {
    return "dtype must be kFloat16 or kBFloat16";
  }
  if (p.head_dim != 64 && p.head_dim != 128) return "head_dim must be 64 or 128";
  if (p.page_size != prhs::kPageSize) return "page_size must be 16";
  if (p.batch < 0) return "batch must be >= 0";
  if (p.num_kv_heads < 1) return "num_kv_heads must be >= 1";
  if (p.num_q_heads < 1 || p.num_q_heads % p.num_kv_heads != 0) {
    return "num_q_heads must be a positive multiple of num_kv_heads";
  }
  if (Group(p) > prhs::kMaxGroup) return "num_q_heads / num_kv_heads must be <= 8";
  if (static_cast<int64_t>(p.batch) * p.num_kv_heads > prhs::kMaxRows) {
    return "batch * num_kv_heads must be <= 8192";
  }
  if (p.max_seq_len < 0) return "max_seq_len must be >= 0";
  if (p.sink < 0) return "sink must be >= 0";
  if (p.local < 0) return "local must be >= 0";
  if (p.max_reuse < 0) return "max_reuse must be >= 0";
  if (p.dilate_r < 0 || p.dilate_r > 64) return "dilate_r must be in [0, 64]";
  if (!(p.dilate_m_fraction >= 0.0 && p.dilate_m_fraction <= 1.0)) {
    return "dilate_m_fraction must be in [0, 1]";
  }
  if (!std::isfinite(p.tau)) return "tau must be finite";
  if (p.scale < 0.f || !std::isfinite(p.scale)) return "scale must be finite and >= 0";
  if (p.anchor_stride < 1) return "anchor_stride must be >= 1";
  if (p.index_capacity < 0) return "index_capacity must be >= 0";
  if (p.batch == 0) return nullptr;
  if (p.d_q == nullptr) return "d_q is null";
  if (p.d_k_pool == nullptr) return "d_k_pool is null";
  if (p.d_page_indptr == nullptr) return "d_page_indptr is null";
  if (p.d_page_indices == nullptr) return "d_page_indices is null";
  if (p.d_seq_lens == nullptr) return "d_seq_lens is null";
  if (p.d_topk == nullptr) return "d_topk is null";
  if (p.d_anchor_q == nullptr) return "d_anchor_q is null";
  if (p.d_reuse == nullptr) return "d_reuse is null";
  if (p.d_valid == nullptr) return "d_valid is null";
  if (p.d_anchor_set == nullptr) return "d_anchor_set is null";
  if (p.d_anchor_count == nullptr) return "d_anchor_count is null";
  if (p.d_refresh == nullptr) return "d_refresh is null";
  if (p.d_index_indptr == nullptr) return "d_index_indptr is null";
  if (p.d_index_indices == nullptr) return "d_index_indices is null";
  if (p.d_h2o_pos != nullptr &&
      (p.d_h2o_acc == nullptr || p.d_h2o_count == nullptr || p.h2o_stride < 1)) {
    return "d_h2o_acc / d_h2o_count null or h2o_stride < 1 (d_h2o_pos is set)";
  }
  if (p.d_hs_channels != nullptr &&
      (p.hs_r < 1 || p.hs_r > p.head_dim || p.hs_interval < 1 || p.d_hs_source == nullptr ||
       p.d_anchor_set_base == nullptr || p.d_anchor_count_base == nullptr || p.layer_rows < 1)) {
    return "HShare: hs_r in [1, head_dim], hs_interval >= 1, d_hs_source / pool bases / "
           "layer_rows needed with d_hs_channels";
  }
  if (p.d_page_bounds != nullptr && p.d_bounds_from == nullptr) {
    return "d_bounds_from is null (d_page_bounds is set)";
  }
  return nullptr;
}

size_t PrhsSelectWorkspaceBytes(const PrhsSelectParams& p) {
  if (PrhsSelectCheck(p) != nullptr) return SIZE_MAX;
  return p.batch == 0 ? 0 : LayoutFor(p).total;
}

PrhsWorkspaceView PrhsSelectWorkspace(const PrhsSelectParams& p) {
  PrhsWorkspaceView v;
  if (PrhsSelectCheck(p) != nullptr || p.d_workspace == nullptr) return v;
  const Layout l = LayoutFor(p);
  const char* ws = static_cast<const char*>(p.d_workspace);
  v.logits = reinterpret_cast<const float*>(ws + l.logits);
  v.probs = reinterpret_cast<const float*>(ws + l.probs);
  v.lse = reinterpret_cast<const float*>(ws + l.lse);
  v.row_stride = RowStride(p);
  return v;
}

cudaError_t PrhsPageBounds(const PrhsSelectParams& p, cudaStream_t stream) {
  if (!Ready(p)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.d_page_bounds == nullptr) return cudaSuccess;
  const Args a = MakeArgs(p);
  return Dispatch(p, [&]<typename T, int D>() {
    return prhs::LaunchQuest<T, D>(a, /*bounds=*/true, 0, stream);
  });
}

cudaError_t PrhsGate(const PrhsSelectParams& p, cudaStream_t stream) {
  if (!Ready(p)) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  const Args a = MakeArgs(p);
  return Dispatch(p, [&]<typename T, int D>() { return prhs::LaunchGate<T, D>(a, stream); });
}

cudaError_t PrhsRefreshScores(const PrhsSelectParams& p, cudaStream_t stream) {
  if (!Ready(p)) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  const Args a = MakeArgs(p);
  const int max_chunks =
      std::max(1, (p.max_seq_len + prhs::kScoreChunk - 1) / prhs::kScoreChunk);
  int grid = 1;
  cudaError_t err = ScoreGrid(p, static_cast<int64_t>(a.rows) * max_chunks, &grid);
  if (err != cudaSuccess) return err;
  err = Dispatch(p, [&]<typename T, int D>() {
    return prhs::LaunchScore<T, D>(a, grid, max_chunks, stream);
  });
  if (err == cudaSuccess && p.d_hs_channels != nullptr) {  // HShare's approximate scores
    err = Dispatch(p, [&]<typename T, int D>() {
      return prhs::LaunchHShare<T, D>(a, /*stage=*/1, p.max_seq_len, stream);
    });
  }
  if (err != cudaSuccess || p.d_page_bounds == nullptr) return err;
  const int max_pages = std::max(1, (p.max_seq_len + prhs::kPageSize - 1) / prhs::kPageSize);
  return Dispatch(p, [&]<typename T, int D>() {
    return prhs::LaunchQuest<T, D>(a, /*bounds=*/false, max_pages, stream);
  });
}

cudaError_t PrhsRefreshSelect(const PrhsSelectParams& p, cudaStream_t stream) {
  if (!Ready(p)) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  const Args a = MakeArgs(p);
  prhs::SelectKernel<prhs::kSelectThreads><<<a.rows, prhs::kSelectThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t PrhsBuildIndexLists(const PrhsSelectParams& p, cudaStream_t stream) {
  if (!Ready(p)) return cudaErrorInvalidValue;
  if (p.batch == 0) {
    return p.d_index_indptr == nullptr ? cudaSuccess
                                       : cudaMemsetAsync(p.d_index_indptr, 0, sizeof(int32_t), stream);
  }
  const Args a = MakeArgs(p);
  prhs::ListKernel<prhs::kListThreads><<<a.rows, prhs::kListThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t PrhsHeavySelect(const PrhsSelectParams& p, cudaStream_t stream) {
  if (!Ready(p)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.d_h2o_pos == nullptr) return cudaSuccess;
  const Args a = MakeArgs(p);
  return Dispatch(p, [&]<typename T, int D>() {
    return prhs::LaunchHeavy<T, D>(a, /*observe=*/false, stream);
  });
}

cudaError_t PrhsHeavyObserve(const PrhsSelectParams& p, cudaStream_t stream) {
  if (!Ready(p)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.d_h2o_pos == nullptr) return cudaSuccess;
  const Args a = MakeArgs(p);
  return Dispatch(p, [&]<typename T, int D>() {
    return prhs::LaunchHeavy<T, D>(a, /*observe=*/true, stream);
  });
}

cudaError_t PrhsHShareCalibrate(const PrhsSelectParams& p, cudaStream_t stream) {
  if (!Ready(p) || p.d_hs_channels == nullptr) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  const Args a = MakeArgs(p);
  return Dispatch(p, [&]<typename T, int D>() {
    return prhs::LaunchHShare<T, D>(a, /*stage=*/0, p.max_seq_len, stream);
  });
}

cudaError_t PrhsHShareCopy(const PrhsSelectParams& p, cudaStream_t stream) {
  if (!Ready(p)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.d_hs_channels == nullptr) return cudaSuccess;
  const Args a = MakeArgs(p);
  prhs::ShareCopyKernel<<<a.rows, prhs::kListThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t PrhsSelectStep(const PrhsSelectParams& p, cudaStream_t stream) {
  cudaError_t err = PrhsPageBounds(p, stream);
  if (err != cudaSuccess) return err;
  err = PrhsGate(p, stream);
  if (err != cudaSuccess) return err;
  err = PrhsRefreshScores(p, stream);
  if (err != cudaSuccess) return err;
  err = PrhsRefreshSelect(p, stream);
  if (err != cudaSuccess) return err;
  err = PrhsHeavySelect(p, stream);
  if (err != cudaSuccess) return err;
  err = PrhsHShareCopy(p, stream);
  if (err != cudaSuccess) return err;
  return PrhsBuildIndexLists(p, stream);
}

}  // namespace prehoc::kernels
