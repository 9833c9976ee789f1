// GPU tests of the PrHS selection kernels (selection_prhs.h) against the CPU reference
// (selection_reference.h, PrhsSelector's semantics), over several decode steps per case so the
// CIS state machine (gate → share or refresh, reuse limit, δ of the previous set, moving local
// window) is exercised. Skipped when no CUDA device is present.
//
// What is compared, per step and row:
//   gate      refresh flag exactly (cosines within 1e-4 of τ would be ambiguous; the inputs keep
//             them near 1 or near 0), cos within 1e-5, reuse / valid / anchor bits exactly;
//   scoring   lse (float64 reference) within 1e-4 + 1e-6·|lse|, probabilities within
//             1e-4·p + 1e-7 (fp32 accumulation of exact 16-bit products);
//   top-k     S_anchor exactly equal to the reference computed on the GPU's own fp32
//             probabilities (ties broken by lower position, as TopKIndices does; one case has
//             many exactly equal scores);
//   δ         within 2e-5 of the float64 reference on the previous set;
//   lists     CSR rows exactly equal to MergeIndexSet(sink, S_anchor, local, t) (all tokens for
//             a dense row).
// Cases also mix the per-sequence modes (kExact: OracleSelector's top-k every step, no dilation;
// kWindow: StreamingSelector's sink + window; kPages: QuestSelector's page bounds and top pages),
// per-sequence sink / local, and per-kv-head k (the δ-controller's budgets), against the same
// reference with each row's own values. kPages: the page bounds exactly (bit patterns of the
// min / max over the tokens below t, maintained incrementally from bounds_from), page scores
// (float64 reference) within 1e-3 + 1e-4·|s|, the chosen pages exactly equal to the top-k of the
// GPU's own scores (one case has all pages tied), the list exactly their tokens.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "worker/kernels/attention_reference.h"
#include "worker/kernels/selection_prhs.h"
#include "worker/kernels/selection_reference.h"
#include "worker/testing/gpu_test_util.h"

