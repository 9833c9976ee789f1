// Host side of paged decode attention: argument checks, split-KV planning, and the one switch that
// turns (dtype, head_dim, selection) into a template instantiation. The instantiations live in
// paged_decode_f16.cu and paged_decode_bf16.cu.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "worker/kernels/paged_decode.cuh"

#define PREHOC_EXTERN_PAGED_DECODE_D_S(T, D, S)                                                  \
  extern template cudaError_t prehoc::kernels::decode::CtasPerSm<T, D, S>(int*, bool);          \
  extern template cudaError_t prehoc::kernels::decode::Launch<T, D, S>(                         \
      const prehoc::kernels::PagedDecodeParams&, const prehoc::kernels::PagedDecodePlan&, float, \
      cudaStream_t);
#define PREHOC_EXTERN_PAGED_DECODE(T)                                                \
  PREHOC_EXTERN_PAGED_DECODE_D_S(T, 64, prehoc::kernels::KvSelection::kDense)       \
  PREHOC_EXTERN_PAGED_DECODE_D_S(T, 64, prehoc::kernels::KvSelection::kToken)       \
  PREHOC_EXTERN_PAGED_DECODE_D_S(T, 64, prehoc::kernels::KvSelection::kPage)        \
  PREHOC_EXTERN_PAGED_DECODE_D_S(T, 64, prehoc::kernels::KvSelection::kTokenMask)   \
  PREHOC_EXTERN_PAGED_DECODE_D_S(T, 128, prehoc::kernels::KvSelection::kDense)      \
  PREHOC_EXTERN_PAGED_DECODE_D_S(T, 128, prehoc::kernels::KvSelection::kToken)      \
  PREHOC_EXTERN_PAGED_DECODE_D_S(T, 128, prehoc::kernels::KvSelection::kPage)       \
  PREHOC_EXTERN_PAGED_DECODE_D_S(T, 128, prehoc::kernels::KvSelection::kTokenMask)
PREHOC_EXTERN_PAGED_DECODE(__half)
PREHOC_EXTERN_PAGED_DECODE(__nv_bfloat16)

