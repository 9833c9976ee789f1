// HShare rows of the selection kernels (PrhsRowMode kApprox): the channel calibration, the
// approximate scores of a refresh (ranked by SelectKernel like Quest's page scores), and the
// copy of a source unit's heavy set. Semantics: selection_prhs.h (kApprox,
// PrhsHShareCalibrate, PrhsHShareCopy); CPU reference: HShareSelector
// (worker/selection/selector.cc). Included by selection_prhs.cu only.
#ifndef PREHOC_WORKER_KERNELS_SELECTION_PRHS_HSHARE_CUH_
#define PREHOC_WORKER_KERNELS_SELECTION_PRHS_HSHARE_CUH_

#include "worker/kernels/selection_prhs.cuh"

namespace prehoc::kernels::prhs {

constexpr int kApproxThreads = 256;

// Calibration: one CTA of D threads per row marked kExact (thread c sums |K_jc| over j < t),
// then the hs_r best channels (sum desc, channel asc) in rank order.
template <typename T, int D>
__global__ void __launch_bounds__(D) CalibrateKernel(Args a) {
  const int row = blockIdx.x;
  if (RowMode(a, row) != kPrhsModeExact) return;
  __shared__ float sums[D];
  const int c = threadIdx.x, b = row / a.hkv, h = row % a.hkv;
  const int t = a.seq_lens[b];
  const int32_t* pages = a.page_indices + a.page_indptr[b];
  const T* base = static_cast<const T*>(a.k_pool) + static_cast<size_t>(h) * kPageSize * D + c;
  const size_t page_stride = static_cast<size_t>(a.hkv) * kPageSize * D;
  float s = 0.f;
  for (int j = 0; j < t; ++j) {
    const int page = __ldg(pages + j / kPageSize);
    s += fabsf(ToFloat<T>(base[page * page_stride + static_cast<size_t>(j % kPageSize) * D]));
  }
  sums[c] = s;
  __syncthreads();
  int rank = 0;
  for (int o = 0; o < D; ++o) rank += sums[o] > s || (sums[o] == s && o < c);
  if (rank < a.hs_r) {
    a.hs_channels[static_cast<size_t>(StateRow(a, row)) * a.hs_r + rank] = c;
  }
}

// Approximate scores of the refreshing kApprox rows: a_j = Σ_g Σ_i q_g[ch_i] · K_j[ch_i] into
// the row's probabilities (a thread per key; blockIdx.y = row).
template <typename T, int D>
__global__ void __launch_bounds__(kApproxThreads) ApproxScoreKernel(Args a) {
  const int row = blockIdx.y;
  if (RowMode(a, row) != kPrhsModeApprox || a.refresh[row] == 0) return;
  __shared__ float qs[kMaxGroup][D];
  __shared__ int ch[D];
  const int b = row / a.hkv, h = row % a.hkv;
  const int t = a.seq_lens[b];
  const int r = a.hs_r;
  const int* chans = a.hs_channels + static_cast<size_t>(StateRow(a, row)) * r;
  const T* q = static_cast<const T*>(a.q) +
               (static_cast<size_t>(b) * a.hq + static_cast<size_t>(h) * a.group) * D;
  for (int i = threadIdx.x; i < a.group * D; i += kApproxThreads) {
    qs[i / D][i % D] = ToFloat<T>(q[i]);
  }
  for (int i = threadIdx.x; i < r; i += kApproxThreads) ch[i] = chans[i];
  __syncthreads();
  const int j = blockIdx.x * kApproxThreads + threadIdx.x;
  if (j >= t) return;
  const int page = __ldg(a.page_indices + a.page_indptr[b] + j / kPageSize);
  const T* k = static_cast<const T*>(a.k_pool) +
               (static_cast<size_t>(page) * a.hkv + h) * kPageSize * D +
               static_cast<size_t>(j % kPageSize) * D;
  float kc[D];
  for (int i = 0; i < r; ++i) kc[i] = ToFloat<T>(k[ch[i]]);
  float acc = 0.f;
  for (int g = 0; g < a.group; ++g) {
    for (int i = 0; i < r; ++i) acc += qs[g][ch[i]] * kc[i];
  }
  a.probs[static_cast<size_t>(row) * a.L + j] = acc;
}

// Sharing: kApprox rows with a source copy its S_anchor (one CTA per row).
__global__ void __launch_bounds__(kListThreads) ShareCopyKernel(Args a) {
  const int row = blockIdx.x;
  if (RowMode(a, row) != kPrhsModeApprox) return;
  const int srow = StateRow(a, row);
  const int src = a.hs_source[srow];
  if (src < 0) return;
  // The same slot (sequence) in the source's layer, the source's kv head.
  const int64_t from = static_cast<int64_t>(src / a.hkv) * a.layer_rows + (srow - srow % a.hkv) +
                       src % a.hkv;
  const int n = min(a.acount_base[from], a.anchor_stride);
  const int32_t* in = a.aset_base + from * a.anchor_stride;
  int32_t* out = a.anchor_set + static_cast<size_t>(srow) * a.anchor_stride;
  for (int i = threadIdx.x; i < n; i += kListThreads) out[i] = in[i];
  if (threadIdx.x == 0) a.anchor_count[srow] = n;
}

template <typename T, int D>
cudaError_t LaunchHShare(const Args& a, int stage, int max_seq_len, cudaStream_t stream) {
  if (stage == 0) {
    CalibrateKernel<T, D><<<a.rows, D, 0, stream>>>(a);
  } else {
    const dim3 grid((std::max(max_seq_len, 1) + kApproxThreads - 1) / kApproxThreads, a.rows);
    ApproxScoreKernel<T, D><<<grid, kApproxThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

#define PREHOC_INSTANTIATE_PRHS_HSHARE(T, D)                                                     \
  template cudaError_t prehoc::kernels::prhs::LaunchHShare<T, D>(                               \
      const prehoc::kernels::prhs::Args&, int, int, cudaStream_t);

}  // namespace prehoc::kernels::prhs

#endif  // PREHOC_WORKER_KERNELS_SELECTION_PRHS_HSHARE_CUH_