namespace prehoc::kernels {
namespace {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void Resize(size_t bytes) {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = std::max<size_t>(bytes, 256);
    if (cudaMalloc(&ptr_, bytes_) != cudaSuccess) ptr_ = nullptr;
  }
  template <typename T>
  void Upload(const std::vector<T>& v) {
    if (bytes_ < v.size() * sizeof(T) || ptr_ == nullptr) Resize(v.size() * sizeof(T));
    if (!v.empty()) cudaMemcpy(ptr_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  template <typename T>
  std::vector<T> Download(size_t n, size_t offset_elems = 0) const {
    std::vector<T> v(n);
    if (n > 0) {
      cudaMemcpy(v.data(), static_cast<const T*>(ptr_) + offset_elems, n * sizeof(T),
                 cudaMemcpyDeviceToHost);
    }
    return v;
  }
  void Poison() {
    if (ptr_ != nullptr) cudaMemset(ptr_, 0xff, bytes_);
  }
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// The fields every multi-step test sets alike: the shape, the paged K pool, the per-row k, the
// refresh flags and the CSR index lists (`capacity` entries). d_q / d_seq_lens point at
// placeholders (the checks only need non-null pointers; each step sets the real ones).
PrhsSelectParams CommonParams(AttnDType dtype, int batch, int hq, int hkv, int head_dim,
                              int max_seq_len, const DeviceBuffer& k_pool,
                              const DeviceBuffer& page_indptr, const DeviceBuffer& page_indices,
                              const DeviceBuffer& topk, const DeviceBuffer& refresh,
                              const DeviceBuffer& index_indptr, const DeviceBuffer& index_indices,
                              int64_t capacity) {
  PrhsSelectParams p;
  p.dtype = dtype;
  p.batch = batch;
  p.num_q_heads = hq;
  p.num_kv_heads = hkv;
  p.head_dim = head_dim;
  p.max_seq_len = max_seq_len;
  p.d_k_pool = k_pool.get();
  p.d_page_indptr = page_indptr.get<int32_t>();
  p.d_page_indices = page_indices.get<int32_t>();
  p.d_topk = topk.get<int32_t>();
  p.d_refresh = refresh.get<int32_t>();
  p.d_index_indptr = index_indptr.get<int32_t>();
  p.d_index_indices = index_indices.get<int32_t>();
  p.index_capacity = capacity;
  p.d_q = k_pool.get();
  p.d_seq_lens = page_indptr.get<int32_t>();
  return p;
}

// One test scenario: sequences (initial lengths; each step appends one token), per-sequence k
// (-1 = dense) and PSAW lower bounds, plan constants, and how queries evolve.
struct Case {
  std::string name;
  std::vector<int> lens;
  std::vector<int> topk;
  std::vector<int> cand_lo;  // empty = null
  int steps = 4;
  int max_reuse = 64;
  int dup_period = 0;    // > 0: K_j = K_{j mod period} (many exactly equal scores)
  int zero_q_seq = -1;   // this sequence's queries are all zero (every score ties)
  std::vector<int> mode;     // per sequence PrhsRowMode; empty = null (all kCis)
  std::vector<int> sink_b;   // per sequence; empty = null (the scalar sink)
  std::vector<int> local_b;  // per sequence; empty = null (the scalar local)
  bool per_head_k = false;   // k of kv head h = topk[b] >> (1 - h) (h = 0: half), topk_per_head
};

// k of row (b, h) in a case (-1 = dense).
int CaseTopK(const Case& cs, int b, int h) {
  if (cs.topk[b] < 0 || !cs.per_head_k) return cs.topk[b];
  return h == 0 ? cs.topk[b] / 2 : cs.topk[b];
}

const std::vector<Case>& Cases() {
  static const auto* cases = new std::vector<Case>{
      {"batch1_odd", {1001}, {97}, {}, 4},
      {"mixed", {300, 17, 4099, 45, 1000}, {37, -1, 500, 5, 120}, {}, 4},
      {"k_ge_candidates", {200, 333}, {1000, 293}, {}, 3},
      {"empty_candidates", {40, 100}, {5, 5}, {0, 200}, 3},
      {"ties", {500, 777}, {50, 101}, {}, 3, 64, 5, 1},
      {"psaw_reuse1", {2000}, {150}, {600}, 5, 1},
      {"long", {20000}, {2500}, {}, 2},
      {"per_head_k", {1001, 3000, 60, 700}, {97, 400, -1, 1}, {}, 4, 64, 0, -1, {}, {}, {}, true},
      // oracle (kExact, sink = local = 0), streaming (kWindow), a dense oracle row, a kExact row
      // with its own sink / local, and a CIS row, in one launch.
      {"modes", {900, 2500, 300, 50, 1200, 400}, {60, 300, 0, -1, 100, 30}, {}, 4, 64, 0, -1,
       {1, 1, 2, 1, 1, 0}, {0, 0, 8, 0, 4, 8}, {0, 0, 200, 0, 16, 32}},
      {"oracle_ties", {500, 777}, {50, 101}, {}, 3, 64, 5, 1, {1, 1}, {0, 0}, {0, 0}},
      // Quest rows (k in pages; lengths at and around page boundaries) with a CIS row.
      {"quest", {1000, 37, 4096, 300, 64, 500}, {8, 1, 40, -1, 3, 20}, {}, 4, 64, 0, -1,
       {3, 3, 3, 3, 3, 0}},
      {"quest_ties", {500, 777}, {5, 12}, {}, 3, 64, 5, -1, {3, 3}},
  };
  return *cases;
}

using Param = std::tuple<AttnDType, int /*head_dim*/, int /*group*/, int /*case*/>;

class PrhsSelectSweep : public ::testing::TestWithParam<Param> {};

TEST_P(PrhsSelectSweep, StepsMatchReference) {
  SKIP_WITHOUT_DEVICE();
  const auto [dtype, D, G, case_idx] = GetParam();
  const Case& cs = Cases()[case_idx];
  const int hkv = 2, hq = hkv * G, B = static_cast<int>(cs.lens.size()), rows = B * hkv;
  const int sink = 8, local = 32, r_dil = 1;
  const double m_frac = 1.0 / 3.0;
  const float tau = 0.8f;
  std::mt19937 rng(1000u + 7u * case_idx + 131u * G + D + static_cast<unsigned>(dtype));
  std::uniform_real_distribution<double> unif(-1.0, 1.0);
  std::normal_distribution<double> noise(0.0, 0.02);

  // Paged K pool with room for every step; pages placed randomly; unused slots NaN.
  std::vector<int> max_lens(B);
  int max_len = 0;
  for (int b = 0; b < B; ++b) {
    max_lens[b] = cs.lens[b] + cs.steps;
    max_len = std::max(max_len, max_lens[b]);
  }
  std::vector<int32_t> page_indptr{0};
  for (int b = 0; b < B; ++b) page_indptr.push_back(page_indptr.back() + (max_lens[b] + 15) / 16);
  const int num_pages = page_indptr.back() + 3;
  std::vector<int32_t> perm(num_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> page_indices(perm.begin(), perm.begin() + page_indptr.back());
  const uint16_t nan_bits = dtype == AttnDType::kFloat16 ? 0x7e00 : 0x7fc0;
  std::vector<uint16_t> k_pool(static_cast<size_t>(num_pages) * hkv * 16 * D, nan_bits);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < hkv; ++h) {
      std::vector<uint16_t> base(static_cast<size_t>(std::max(cs.dup_period, 1)) * D);
      for (auto& x : base) x = DoubleToHalfBits(unif(rng), dtype);
      for (int j = 0; j < max_lens[b]; ++j) {
        const int page = page_indices[page_indptr[b] + j / 16];
        uint16_t* dst = k_pool.data() + ((static_cast<size_t>(page) * hkv + h) * 16 + j % 16) * D;
        for (int d = 0; d < D; ++d) {
          dst[d] = cs.dup_period > 0 ? base[static_cast<size_t>(j % cs.dup_period) * D + d]
                                     : DoubleToHalfBits(unif(rng), dtype);
        }
      }
    }
  }

  const int max_k = *std::max_element(cs.topk.begin(), cs.topk.end());
  std::vector<int32_t> topk_rows(rows);
  for (int r = 0; r < rows; ++r) topk_rows[r] = CaseTopK(cs, r / hkv, r % hkv);
  auto row_sink = [&](int b) { return cs.sink_b.empty() ? sink : cs.sink_b[b]; };
  auto row_local = [&](int b) { return cs.local_b.empty() ? local : cs.local_b[b]; };
  auto row_mode = [&](int b) { return cs.mode.empty() ? int{kPrhsModeCis} : cs.mode[b]; };
  const int anchor_stride = std::max(1, max_k + 2 * r_dil * static_cast<int>(m_frac * max_k) + 1);
  const int64_t capacity = static_cast<int64_t>(rows) * max_len;

  DeviceBuffer d_q, d_k, d_indptr, d_pages, d_lens, d_topk, d_cand, d_anchor, d_reuse, d_valid,
      d_aset, d_acount, d_refresh, d_cos, d_delta, d_csr_indptr, d_csr, d_ws, d_mode, d_sink,
      d_local, d_bounds, d_from;
  const bool quest = std::count(cs.mode.begin(), cs.mode.end(), int{kPrhsModePages}) > 0;
  const size_t bounds_elems = static_cast<size_t>(num_pages) * hkv * 2 * D;
  if (quest) {
    d_bounds.Resize(bounds_elems * 2);
    d_bounds.Poison();  // pages are written before they are read
  }
  d_k.Upload(k_pool);
  d_indptr.Upload(page_indptr);
  d_pages.Upload(page_indices);
  if (cs.per_head_k) {
    d_topk.Upload(topk_rows);
  } else {
    d_topk.Upload(std::vector<int32_t>(cs.topk.begin(), cs.topk.end()));
  }
  if (!cs.mode.empty()) d_mode.Upload(std::vector<int32_t>(cs.mode.begin(), cs.mode.end()));
  if (!cs.sink_b.empty()) d_sink.Upload(std::vector<int32_t>(cs.sink_b.begin(), cs.sink_b.end()));
  if (!cs.local_b.empty()) {
    d_local.Upload(std::vector<int32_t>(cs.local_b.begin(), cs.local_b.end()));
  }
  if (!cs.cand_lo.empty()) d_cand.Upload(std::vector<int32_t>(cs.cand_lo.begin(), cs.cand_lo.end()));
  d_anchor.Resize(static_cast<size_t>(rows) * G * D * 2);
  d_anchor.Poison();  // never read before a refresh writes it
  d_reuse.Upload(std::vector<int32_t>(rows, 0));
  d_valid.Upload(std::vector<int32_t>(rows, 0));
  d_aset.Resize(static_cast<size_t>(rows) * anchor_stride * 4);
  d_aset.Poison();
  d_acount.Upload(std::vector<int32_t>(rows, 0));
  d_refresh.Resize(rows * 4);
  d_cos.Resize(rows * 4);
  d_delta.Resize(rows * 4);
  d_csr_indptr.Resize((rows + 1) * 4);
  d_csr.Resize(capacity * 4);

  PrhsSelectParams p = CommonParams(dtype, B, hq, hkv, D, max_len, d_k, d_indptr, d_pages, d_topk,
                                    d_refresh, d_csr_indptr, d_csr, capacity);
  p.sink = sink;
  p.local = local;
  p.tau = tau;
  p.max_reuse = cs.max_reuse;
  p.dilate_r = r_dil;
  p.dilate_m_fraction = m_frac;
  p.d_cand_lo = cs.cand_lo.empty() ? nullptr : d_cand.get<int32_t>();
  p.topk_per_head = cs.per_head_k;
  p.d_mode = cs.mode.empty() ? nullptr : d_mode.get<int32_t>();
  p.d_sink = cs.sink_b.empty() ? nullptr : d_sink.get<int32_t>();
  p.d_local = cs.local_b.empty() ? nullptr : d_local.get<int32_t>();
  p.d_page_bounds = quest ? d_bounds.get() : nullptr;
  p.d_bounds_from = quest ? d_indptr.get<int32_t>() : nullptr;  // set per step
  p.d_anchor_q = d_anchor.get();
  p.d_reuse = d_reuse.get<int32_t>();
  p.d_valid = d_valid.get<int32_t>();
  p.d_anchor_set = d_aset.get<int32_t>();
  p.d_anchor_count = d_acount.get<int32_t>();
  p.anchor_stride = anchor_stride;
  p.d_cos = d_cos.get<float>();
  p.d_delta = d_delta.get<float>();
  ASSERT_EQ(PrhsSelectCheck(p), nullptr) << PrhsSelectCheck(p);
  const size_t ws = PrhsSelectWorkspaceBytes(p);
  ASSERT_NE(ws, SIZE_MAX);
  d_ws.Resize(ws);
  p.d_workspace = d_ws.get();
  p.workspace_bytes = ws;
  const PrhsWorkspaceView view = PrhsSelectWorkspace(p);
  ASSERT_NE(view.probs, nullptr);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));

  // Reference CIS state.
  struct RowState {
    bool valid = false;
    int reuse = 0;
    std::vector<uint16_t> anchor;
    std::vector<int32_t> set;
  };
  std::vector<RowState> ref(rows);
  std::vector<uint16_t> q(static_cast<size_t>(B) * hq * D);
  int refreshes = 0, shares = 0, deltas = 0, ties_rows = 0;