namespace prehoc::kernels {
namespace {

using decode::kTile;

// Calls f.template operator()<T, D, S>() for the runtime (dtype, head_dim, selection).
// REQUIRES: PagedDecodeCheck(p) == nullptr.
template <typename F>
cudaError_t Dispatch(const PagedDecodeParams& p, F&& f) {
  auto by_sel = [&]<typename T, int D>() -> cudaError_t {
    switch (p.selection) {
      case KvSelection::kDense: return f.template operator()<T, D, KvSelection::kDense>();
      case KvSelection::kToken: return f.template operator()<T, D, KvSelection::kToken>();
      case KvSelection::kPage: return f.template operator()<T, D, KvSelection::kPage>();
      case KvSelection::kTokenMask:
        return f.template operator()<T, D, KvSelection::kTokenMask>();
    }
    return cudaErrorInvalidValue;
  };
  auto by_dim = [&]<typename T>() -> cudaError_t {
    return p.head_dim == 64 ? by_sel.template operator()<T, 64>()
                            : by_sel.template operator()<T, 128>();
  };
  return p.dtype == AttnDType::kFloat16 ? by_dim.template operator()<__half>()
                                        : by_dim.template operator()<__nv_bfloat16>();
}

// Occupancy per variant, cached (index: dtype * 8 + (head_dim == 128) * 4 + selection; kTokenMask
// long splits: 16 + dtype * 2 + (head_dim == 128)).
std::atomic<int> g_ctas_per_sm[20];

cudaError_t CachedCtasPerSm(const PagedDecodeParams& p, bool long_mask, int* ctas) {
  const int slot = long_mask ? 16 + static_cast<int>(p.dtype) * 2 + (p.head_dim == 128 ? 1 : 0)
                             : static_cast<int>(p.dtype) * 8 + (p.head_dim == 128 ? 4 : 0) +
                                   static_cast<int>(p.selection);
  int cached = g_ctas_per_sm[slot].load(std::memory_order_relaxed);
  if (cached > 0) {
    *ctas = cached;
    return cudaSuccess;
  }
  cudaError_t err = Dispatch(p, [&]<typename T, int D, KvSelection S>() {
    return decode::CtasPerSm<T, D, S>(&cached, long_mask);
  });
  if (err != cudaSuccess) return err;
  cached = std::max(cached, 1);
  g_ctas_per_sm[slot].store(cached, std::memory_order_relaxed);
  *ctas = cached;
  return cudaSuccess;
}

constexpr int kMinSplitTokens = 128;

}  // namespace

const char* PagedDecodeCheck(const PagedDecodeParams& p) {
  if (p.dtype != AttnDType::kFloat16 && p.dtype != AttnDType::kBFloat16) {
    return "dtype must be kFloat16 or kBFloat16";
  }
  if (p.selection != KvSelection::kDense && p.selection != KvSelection::kToken &&
      p.selection != KvSelection::kPage && p.selection != KvSelection::kTokenMask) {
    return "selection must be kDense, kToken, kPage or kTokenMask";
  }
  if (p.selection == KvSelection::kTokenMask && (p.mask_stride < 16 || p.mask_stride % 16 != 0)) {
    return "mask_stride must be a positive multiple of 16 (kTokenMask)";
  }
  if (p.head_dim != 64 && p.head_dim != 128) return "head_dim must be 64 or 128";
  if (p.mask_split_positions != 0 && p.mask_split_positions != kMaskSplitPositions &&
      p.mask_split_positions != MaskLongSplitPositions(p.head_dim)) {
    return "mask_split_positions must be 0, kMaskSplitPositions or "
           "MaskLongSplitPositions(head_dim)";
  }
  if (p.page_size != decode::kPageSize) return "page_size must be 16";
  if (p.batch < 0 || p.batch > 65535) return "batch must be in [0, 65535]";
  if (p.num_kv_heads < 1) return "num_kv_heads must be >= 1";
  if (p.num_q_heads < 1 || p.num_q_heads % p.num_kv_heads != 0) {
    return "num_q_heads must be a positive multiple of num_kv_heads";
  }
  const int group = p.num_q_heads / p.num_kv_heads;
  if (static_cast<int64_t>(p.num_kv_heads) * ((group + decode::kQRows - 1) / decode::kQRows) >
      65535) {
    return "num_kv_heads * ceil(group / 16) must be <= 65535";
  }
  if (p.max_kv_len < 0) return "max_kv_len must be >= 0";
  if (p.force_num_splits < 0) return "force_num_splits must be >= 0";
  if (p.scale < 0.f || !std::isfinite(p.scale)) return "scale must be finite and >= 0";
  if (p.batch == 0) return nullptr;
  if (p.d_q == nullptr) return "d_q is null";
  if (p.d_out == nullptr) return "d_out is null";
  if (p.d_k_pool == nullptr) return "d_k_pool is null";
  if (p.d_v_pool == nullptr) return "d_v_pool is null";
  if (p.d_page_indptr == nullptr) return "d_page_indptr is null";
  if (p.d_page_indices == nullptr) return "d_page_indices is null";
  if (p.d_seq_lens == nullptr) return "d_seq_lens is null";
  if (p.selection == KvSelection::kTokenMask) {
    if (p.d_mask == nullptr) return "d_mask is null (kTokenMask)";
    if (reinterpret_cast<uintptr_t>(p.d_mask) % 16 != 0) {
      return "d_mask must be 16-byte aligned (kTokenMask)";
    }
    if (static_cast<int64_t>(p.batch) * p.num_kv_heads * p.mask_stride >= (int64_t{1} << 40)) {
      return "mask too large (batch * num_kv_heads * mask_stride)";
    }
  } else if (p.selection != KvSelection::kDense) {
    if (p.d_index_indptr == nullptr) return "d_index_indptr is null (sparse selection)";
    if (p.d_index_indices == nullptr) return "d_index_indices is null (sparse selection)";
  }
  return nullptr;
}

cudaError_t PagedDecodePlanFor(const PagedDecodeParams& p, PagedDecodePlan* plan) {
  if (PagedDecodeCheck(p) != nullptr) return cudaErrorInvalidValue;
  *plan = PagedDecodePlan{};
  if (p.batch == 0) return cudaSuccess;
  int num_sms = p.num_sms;
  if (num_sms <= 0) {
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return err;
  }
  int ctas_per_sm = 1;
  cudaError_t err = CachedCtasPerSm(p, /*long_mask=*/false, &ctas_per_sm);
  if (err != cudaSuccess) return err;

  const int group = p.num_q_heads / p.num_kv_heads;
  plan->q_groups = (group + decode::kQRows - 1) / decode::kQRows;
  plan->ctas_per_sm = ctas_per_sm;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.num_kv_heads * plan->q_groups;
  const int max_len = std::max(p.max_kv_len, 1);

  int splits = 1;
  if (p.force_num_splits > 0) {
    splits = p.force_num_splits;
  } else {
    // Pick the split count whose CTAs fill the last wave best (CTAs of one shape take about the
    // same time); prefer fewer splits among near-equals. Each split keeps >= kMinSplitTokens.
    // The fill is scored for the split count actually launched: a request for s splits becomes
    // ceil(max_len / split_tokens) with split_tokens rounded up to the tile (e.g. 33 -> 32 at
    // 16K), so scoring s itself could prefer 4 waves of CTAs over one wave of equal fill.
    const int64_t slots = static_cast<int64_t>(num_sms) * ctas_per_sm;
    const int max_splits = std::max(1, std::min<int>((max_len + kMinSplitTokens - 1) /
                                                         kMinSplitTokens,
                                                     static_cast<int>(4 * ((slots + rows - 1) / rows))));
    double best = -1.0;
    std::vector<double> eff(max_splits + 1, 0.0);
    for (int s = 1; s <= max_splits; ++s) {
      const int tokens = ((max_len + s - 1) / s + kTile - 1) / kTile * kTile;
      const int64_t ctas = rows * ((max_len + tokens - 1) / tokens);
      const int64_t waves = (ctas + slots - 1) / slots;
      eff[s] = static_cast<double>(ctas) / static_cast<double>(waves * slots);
      best = std::max(best, eff[s]);
    }
    for (int s = 1; s <= max_splits; ++s) {
      if (eff[s] >= best - 0.03) {
        splits = s;
        break;
      }
    }
  }
  if (p.selection == KvSelection::kTokenMask) {
    // Splits cut the mask's positions evenly (tile multiples), each at most max_positions: short
    // splits unless they would need more than one wave of CTAs and long splits need fewer.
    const int long_positions = MaskLongSplitPositions(p.head_dim);
    const int short_splits =
        std::max(splits, (p.mask_stride + kMaskSplitPositions - 1) / kMaskSplitPositions);
    const int long_min = (p.mask_stride + long_positions - 1) / long_positions;
    int long_splits = std::max(splits, long_min);
    bool use_long = p.mask_split_positions == long_positions;
    if (p.mask_split_positions == 0) {
      use_long = rows * short_splits > static_cast<int64_t>(num_sms) * ctas_per_sm &&
                 long_splits < short_splits;
      if (p.force_num_splits == 0 && rows * 10 >= static_cast<int64_t>(num_sms) * 9 &&
          max_len >= 16 * kTile && long_min < short_splits) {
        // One CTA per row already covers ~every SM and each streams >= 16 tiles: the fewest long
        // splits (one: no reduction pass). On an H100 (docs/benchmarks.md) one split beat two at
        // B16/Hkv8/16K with 1024-2048 kept tokens per row, lost with 512 (half the copies in
        // flight per SM), and two long splits lost to four short ones at B8/Hkv8/16K.
        use_long = true;
        long_splits = long_min;
      }
    }
    if (use_long) {
      int long_ctas_per_sm = 1;
      err = CachedCtasPerSm(p, /*long_mask=*/true, &long_ctas_per_sm);
      if (err != cudaSuccess) return err;
      plan->ctas_per_sm = long_ctas_per_sm;
    }
    plan->mask_long_splits = use_long;
    const int max_positions = use_long ? long_positions : kMaskSplitPositions;
    splits = use_long ? long_splits : short_splits;
    int split_positions = (p.mask_stride + splits - 1) / splits;
    split_positions = std::min((split_positions + kTile - 1) / kTile * kTile, max_positions);
    splits = (p.mask_stride + split_positions - 1) / split_positions;
    plan->split_positions = split_positions;
    plan->split_tokens = (max_len + splits - 1) / splits;  // expected kept tokens per split
  } else {
    int split_tokens = (max_len + splits - 1) / splits;
    split_tokens = (split_tokens + kTile - 1) / kTile * kTile;
    splits = (max_len + split_tokens - 1) / split_tokens;
    plan->split_tokens = split_tokens;
  }
  plan->num_splits = splits;
  plan->ctas = static_cast<int>(rows * splits);
  if (splits > 1) {
    plan->workspace_bytes =
        static_cast<size_t>(p.batch) * p.num_q_heads * splits * (p.head_dim + 1) * sizeof(float);
    // Fused reduction: one ticket per (sequence, kv head, query group), 16-byte padded.
    if (p.fuse_reduction) {
      plan->workspace_bytes += decode::FusedTicketBytes(p.batch, p.num_kv_heads, plan->q_groups);
    }
  }
  return cudaSuccess;
}

size_t PagedDecodeWorkspaceBytes(const PagedDecodeParams& p) {
  PagedDecodePlan plan;
  if (PagedDecodePlanFor(p, &plan) != cudaSuccess) return SIZE_MAX;
  return plan.workspace_bytes;
}

cudaError_t PagedDecodeAttention(const PagedDecodeParams& p, cudaStream_t stream) {
  PagedDecodePlan plan;
  cudaError_t err = PagedDecodePlanFor(p, &plan);
  if (err != cudaSuccess) return err;
  if (p.batch == 0) return cudaSuccess;
  if (plan.workspace_bytes > 0 &&
      (p.d_workspace == nullptr || p.workspace_bytes < plan.workspace_bytes ||
       reinterpret_cast<uintptr_t>(p.d_workspace) % 16 != 0)) {
    return cudaErrorInvalidValue;
  }
  const float scale = p.scale > 0.f ? p.scale : 1.0f / std::sqrt(static_cast<float>(p.head_dim));
  return Dispatch(p, [&]<typename T, int D, KvSelection S>() {
    return decode::Launch<T, D, S>(p, plan, scale, stream);
  });
}

}  // namespace prehoc::kernels
