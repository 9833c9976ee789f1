// Host side of prefill_attention.h: checks, the one switch from head_dim to the elements per lane,
// and the explicit instantiations (kEpl = 1, 2, 4, 8); the tiled variant's launcher (head_dim 64
// and 128) and its query tiles.
#include <cmath>
#include <cstdint>

#include <vector>

#include "worker/kernels/prefill_attention.cuh"
#include "worker/kernels/prefill_tiled.cuh"

namespace prehoc::kernels {
namespace prefill {
template __global__ void PrefillAttentionKernel<1>(PrefillAttentionParams, float);
template __global__ void PrefillAttentionKernel<2>(PrefillAttentionParams, float);
template __global__ void PrefillAttentionKernel<4>(PrefillAttentionParams, float);
template __global__ void PrefillAttentionKernel<8>(PrefillAttentionParams, float);
}  // namespace prefill
namespace prefill_tiled {
template __global__ void PrefillTiledKernel<64, true>(PrefillAttentionParams, const int32_t*, float);
template __global__ void PrefillTiledKernel<128, true>(PrefillAttentionParams, const int32_t*,
                                                       float);
template __global__ void PrefillTiledKernel<64, false>(PrefillAttentionParams, const int32_t*,
                                                       float);
template __global__ void PrefillTiledKernel<128, false>(PrefillAttentionParams, const int32_t*,
                                                        float);
}  // namespace prefill_tiled

const char* PrefillAttentionCheck(const PrefillAttentionParams& p) {
  if (p.rows < 0) return "rows must be >= 0";
  if (p.num_q_heads <= 0 || p.num_q_heads > 65535) return "num_q_heads must be in [1, 65535]";
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0) {
    return "num_kv_heads must be positive and divide num_q_heads";
  }
  if (p.head_dim <= 0 || p.head_dim % 2 != 0 || p.head_dim > prefill::kMaxHeadDim) {
    return "head_dim must be even and in [2, 256]";
  }
  if (p.page_size <= 0) return "page_size must be positive";
  if (p.rows > 0 && (p.d_q == nullptr || p.d_out == nullptr || p.d_k_pool == nullptr ||
                     p.d_v_pool == nullptr || p.d_page_indptr == nullptr ||
                     p.d_page_indices == nullptr || p.d_seq_lens == nullptr ||
                     p.d_row_seq == nullptr || p.d_row_pos == nullptr)) {
    return "a required device pointer is null";
  }
  if (p.d_band_fraction != nullptr && !p.causal) return "the PSAW band needs causal attention";
  if (p.d_band_fraction != nullptr && p.rows > 0 && p.d_band_sink == nullptr) {
    return "d_band_sink is required with d_band_fraction";
  }
  return nullptr;
}

cudaError_t PrefillAttention(const PrefillAttentionParams& p, cudaStream_t stream) {
  if (PrefillAttentionCheck(p) != nullptr) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const float scale = p.scale != 0.0f ? p.scale : 1.0f / std::sqrt(static_cast<float>(p.head_dim));
  const dim3 grid(p.rows, p.num_q_heads);
  const int epl = (p.head_dim + 31) / 32;
  if (epl <= 1) {
    prefill::PrefillAttentionKernel<1><<<grid, prefill::kThreads, 0, stream>>>(p, scale);
  } else if (epl <= 2) {
    prefill::PrefillAttentionKernel<2><<<grid, prefill::kThreads, 0, stream>>>(p, scale);
  } else if (epl <= 4) {
    prefill::PrefillAttentionKernel<4><<<grid, prefill::kThreads, 0, stream>>>(p, scale);
  } else {
    prefill::PrefillAttentionKernel<8><<<grid, prefill::kThreads, 0, stream>>>(p, scale);
  }
  return cudaGetLastError();
}

const char* PrefillAttentionTiledCheck(const PrefillAttentionParams& p, int num_tiles,
                                       const int32_t* d_tiles) {
  if (const char* why = PrefillAttentionCheck(p); why != nullptr) return why;
  if (p.head_dim != 64 && p.head_dim != 128) return "the tiled kernel needs head_dim 64 or 128";
  if (num_tiles < 0) return "num_tiles must be >= 0";
  if (num_tiles > 0 && d_tiles == nullptr) return "d_tiles is required";
  if (num_tiles > 0 && p.rows == 0) return "tiles without rows";
  return nullptr;
}

cudaError_t PrefillAttentionTiled(const PrefillAttentionParams& p, int num_tiles,
                                  const int32_t* d_tiles, cudaStream_t stream) {
  if (PrefillAttentionTiledCheck(p, num_tiles, d_tiles) != nullptr) return cudaErrorInvalidValue;
  if (num_tiles == 0) return cudaSuccess;
  const float scale = p.scale != 0.0f ? p.scale : 1.0f / std::sqrt(static_cast<float>(p.head_dim));
  const float scale_log2 = scale * 1.4426950408889634f;
  const dim3 grid(num_tiles, p.num_q_heads);
  auto launch = [&](auto kernel) {
    kernel<<<grid, prefill_tiled::kThreads, 0, stream>>>(p, d_tiles, scale_log2);
  };
  if (p.head_dim == 64) {
    launch(p.tiled_single_bf16_p ? prefill_tiled::PrefillTiledKernel<64, false>
                                 : prefill_tiled::PrefillTiledKernel<64, true>);
  } else {
    launch(p.tiled_single_bf16_p ? prefill_tiled::PrefillTiledKernel<128, false>
                                 : prefill_tiled::PrefillTiledKernel<128, true>);
  }
  return cudaGetLastError();
}

std::vector<int32_t> PrefillQueryTiles(const int32_t* row_seq, const int32_t* row_pos, int rows) {
  std::vector<int32_t> tiles;
  for (int r = 0; r < rows; ++r) {
    const bool extend = !tiles.empty() && tiles.back() < prefill_tiled::kTileQ &&
                        row_seq[r] == row_seq[r - 1] && row_pos[r] >= row_pos[r - 1];
    if (extend) {
      ++tiles.back();
    } else {
      tiles.push_back(r);
      tiles.push_back(1);
    }
  }
  return tiles;
}

}  // namespace prehoc::kernels