  for (int step = 0; step < cs.steps; ++step) {
    SCOPED_TRACE(cs.name + " step " + std::to_string(step));
    std::vector<int32_t> lens(B);
    for (int b = 0; b < B; ++b) lens[b] = cs.lens[b] + step;
    // Queries: per row, near its anchor (share) or fresh (refresh), alternating by a coin.
    for (int b = 0; b < B; ++b) {
      for (int h = 0; h < hkv; ++h) {
        const int r = b * hkv + h;
        uint16_t* qg = q.data() + (static_cast<size_t>(b) * hq + h * G) * D;
        const bool near = ref[r].valid && (rng() % 3 != 0);
        for (int i = 0; i < G * D; ++i) {
          double v = near ? HalfBitsToDouble(ref[r].anchor[i], dtype) + noise(rng) : 2.0 * unif(rng);
          if (b == cs.zero_q_seq) v = 0.0;
          qg[i] = DoubleToHalfBits(v, dtype);
        }
      }
    }
    d_q.Upload(q);
    d_lens.Upload(lens);
    p.d_q = d_q.get();
    p.d_seq_lens = d_lens.get<int32_t>();
    if (quest) {  // the page of the first position the previous step did not fold
      std::vector<int32_t> from(B, INT32_MAX);
      for (int b = 0; b < B; ++b) {
        if (row_mode(b) == kPrhsModePages) from[b] = step == 0 ? 0 : (lens[b] - 1) / 16;
      }
      d_from.Upload(from);
      p.d_bounds_from = d_from.get<int32_t>();
    }
    d_refresh.Poison();
    d_cos.Poison();
    d_delta.Poison();
    d_csr_indptr.Poison();
    d_csr.Poison();
    d_ws.Poison();
    CUDA_OK(PrhsSelectStep(p, nullptr));
    CUDA_OK(cudaDeviceSynchronize());

    const auto g_refresh = d_refresh.Download<int32_t>(rows);
    const auto g_cos = d_cos.Download<float>(rows);
    const auto g_delta = d_delta.Download<float>(rows);
    const auto g_reuse = d_reuse.Download<int32_t>(rows);
    const auto g_valid = d_valid.Download<int32_t>(rows);
    const auto g_anchor = d_anchor.Download<uint16_t>(static_cast<size_t>(rows) * G * D);
    const auto g_acount = d_acount.Download<int32_t>(rows);
    const auto g_aset = d_aset.Download<int32_t>(static_cast<size_t>(rows) * anchor_stride);
    const auto g_indptr = d_csr_indptr.Download<int32_t>(rows + 1);
    const auto g_csr = d_csr.Download<int32_t>(capacity);
    const auto g_lse = Download(view.lse, static_cast<size_t>(rows) * G);
    const auto g_bounds = quest ? d_bounds.Download<uint16_t>(bounds_elems) : std::vector<uint16_t>();

    ASSERT_EQ(g_indptr[0], 0);
    for (int b = 0; b < B; ++b) {
      const int t = lens[b];
      for (int h = 0; h < hkv; ++h) {
        const int r = b * hkv + h;
        SCOPED_TRACE("row " + std::to_string(r) + " (t " + std::to_string(t) + ")");
        RowState& st = ref[r];
        const uint16_t* qg = q.data() + (static_cast<size_t>(b) * hq + h * G) * D;
        std::vector<int32_t> want_list;
        const int mode = row_mode(b), rsink = row_sink(b), rlocal = row_local(b);
        if (topk_rows[r] < 0) {
          EXPECT_EQ(g_refresh[r], 0);
          EXPECT_TRUE(std::isnan(g_cos[r]));
          want_list.resize(t);
          std::iota(want_list.begin(), want_list.end(), 0);
        } else if (mode == kPrhsModePages) {  // QuestSelector
          EXPECT_EQ(g_refresh[r], 1);
          EXPECT_TRUE(std::isnan(g_cos[r]));
          EXPECT_TRUE(std::isnan(g_delta[r]));
          EXPECT_EQ(g_valid[r], 1);
          EXPECT_EQ(g_reuse[r], 0);
          ++refreshes;
          const int np = (t + 15) / 16, k = topk_rows[r];
          // Bounds of every page, exactly: min / max over the page's tokens below t.
          std::vector<double> mn(static_cast<size_t>(np) * D), mx(static_cast<size_t>(np) * D);
          int bad_bounds = 0;
          for (int pg = 0; pg < np; ++pg) {
            const int phys = page_indices[page_indptr[b] + pg];
            for (int d = 0; d < D; ++d) {
              uint16_t lo_bits = 0, hi_bits = 0;
              double lo_v = INFINITY, hi_v = -INFINITY;
              for (int j = pg * 16; j < std::min(t, pg * 16 + 16); ++j) {
                const uint16_t kb =
                    k_pool[((static_cast<size_t>(phys) * hkv + h) * 16 + j % 16) * D + d];
                const double v = HalfBitsToDouble(kb, dtype);
                if (v < lo_v) lo_v = v, lo_bits = kb;
                if (v > hi_v) hi_v = v, hi_bits = kb;
              }
              mn[static_cast<size_t>(pg) * D + d] = lo_v;
              mx[static_cast<size_t>(pg) * D + d] = hi_v;
              const size_t at = (static_cast<size_t>(phys) * hkv + h) * 2 * D + d;
              if ((g_bounds[at] != lo_bits || g_bounds[at + D] != hi_bits) && ++bad_bounds <= 3) {
                ADD_FAILURE() << "bounds of page " << pg << " channel " << d;
              }
            }
          }
          EXPECT_EQ(bad_bounds, 0);
          std::vector<int32_t> want_pages;
          if (k >= np) {
            want_pages.resize(np);
            std::iota(want_pages.begin(), want_pages.end(), 0);
          } else if (k > 0) {
            const std::vector<float> gs = Download(view.probs + r * view.row_stride, np);
            EXPECT_TRUE(std::isinf(gs[np - 1]) && gs[np - 1] > 0) << "last page";
            for (int pg = 0; pg + 1 < np; ++pg) {
              double want = 0;
              for (int g = 0; g < G; ++g) {
                for (int d = 0; d < D; ++d) {
                  const double qv = HalfBitsToDouble(qg[g * D + d], dtype);
                  want += std::max(qv * mn[static_cast<size_t>(pg) * D + d],
                                   qv * mx[static_cast<size_t>(pg) * D + d]);
                }
              }
              EXPECT_NEAR(gs[pg], want, 1e-3 + 1e-4 * std::fabs(want)) << "score of page " << pg;
            }
            want_pages = RefTopK(gs, 0, np, k);
            std::sort(want_pages.begin(), want_pages.end());
            int eq = 0;
            const float thr = gs[RefTopK(gs, 0, np, k).back()];
            for (int pg = 0; pg < np; ++pg) eq += gs[pg] == thr;
            ties_rows += eq > 1;
          }
          const std::vector<int32_t> got_pages(
              g_aset.begin() + static_cast<size_t>(r) * anchor_stride,
              g_aset.begin() + static_cast<size_t>(r) * anchor_stride + g_acount[r]);
          EXPECT_EQ(got_pages, want_pages) << "pages";
          for (int32_t pg : want_pages) {
            for (int j = pg * 16; j < std::min(t, pg * 16 + 16); ++j) want_list.push_back(j);
          }
        } else if (mode == kPrhsModeWindow) {  // StreamingSelector: no gate, no state
          EXPECT_EQ(g_refresh[r], 0);
          EXPECT_TRUE(std::isnan(g_cos[r]));
          EXPECT_EQ(g_valid[r], 0);
          want_list = RefMergeIndexSet(rsink, {}, rlocal, t);
        } else {
          const bool eval = mode == kPrhsModeCis && st.valid && st.reuse < cs.max_reuse;
          bool share = false;
          if (eval) {
            const double c = RefCosine(qg, st.anchor.data(), G * D, dtype);
            EXPECT_NEAR(g_cos[r], c, 1e-5);
            ASSERT_GT(std::fabs(c - tau), 1e-4) << "ambiguous test input";
            share = c > tau;
          } else {
            EXPECT_TRUE(std::isnan(g_cos[r]));
          }
          ASSERT_EQ(g_refresh[r], share ? 0 : (st.valid ? 2 : 1));
          if (share) {
            ++shares;
            ++st.reuse;
          } else {
            ++refreshes;
            const std::vector<double> logits = RefGroupLogits(
                qg, G, k_pool.data(), page_indices.data() + page_indptr[b], t, h, hkv, D, scale,
                dtype);
            std::vector<double> lse, probs;
            RefGroupProbs(logits, G, t, &lse, &probs);
            for (int g = 0; g < G; ++g) {
              EXPECT_NEAR(g_lse[static_cast<size_t>(r) * G + g], lse[g], 1e-4 + 1e-6 * std::fabs(lse[g]))
                  << "lse head " << g;
            }
            if (st.valid) {
              ++deltas;
              const std::vector<int32_t> prev = RefMergeIndexSet(rsink, st.set, rlocal, t);
              EXPECT_NEAR(g_delta[r], RefDroppedMass(probs, prev), 2e-5) << "delta";
            } else {
              EXPECT_TRUE(std::isnan(g_delta[r]));
            }
            const int lo = std::max(rsink, cs.cand_lo.empty() ? 0 : cs.cand_lo[b]);
            const int hi = t - rlocal, n = hi - lo, k = topk_rows[r];
            std::vector<int32_t> want_set;
            if (n > 0 && k > 0) {
              if (k >= n) {
                want_set.resize(n);
                std::iota(want_set.begin(), want_set.end(), lo);
              } else {
                const std::vector<float> gp = Download(view.probs + r * view.row_stride, hi);
                int bad = 0;
                for (int j = lo; j < hi; ++j) {
                  if (!(std::fabs(gp[j] - probs[j]) <= 1e-4 * probs[j] + 1e-7) && ++bad <= 3) {
                    ADD_FAILURE() << "p[" << j << "] = " << gp[j] << ", reference " << probs[j];
                  }
                }
                EXPECT_EQ(bad, 0) << "probabilities out of tolerance";
                // Equal probabilities at the top-k threshold: the tie rule decides.
                const std::vector<int32_t> top = RefTopK(gp, lo, hi, k);
                const float thr = gp[top.back()];
                int eq = 0;
                for (int j = lo; j < hi; ++j) eq += gp[j] == thr;
                ties_rows += eq > 1;
                // kExact (OracleSelector): the plain top-k, no dilation.
                want_set = mode == kPrhsModeExact ? RefCisSet(gp, lo, hi, k, 0.0, 0)
                                                  : RefCisSet(gp, lo, hi, k, m_frac, r_dil);
                if (mode == kPrhsModeExact) {
                  std::vector<int32_t> top = RefTopK(gp, lo, hi, k);
                  std::sort(top.begin(), top.end());
                  EXPECT_EQ(want_set, top);
                }
              }
            }
            const std::vector<int32_t> got_set(
                g_aset.begin() + static_cast<size_t>(r) * anchor_stride,
                g_aset.begin() + static_cast<size_t>(r) * anchor_stride + g_acount[r]);
            EXPECT_EQ(got_set, want_set) << "S_anchor";
            st.set = want_set;
            st.anchor.assign(qg, qg + G * D);
            st.reuse = 0;
            st.valid = true;
          }
          EXPECT_EQ(g_reuse[r], st.reuse);
          EXPECT_EQ(g_valid[r], 1);
          EXPECT_TRUE(std::equal(st.anchor.begin(), st.anchor.end(),
                                 g_anchor.begin() + static_cast<size_t>(r) * G * D))
              << "anchor_q";
          want_list = RefMergeIndexSet(rsink, st.set, rlocal, t);
        }
        std::vector<int32_t> got_list;
        for (int i = g_indptr[r]; i < g_indptr[r + 1]; ++i) {
          if (g_csr[i] >= 0) got_list.push_back(g_csr[i]);
        }
        EXPECT_EQ(got_list, want_list) << "CSR row";
      }
    }
  }
  // The scenario must exercise both paths (a share needs a valid anchor first).
  EXPECT_GT(refreshes, 0);
  if (cs.steps >= 3 && cs.zero_q_seq < 0 && cs.topk[0] >= 0 && row_mode(0) != kPrhsModePages) {
    EXPECT_GT(shares + deltas, 0);
  }
  if (cs.dup_period > 0) {
    EXPECT_GT(ties_rows, 0) << "the ties case produced no ties";
  }
}

std::string ParamName(const ::testing::TestParamInfo<Param>& info) {
  const auto [dtype, D, G, c] = info.param;
  return std::string(dtype == AttnDType::kFloat16 ? "f16" : "bf16") + "_d" + std::to_string(D) +
         "_g" + std::to_string(G) + "_" + Cases()[c].name;
}

INSTANTIATE_TEST_SUITE_P(All, PrhsSelectSweep,
                         ::testing::Combine(::testing::Values(AttnDType::kFloat16,
                                                              AttnDType::kBFloat16),
                                            ::testing::Values(64, 128), ::testing::Values(1, 4, 8),
                                            ::testing::Range(0, 12)),
                         ParamName);

// state_slot: the same steps with the CIS state kept at permuted slots of a larger pool (the
// other slots poisoned) give bitwise the same outputs as with the state at rows r.
TEST(PrhsSelectSlots, PermutedSlotsMatchRowState) {
  SKIP_WITHOUT_DEVICE();
  const int D = 128, G = 4, hkv = 2, hq = G * hkv, steps = 5, pool_slots = 7;
  const std::vector<int> lens0{300, 1000, 57};
  const std::vector<int32_t> topk{40, 100, -1}, slots{5, 0, 3};
  const int B = static_cast<int>(lens0.size()), rows = B * hkv, stride = 200;
  const int max_len = 1000 + steps;
  std::mt19937 rng(77);
  std::uniform_real_distribution<double> unif(-1.0, 1.0);
  const int pages_per_seq = (max_len + 15) / 16;
  std::vector<int32_t> page_indptr{0}, page_indices;
  for (int b = 0; b < B; ++b) page_indptr.push_back(page_indptr.back() + pages_per_seq);
  for (int i = 0; i < page_indptr.back(); ++i) page_indices.push_back(page_indptr.back() - 1 - i);
  std::vector<uint16_t> k_pool(static_cast<size_t>(page_indptr.back()) * hkv * 16 * D);
  for (auto& x : k_pool) x = DoubleToHalfBits(unif(rng), AttnDType::kBFloat16);
  DeviceBuffer d_k, d_indptr, d_pages, d_topk, d_slots, d_q, d_lens;
  d_k.Upload(k_pool);
  d_indptr.Upload(page_indptr);
  d_pages.Upload(page_indices);
  d_topk.Upload(topk);
  d_slots.Upload(slots);
  // Two runs: [0] state at rows r, [1] state at slots of a pool_slots-sequence pool.
  struct Run {
    DeviceBuffer anchor, reuse, valid, aset, acount, refresh, delta, indptr, csr, ws;
  } run[2];
  const int64_t capacity = static_cast<int64_t>(rows) * max_len;
  PrhsSelectParams p[2];
  for (int v = 0; v < 2; ++v) {
    const int state_rows = v == 0 ? rows : pool_slots * hkv;
    Run& r = run[v];
    r.anchor.Resize(static_cast<size_t>(state_rows) * G * D * 2);
    r.aset.Resize(static_cast<size_t>(state_rows) * stride * 4);
    r.anchor.Poison();
    r.aset.Poison();
    r.reuse.Upload(std::vector<int32_t>(state_rows, 0));
    r.valid.Upload(std::vector<int32_t>(state_rows, 0));
    r.acount.Upload(std::vector<int32_t>(state_rows, 0));
    r.refresh.Resize(rows * 4);
    r.delta.Resize(rows * 4);
    r.indptr.Resize((rows + 1) * 4);
    r.csr.Resize(capacity * 4);
    PrhsSelectParams& q = p[v];
    q = CommonParams(AttnDType::kBFloat16, B, hq, hkv, D, max_len, d_k, d_indptr, d_pages, d_topk,
                     r.refresh, r.indptr, r.csr, capacity);
    q.d_state_slot = v == 0 ? nullptr : d_slots.get<int32_t>();
    q.d_anchor_q = r.anchor.get();
    q.d_reuse = r.reuse.get<int32_t>();
    q.d_valid = r.valid.get<int32_t>();
    q.d_anchor_set = r.aset.get<int32_t>();
    q.d_anchor_count = r.acount.get<int32_t>();
    q.anchor_stride = stride;
    q.d_delta = r.delta.get<float>();
    ASSERT_EQ(PrhsSelectCheck(q), nullptr) << PrhsSelectCheck(q);
    r.ws.Resize(PrhsSelectWorkspaceBytes(q));
    q.d_workspace = r.ws.get();
    q.workspace_bytes = PrhsSelectWorkspaceBytes(q);
  }
  std::vector<uint16_t> q(static_cast<size_t>(B) * hq * D);
  int refreshed = 0, shared = 0;
  for (int step = 0; step < steps; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    std::vector<int32_t> lens(B);
    for (int b = 0; b < B; ++b) lens[b] = lens0[b] + step;
    // Odd steps keep the queries (shares), even steps draw new ones (refreshes).
    if (step % 2 == 0) {
      for (auto& x : q) x = DoubleToHalfBits(unif(rng), AttnDType::kBFloat16);
    }
    d_q.Upload(q);
    d_lens.Upload(lens);
    for (int v = 0; v < 2; ++v) {
      p[v].d_q = d_q.get();
      p[v].d_seq_lens = d_lens.get<int32_t>();
      CUDA_OK(PrhsSelectStep(p[v], nullptr));
    }
    CUDA_OK(cudaDeviceSynchronize());
    const auto f0 = run[0].refresh.Download<int32_t>(rows);
    EXPECT_EQ(f0, run[1].refresh.Download<int32_t>(rows));
    const auto d0 = run[0].delta.Download<uint32_t>(rows), d1 = run[1].delta.Download<uint32_t>(rows);
    EXPECT_EQ(d0, d1);  // bit patterns (NaN where not measured)
    const auto i0 = run[0].indptr.Download<int32_t>(rows + 1);
    ASSERT_EQ(i0, run[1].indptr.Download<int32_t>(rows + 1));
    EXPECT_EQ(run[0].csr.Download<int32_t>(i0[rows]), run[1].csr.Download<int32_t>(i0[rows]));
    for (int r = 0; r < rows; ++r) {
      if (topk[r / hkv] < 0) continue;
      (f0[r] != 0 ? refreshed : shared) += 1;
    }
  }
  EXPECT_GT(refreshed, 0);
  EXPECT_GT(shared, 0);
}

// H2O (kHeavy rows: PrhsHeavySelect + PrhsHeavyObserve) over several decode steps against
// H2OSelector's semantics, with the state at permuted slots. Per step and row:
//   candidates  the first step's scores (GroupProbabilities, float64 reference) within
//               1e-4·p + 1e-7, positions [0, t); later steps exactly the tracked list (bitwise
//               scores) followed by the new position with score 0;
//   select      kept set, S_anchor, the tracked list (positions and bitwise scores) and the CSR
//               row exactly equal to the reference computed on the GPU's own candidate scores
//               (top-k by score, ties lower position first, as TopKIndices; one case has many
//               exactly equal keys, so equal scores);
//   observe     every tracked score after the update within 2e-6 + 1e-5·|acc| of old + Σ_g
//               p_g / G with p the float64 softmax over the row's list.
using HeavyParam = std::tuple<AttnDType, int /*head_dim*/, int /*group*/, int /*dup_period*/>;
class PrhsHeavySweep : public ::testing::TestWithParam<HeavyParam> {};

TEST_P(PrhsHeavySweep, StepsMatchH2O) {
  SKIP_WITHOUT_DEVICE();
  const auto [dtype, D, G, dup] = GetParam();
  // Sequences: heavy budget k and recent window; seq 2 has B(t) >= t (nothing evicted at first),
  // seq 3 no recent window, seq 4 k = 0 (only the window).
  const std::vector<int> lens0{300, 1000, 40, 2050, 90};
  const std::vector<int32_t> heavy{37, 100, 60, 200, 0}, recent{32, 16, 32, 0, 20};
  const std::vector<int32_t> slots{2, 0, 4, 1, 3};
  const int hkv = 2, hq = hkv * G, B = static_cast<int>(lens0.size()), rows = B * hkv;
  const int steps = 6, h2o_stride = 256, anchor_stride = 256;
  std::mt19937 rng(4242u + 17u * G + D + 3u * dup + static_cast<unsigned>(dtype));
  std::uniform_real_distribution<double> unif(-1.0, 1.0);
  int max_len = 0;
  std::vector<int32_t> page_indptr{0};
  for (int b = 0; b < B; ++b) {
    max_len = std::max(max_len, lens0[b] + steps);
    page_indptr.push_back(page_indptr.back() + (lens0[b] + steps + 15) / 16);
  }
  const int num_pages = page_indptr.back();
  std::vector<int32_t> page_indices(num_pages);
  std::iota(page_indices.begin(), page_indices.end(), 0);
  std::shuffle(page_indices.begin(), page_indices.end(), rng);
  std::vector<uint16_t> k_pool(static_cast<size_t>(num_pages) * hkv * 16 * D);
  std::vector<uint16_t> base(static_cast<size_t>(std::max(dup, 1)) * D);
  for (auto& x : base) x = DoubleToHalfBits(unif(rng), dtype);
  auto key = [&](int b, int h, int j) {
    const int page = page_indices[page_indptr[b] + j / 16];
    return k_pool.data() + ((static_cast<size_t>(page) * hkv + h) * 16 + j % 16) * D;
  };
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < hkv; ++h) {
      for (int j = 0; j < lens0[b] + steps; ++j) {
        for (int d = 0; d < D; ++d) {
          key(b, h, j)[d] = dup > 0 ? base[static_cast<size_t>(j % dup) * D + d]
                                    : DoubleToHalfBits(unif(rng), dtype);
        }
      }
    }
  }
  const int pool_rows = B * hkv;  // slots 0..B-1
  DeviceBuffer d_q, d_k, d_indptr, d_pages, d_lens, d_topk, d_mode, d_sink, d_local, d_slot,
      d_anchor, d_reuse, d_valid, d_aset, d_acount, d_refresh, d_csr_indptr, d_csr, d_ws, d_pos,
      d_acc, d_cnt;
  d_k.Upload(k_pool);
  d_indptr.Upload(page_indptr);
  d_pages.Upload(page_indices);
  d_topk.Upload(heavy);
  d_mode.Upload(std::vector<int32_t>(B, kPrhsModeHeavy));
  d_sink.Upload(std::vector<int32_t>(B, 0));
  d_local.Upload(recent);
  d_slot.Upload(slots);
  d_anchor.Resize(static_cast<size_t>(pool_rows) * G * D * 2);
  d_reuse.Upload(std::vector<int32_t>(pool_rows, 0));
  d_valid.Upload(std::vector<int32_t>(pool_rows, 0));
  d_aset.Resize(static_cast<size_t>(pool_rows) * anchor_stride * 4);
  d_aset.Poison();
  d_acount.Upload(std::vector<int32_t>(pool_rows, 0));
  d_pos.Resize(static_cast<size_t>(pool_rows) * h2o_stride * 4);
  d_pos.Poison();
  d_acc.Resize(static_cast<size_t>(pool_rows) * h2o_stride * 4);
  d_acc.Poison();
  d_cnt.Upload(std::vector<int32_t>(pool_rows, 0));
  d_refresh.Resize(rows * 4);
  d_csr_indptr.Resize((rows + 1) * 4);
  const int64_t capacity = static_cast<int64_t>(rows) * max_len;
  d_csr.Resize(capacity * 4);
  PrhsSelectParams p = CommonParams(dtype, B, hq, hkv, D, max_len, d_k, d_indptr, d_pages, d_topk,
                                    d_refresh, d_csr_indptr, d_csr, capacity);
  p.d_mode = d_mode.get<int32_t>();
  p.d_sink = d_sink.get<int32_t>();
  p.d_local = d_local.get<int32_t>();
  p.d_state_slot = d_slot.get<int32_t>();
  p.d_anchor_q = d_anchor.get();
  p.d_reuse = d_reuse.get<int32_t>();
  p.d_valid = d_valid.get<int32_t>();
  p.d_anchor_set = d_aset.get<int32_t>();
  p.d_anchor_count = d_acount.get<int32_t>();
  p.anchor_stride = anchor_stride;
  p.d_h2o_pos = d_pos.get<int32_t>();
  p.d_h2o_acc = d_acc.get<float>();
  p.d_h2o_count = d_cnt.get<int32_t>();
  p.h2o_stride = h2o_stride;
  ASSERT_EQ(PrhsSelectCheck(p), nullptr) << PrhsSelectCheck(p);
  const size_t ws = PrhsSelectWorkspaceBytes(p);
  d_ws.Resize(ws);
  p.d_workspace = d_ws.get();
  p.workspace_bytes = ws;
  const PrhsWorkspaceView view = PrhsSelectWorkspace(p);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<uint16_t> q(static_cast<size_t>(B) * hq * D);
  // Float64 logits of query head g of row (b, h) at key j.
  auto logit = [&](int b, int h, int g, int j) {
    const uint16_t* qh = q.data() + (static_cast<size_t>(b) * hq + h * G + g) * D;
    const uint16_t* k = key(b, h, j);
    double s = 0;
    for (int d = 0; d < D; ++d) s += HalfBitsToDouble(qh[d], dtype) * HalfBitsToDouble(k[d], dtype);
    return s * scale;
  };
  int evictions = 0, tie_rows = 0;
  for (int step = 0; step < steps; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    std::vector<int32_t> lens(B);
    for (int b = 0; b < B; ++b) lens[b] = lens0[b] + step;
    for (auto& x : q) x = DoubleToHalfBits(2.0 * unif(rng), dtype);
    d_q.Upload(q);
    d_lens.Upload(lens);
    p.d_q = d_q.get();
    p.d_seq_lens = d_lens.get<int32_t>();
    const auto valid0 = d_valid.Download<int32_t>(pool_rows);
    const auto reuse0 = d_reuse.Download<int32_t>(pool_rows);
    const auto cnt0 = d_cnt.Download<int32_t>(pool_rows);
    const auto pos0 = d_pos.Download<int32_t>(static_cast<size_t>(pool_rows) * h2o_stride);
    const auto acc0 = d_acc.Download<float>(static_cast<size_t>(pool_rows) * h2o_stride);
    CUDA_OK(PrhsSelectStep(p, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    const auto valid1 = d_valid.Download<int32_t>(pool_rows);
    const auto reuse1 = d_reuse.Download<int32_t>(pool_rows);
    const auto cnt1 = d_cnt.Download<int32_t>(pool_rows);
    const auto pos1 = d_pos.Download<int32_t>(static_cast<size_t>(pool_rows) * h2o_stride);
    const auto acc1 = d_acc.Download<float>(static_cast<size_t>(pool_rows) * h2o_stride);
    const auto acount = d_acount.Download<int32_t>(pool_rows);
    const auto aset = d_aset.Download<int32_t>(static_cast<size_t>(pool_rows) * anchor_stride);
    const auto refresh = d_refresh.Download<int32_t>(rows);
    const auto indptr = d_csr_indptr.Download<int32_t>(rows + 1);
    const auto csr = d_csr.Download<int32_t>(indptr[rows]);
    std::vector<std::vector<int32_t>> lists(rows);
    for (int r = 0; r < rows; ++r) {
      SCOPED_TRACE("row " + std::to_string(r));
      const int b = r / hkv, h = r % hkv, t = lens[b], sr = slots[b] * hkv + h;
      const int hi = t - recent[b];
      EXPECT_EQ(refresh[r], 0);
      // Candidates as the kernel left them in the workspace.
      const int nc = valid0[sr] ? cnt0[sr] + (t - reuse0[sr]) : t;
      std::vector<int32_t> cpos(nc);
      std::vector<float> cacc(nc);
      cudaMemcpy(cpos.data(), view.logits + static_cast<size_t>(r) * G * view.row_stride,
                 nc * 4, cudaMemcpyDeviceToHost);
      cudaMemcpy(cacc.data(), view.probs + static_cast<size_t>(r) * view.row_stride, nc * 4,
                 cudaMemcpyDeviceToHost);
      if (!valid0[sr]) {
        std::vector<double> p_ref(t, 0.0);
        for (int g = 0; g < G; ++g) {
          std::vector<double> s(t);
          double mx = -INFINITY, z = 0;
          for (int j = 0; j < t; ++j) mx = std::max(mx, s[j] = logit(b, h, g, j));
          for (int j = 0; j < t; ++j) z += std::exp(s[j] - mx);
          for (int j = 0; j < t; ++j) p_ref[j] += std::exp(s[j] - mx) / z / G;
        }
        for (int j = 0; j < t; ++j) {
          ASSERT_EQ(cpos[j], j);
          ASSERT_NEAR(cacc[j], p_ref[j], 1e-4 * p_ref[j] + 1e-7) << "j " << j;
        }
      } else {
        for (int i = 0; i < cnt0[sr]; ++i) {
          ASSERT_EQ(cpos[i], pos0[static_cast<size_t>(sr) * h2o_stride + i]);
          ASSERT_EQ(std::memcmp(&cacc[i], &acc0[static_cast<size_t>(sr) * h2o_stride + i], 4), 0);
        }
        for (int i = cnt0[sr]; i < nc; ++i) {
          ASSERT_EQ(cpos[i], reuse0[sr] + i - cnt0[sr]);
          ASSERT_EQ(cacc[i], 0.0f);
        }
      }
      // Reference selection on the GPU's candidate scores.
      std::vector<int> below;
      for (int i = 0; i < nc; ++i) {
        if (cpos[i] < hi) below.push_back(i);
      }
      std::stable_sort(below.begin(), below.end(),
                       [&](int x, int y) { return cacc[x] > cacc[y]; });
      const size_t k = std::min<size_t>(below.size(), heavy[b]);
      if (k > 0 && k < below.size() && cacc[below[k - 1]] == cacc[below[k]]) ++tie_rows;
      evictions += static_cast<int>(below.size() - k);
      std::vector<char> kept(nc, 0);
      for (size_t i = 0; i < k; ++i) kept[below[i]] = 1;
      std::vector<int32_t> want_anchor, want_pos;
      std::vector<float> want_acc;
      for (int i = 0; i < nc; ++i) {
        if (kept[i]) want_anchor.push_back(cpos[i]);
        if (kept[i] || cpos[i] >= hi) {
          want_pos.push_back(cpos[i]);
          want_acc.push_back(cacc[i]);
        }
      }
      ASSERT_EQ(acount[sr], static_cast<int>(want_anchor.size()));
      EXPECT_EQ(std::vector<int32_t>(aset.begin() + static_cast<size_t>(sr) * anchor_stride,
                                     aset.begin() + static_cast<size_t>(sr) * anchor_stride +
                                         want_anchor.size()),
                want_anchor);
      ASSERT_EQ(cnt1[sr], static_cast<int>(want_pos.size()));
      EXPECT_EQ(std::vector<int32_t>(pos1.begin() + static_cast<size_t>(sr) * h2o_stride,
                                     pos1.begin() + static_cast<size_t>(sr) * h2o_stride +
                                         want_pos.size()),
                want_pos);
      EXPECT_EQ(std::memcmp(acc1.data() + static_cast<size_t>(sr) * h2o_stride, want_acc.data(),
                            want_acc.size() * 4),
                0);
      EXPECT_EQ(valid1[sr], 1);
      EXPECT_EQ(reuse1[sr], t);
      std::vector<int32_t> want_list = want_anchor;
      for (int j = std::max(hi, 0); j < t; ++j) want_list.push_back(j);
      EXPECT_EQ(std::vector<int32_t>(csr.begin() + indptr[r], csr.begin() + indptr[r + 1]),
                want_list);
      lists[r] = want_list;
    }
    // Observe: the probabilities over each row's list, added to the tracked scores.
    CUDA_OK(PrhsHeavyObserve(p, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    const auto acc2 = d_acc.Download<float>(static_cast<size_t>(pool_rows) * h2o_stride);
    for (int r = 0; r < rows; ++r) {
      SCOPED_TRACE("observe row " + std::to_string(r));
      const int b = r / hkv, h = r % hkv, sr = slots[b] * hkv + h;
      std::vector<double> lse(G);
      for (int g = 0; g < G; ++g) {
        double mx = -INFINITY, z = 0;
        for (int j : lists[r]) mx = std::max(mx, logit(b, h, g, j));
        for (int j : lists[r]) z += std::exp(logit(b, h, g, j) - mx);
        lse[g] = mx + std::log(z);
      }
      for (int i = 0; i < cnt1[sr]; ++i) {
        const size_t e = static_cast<size_t>(sr) * h2o_stride + i;
        double want = acc1[e];
        for (int g = 0; g < G; ++g) want += std::exp(logit(b, h, g, pos1[e]) - lse[g]) / G;
        ASSERT_NEAR(acc2[e], want, 2e-6 + 1e-5 * std::abs(want)) << "entry " << i;
      }
    }
  }
  EXPECT_GT(evictions, 0);
  if (dup > 0) {
    EXPECT_GT(tie_rows, 0) << "the duplicated keys should tie at the threshold";
  }
}

std::string HeavyName(const ::testing::TestParamInfo<HeavyParam>& info) {
  const auto [dtype, D, G, dup] = info.param;
  return std::string(dtype == AttnDType::kFloat16 ? "f16" : "bf16") + "_d" + std::to_string(D) +
         "_g" + std::to_string(G) + (dup > 0 ? "_ties" : "");
}

INSTANTIATE_TEST_SUITE_P(All, PrhsHeavySweep,
                         ::testing::Combine(::testing::Values(AttnDType::kFloat16,
                                                              AttnDType::kBFloat16),
                                            ::testing::Values(64, 128), ::testing::Values(1, 4),
                                            ::testing::Values(0, 5)),
                         HeavyName);

// HShare (kApprox rows) over two layers and several steps, the state at permuted slots:
//   calibration  the channels exactly the hs_r largest Σ_j |K_jc| (float64 reference; random
//                keys, so no near ties), best first;
//   gate         refresh = 1 exactly at steps 0, 2, 4 (interval 2) for representatives, 0 for
//                the units with a source;
//   scores       the approximate scores of refreshing rows within 1e-4 + 1e-5·Σ|terms| of the
//                float64 Σ_g Σ_c q_gc K_jc;
//   selection    S_anchor exactly the top-k of the GPU's own scores over [sink, t - local)
//                (ties lower position first); a sharing row's S_anchor equal to its source's
//                (a unit of layer 0, copied during layer 1 / later in layer 0);
//   lists        the CSR rows exactly MergeIndexSet(sink, S_anchor, local, t).
TEST(PrhsHShare, CalibrateApproxAndShareMatchHShare) {
  SKIP_WITHOUT_DEVICE();
  for (const AttnDType dtype : {AttnDType::kBFloat16, AttnDType::kFloat16}) {
    for (const int D : {64, 128}) {
      SCOPED_TRACE(std::string(dtype == AttnDType::kFloat16 ? "f16" : "bf16") + " d" +
                   std::to_string(D));
      const int G = 4, hkv = 2, hq = G * hkv, layers = 2, steps = 5, interval = 2;
      const int sink = 8, local = 32, r = 16;
      const std::vector<int> lens0{1000, 300, 2100};
      const std::vector<int32_t> topk{120, 40, 5}, slots{1, 2, 0};
      const int B = static_cast<int>(lens0.size()), rows = B * hkv, pool_rows = 3 * hkv;
      const int stride = 128;
      // Sources per (layer, kv head) unit: layer 0 head 1 shares unit 0 (layer 0 head 0), layer
      // 1 head 0 shares unit 0 too, layer 1 head 1 is a representative.
      const int32_t source_of[layers][2] = {{-1, 0}, {0, -1}};
      std::mt19937 rng(99u + D + static_cast<unsigned>(dtype));
      std::uniform_real_distribution<double> unif(-1.0, 1.0);
      int max_len = 0;
      std::vector<int32_t> page_indptr{0};
      for (int b = 0; b < B; ++b) {
        max_len = std::max(max_len, lens0[b] + steps);
        page_indptr.push_back(page_indptr.back() + (lens0[b] + steps + 15) / 16);
      }
      const int num_pages = page_indptr.back();
      std::vector<int32_t> page_indices(num_pages);
      std::iota(page_indices.begin(), page_indices.end(), 0);
      std::shuffle(page_indices.begin(), page_indices.end(), rng);
      std::vector<uint16_t> k_pool(static_cast<size_t>(num_pages) * hkv * 16 * D);
      for (auto& x : k_pool) x = DoubleToHalfBits(unif(rng) * (1.0 + 0.01 * (rng() % 50)), dtype);
      auto key = [&](int b, int h, int j) {
        const int page = page_indices[page_indptr[b] + j / 16];
        return k_pool.data() + ((static_cast<size_t>(page) * hkv + h) * 16 + j % 16) * D;
      };
      DeviceBuffer d_q, d_k, d_indptr, d_pages, d_lens, d_topk, d_mode, d_cal, d_slot, d_anchor,
          d_reuse, d_valid, d_aset, d_acount, d_refresh, d_csr_indptr, d_csr, d_ws, d_ch, d_src;
      d_k.Upload(k_pool);
      d_indptr.Upload(page_indptr);
      d_pages.Upload(page_indices);
      d_topk.Upload(topk);
      d_mode.Upload(std::vector<int32_t>(B, kPrhsModeApprox));
      d_cal.Upload(std::vector<int32_t>(B, kPrhsModeExact));
      d_slot.Upload(slots);
      d_anchor.Resize(static_cast<size_t>(layers) * pool_rows * G * D * 2);
      d_reuse.Upload(std::vector<int32_t>(layers * pool_rows, 0));
      d_valid.Upload(std::vector<int32_t>(layers * pool_rows, 0));
      d_aset.Resize(static_cast<size_t>(layers) * pool_rows * stride * 4);
      d_aset.Poison();
      d_acount.Upload(std::vector<int32_t>(layers * pool_rows, 0));
      d_ch.Resize(static_cast<size_t>(layers) * pool_rows * r * 4);
      d_ch.Poison();
      std::vector<int32_t> src(static_cast<size_t>(layers) * pool_rows, -1);
      for (int l = 0; l < layers; ++l) {
        for (int b = 0; b < B; ++b) {
          for (int h = 0; h < hkv; ++h) src[l * pool_rows + slots[b] * hkv + h] = source_of[l][h];
        }
      }
      d_src.Upload(src);
      d_refresh.Resize(rows * 4);
      d_csr_indptr.Resize((rows + 1) * 4);
      const int64_t capacity = static_cast<int64_t>(rows) * max_len;
      d_csr.Resize(capacity * 4);
      PrhsSelectParams p = CommonParams(dtype, B, hq, hkv, D, max_len, d_k, d_indptr, d_pages,
                                        d_topk, d_refresh, d_csr_indptr, d_csr, capacity);
      p.sink = sink;
      p.local = local;
      p.d_mode = d_mode.get<int32_t>();
      p.d_state_slot = d_slot.get<int32_t>();
      p.anchor_stride = stride;
      p.hs_r = r;
      p.hs_interval = interval;
      p.d_anchor_set_base = d_aset.get<int32_t>();
      p.d_anchor_count_base = d_acount.get<int32_t>();
      p.layer_rows = pool_rows;
      auto at_layer = [&](int l) {
        PrhsSelectParams q = p;
        const size_t row0 = static_cast<size_t>(l) * pool_rows;
        q.d_anchor_q = d_anchor.get<uint16_t>() + row0 * G * D;
        q.d_reuse = d_reuse.get<int32_t>() + row0;
        q.d_valid = d_valid.get<int32_t>() + row0;
        q.d_anchor_set = d_aset.get<int32_t>() + row0 * stride;
        q.d_anchor_count = d_acount.get<int32_t>() + row0;
        q.d_hs_channels = d_ch.get<int32_t>() + row0 * r;
        q.d_hs_source = d_src.get<int32_t>() + row0;
        return q;
      };
      std::vector<uint16_t> qv(static_cast<size_t>(B) * hq * D);
      {
        PrhsSelectParams q0 = at_layer(0);
        ASSERT_EQ(PrhsSelectCheck(q0), nullptr) << PrhsSelectCheck(q0);
        d_ws.Resize(PrhsSelectWorkspaceBytes(q0));
      }
      p.d_workspace = d_ws.get();
      p.workspace_bytes = PrhsSelectWorkspaceBytes(at_layer(0));
      const PrhsWorkspaceView view = PrhsSelectWorkspace(at_layer(0));
      std::vector<std::vector<int32_t>> channels(rows);
      int refreshes = 0, shares = 0;
      for (int step = 0; step < steps; ++step) {
        SCOPED_TRACE("step " + std::to_string(step));
        std::vector<int32_t> lens(B);
        for (int b = 0; b < B; ++b) lens[b] = lens0[b] + step;
        for (auto& x : qv) x = DoubleToHalfBits(2.0 * unif(rng), dtype);
        d_q.Upload(qv);
        d_lens.Upload(lens);
        p.d_q = d_q.get();
        p.d_seq_lens = d_lens.get<int32_t>();
        std::vector<std::vector<int32_t>> layer0_sets(rows);
        for (int l = 0; l < layers; ++l) {
          SCOPED_TRACE("layer " + std::to_string(l));
          PrhsSelectParams q = at_layer(l);
          const size_t row0 = static_cast<size_t>(l) * pool_rows;
          if (step == 0) {  // calibration: channels (and the kExact pass sets valid, reuse = 0)
            PrhsSelectParams c = q;
            c.d_mode = d_cal.get<int32_t>();
            CUDA_OK(PrhsHShareCalibrate(c, nullptr));
            CUDA_OK(PrhsGate(c, nullptr));
            CUDA_OK(PrhsRefreshScores(c, nullptr));
            CUDA_OK(PrhsRefreshSelect(c, nullptr));
            CUDA_OK(cudaDeviceSynchronize());
            const auto ch = d_ch.Download<int32_t>(static_cast<size_t>(pool_rows) * r, row0 * r);
            for (int rr = 0; rr < rows; ++rr) {
              const int b = rr / hkv, h = rr % hkv, sr = slots[b] * hkv + h;
              std::vector<double> sum(D, 0.0);
              for (int j = 0; j < lens[b]; ++j) {
                for (int d = 0; d < D; ++d) sum[d] += std::abs(HalfBitsToDouble(key(b, h, j)[d], dtype));
              }
              std::vector<int32_t> order(D);
              std::iota(order.begin(), order.end(), 0);
              std::stable_sort(order.begin(), order.end(),
                               [&](int x, int y) { return sum[x] > sum[y]; });
              order.resize(r);
              EXPECT_EQ(std::vector<int32_t>(ch.begin() + static_cast<size_t>(sr) * r,
                                             ch.begin() + static_cast<size_t>(sr) * r + r),
                        order) << "row " << rr;
              if (l == 0) channels[rr] = order;
            }
          }
          CUDA_OK(PrhsSelectStep(q, nullptr));
          CUDA_OK(cudaDeviceSynchronize());
          const auto refresh = d_refresh.Download<int32_t>(rows);
          const auto acount = d_acount.Download<int32_t>(pool_rows, row0);
          const auto aset = d_aset.Download<int32_t>(static_cast<size_t>(pool_rows) * stride,
                                                     row0 * stride);
          const auto indptr = d_csr_indptr.Download<int32_t>(rows + 1);
          const auto csr = d_csr.Download<int32_t>(indptr[rows]);
          for (int rr = 0; rr < rows; ++rr) {
            SCOPED_TRACE("row " + std::to_string(rr));
            const int b = rr / hkv, h = rr % hkv, sr = slots[b] * hkv + h, t = lens[b];
            const int source = source_of[l][h];
            const std::vector<int32_t> set(aset.begin() + static_cast<size_t>(sr) * stride,
                                           aset.begin() + static_cast<size_t>(sr) * stride +
                                               acount[sr]);
            if (source >= 0) {
              EXPECT_EQ(refresh[rr], 0);
              ++shares;
              // The source unit is in layer 0 (its set of this step).
              EXPECT_EQ(set, layer0_sets[b * hkv + source % hkv]);
            } else {
              const bool want = step % interval == 0;
              EXPECT_EQ(refresh[rr], want ? 1 : 0);
              want ? ++refreshes : ++shares;
              if (want) {
                std::vector<float> a(t);
                cudaMemcpy(a.data(), view.probs + static_cast<size_t>(rr) * view.row_stride,
                           t * 4, cudaMemcpyDeviceToHost);
                const std::vector<int32_t>& ch = channels[rr];  // same K: same channels
                for (int j = 0; j < t; ++j) {
                  double ref = 0, mag = 0;
                  for (int g = 0; g < G; ++g) {
                    const uint16_t* qh = qv.data() + (static_cast<size_t>(b) * hq + h * G + g) * D;
                    for (int c : ch) {
                      const double x = HalfBitsToDouble(qh[c], dtype) *
                                       HalfBitsToDouble(key(b, h, j)[c], dtype);
                      ref += x;
                      mag += std::abs(x);
                    }
                  }
                  ASSERT_NEAR(a[j], ref, 1e-4 + 1e-5 * mag) << "j " << j;
                }
                std::vector<int32_t> top = RefTopK(a, sink, t - local, topk[b]);
                std::sort(top.begin(), top.end());
                EXPECT_EQ(set, top);
              }
            }
            if (l == 0) layer0_sets[rr] = set;
            EXPECT_EQ(std::vector<int32_t>(csr.begin() + indptr[rr], csr.begin() + indptr[rr + 1]),
                      RefMergeIndexSet(sink, set, local, t));
          }
        }
      }
      EXPECT_GT(refreshes, 0);
      EXPECT_GT(shares, 0);
    }
  }
}

// Argument checks (run without a device too).
TEST(PrhsSelectCheck, RejectsUnsupported) {
  PrhsSelectParams p;
  p.batch = 0;
  p.num_q_heads = 32;
  p.num_kv_heads = 32;
  p.anchor_stride = 16;
  EXPECT_EQ(PrhsSelectCheck(p), nullptr);
  EXPECT_EQ(PrhsSelectWorkspaceBytes(p), 0u);
  PrhsSelectParams bad = p;
  bad.head_dim = 96;
  EXPECT_STREQ(PrhsSelectCheck(bad), "head_dim must be 64 or 128");
  bad = p;
  bad.num_kv_heads = 2;  // group 16
  EXPECT_STREQ(PrhsSelectCheck(bad), "num_q_heads / num_kv_heads must be <= 8");
  bad = p;
  bad.num_kv_heads = 5;
  EXPECT_STREQ(PrhsSelectCheck(bad), "num_q_heads must be a positive multiple of num_kv_heads");
  bad = p;
  bad.batch = 300;  // 300 * 32 rows > 8192
  EXPECT_STREQ(PrhsSelectCheck(bad), "batch * num_kv_heads must be <= 8192");
  bad = p;
  bad.batch = 1;
  EXPECT_STREQ(PrhsSelectCheck(bad), "d_q is null");
  EXPECT_EQ(PrhsSelectWorkspaceBytes(bad), SIZE_MAX);
  EXPECT_EQ(PrhsGate(bad, nullptr), cudaErrorInvalidValue);
  bad = p;
  bad.dilate_m_fraction = 1.5;
  EXPECT_STREQ(PrhsSelectCheck(bad), "dilate_m_fraction must be in [0, 1]");
}

}  // namespace
}  // namespace prehoc::kernels
