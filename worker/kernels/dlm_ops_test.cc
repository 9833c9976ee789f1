// dlm_ops kernels against CPU references (label gpu; skipped without a device). Index kernels
// (selection, top-1) match exactly; float kernels meet the stated bounds.
#include "worker/kernels/dlm_ops.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "worker/testing/gpu_test_util.h"

namespace prehoc::kernels {
namespace {

// Segments of 1, 7, 256, 300 and 1000 rows with duplicated values (ties) and k from 0 to len.
TEST(DlmOpsTest, SelectSmallestMatchesReference) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937 rng(5);
  const std::vector<int> lens = {1, 7, 256, 300, 1000};
  const std::vector<int> ks = {1, 0, 41, 300, 163};
  std::vector<int32_t> begin, len(lens.begin(), lens.end()), k(ks.begin(), ks.end()), out_off;
  int n = 0, total = 0;
  for (size_t b = 0; b < lens.size(); ++b) {
    begin.push_back(n);
    out_off.push_back(total);
    n += lens[b];
    total += ks[b];
  }
  std::vector<float> cos(n);
  for (float& c : cos) c = static_cast<float>(rng() % 64) / 64.0f - 0.5f;  // many ties
  int32_t *d_b = Upload(begin), *d_l = Upload(len), *d_k = Upload(k), *d_o = Upload(out_off);
  float* d_c = Upload(cos);
  int32_t* d_sel = Upload(std::vector<int32_t>(total + 1, -7));
  int32_t* d_inv = Upload(std::vector<int32_t>(n, -7));
  ASSERT_EQ(DlmSelectSmallest(d_c, d_b, d_l, d_k, d_o, static_cast<int>(lens.size()), d_sel,
                              d_inv, nullptr),
            cudaSuccess);
  const std::vector<int32_t> sel = Download(d_sel, total), inv = Download(d_inv, n);
  for (size_t b = 0; b < lens.size(); ++b) {
    std::vector<int> idx(lens[b]);
    std::iota(idx.begin(), idx.end(), begin[b]);
    std::stable_sort(idx.begin(), idx.end(), [&](int x, int y) { return cos[x] < cos[y]; });
    idx.resize(ks[b]);
    std::sort(idx.begin(), idx.end());
    std::vector<int32_t> got(sel.begin() + out_off[b], sel.begin() + out_off[b] + ks[b]);
    EXPECT_EQ(got, std::vector<int32_t>(idx.begin(), idx.end())) << "segment " << b;
    for (int i = begin[b]; i < begin[b] + lens[b]; ++i) {
      auto it = std::find(got.begin(), got.end(), i);
      EXPECT_EQ(inv[i], it == got.end() ? -1 : out_off[b] + static_cast<int>(it - got.begin()));
    }
  }
  for (void* p : {static_cast<void*>(d_b), static_cast<void*>(d_l), static_cast<void*>(d_k),
                  static_cast<void*>(d_o), static_cast<void*>(d_c), static_cast<void*>(d_sel),
                  static_cast<void*>(d_inv)}) {
    cudaFree(p);
  }
}

// Top-1 (first maximum, NaN never wins) and its probability; softmax rows.
TEST(DlmOpsTest, Top1AndSoftmax) {
  SKIP_WITHOUT_DEVICE();
  const int rows = 5, V = 1001;
  std::mt19937 rng(9);
  std::normal_distribution<float> g(0.0f, 3.0f);
  std::vector<float> lg(rows * V);
  for (float& x : lg) x = g(rng);
  lg[1 * V + 17] = 40;
  lg[1 * V + 900] = 40;                 // tie: the lower index wins
  lg[2 * V + 0] = std::nanf("");        // NaN never wins
  for (int v = 0; v < V; ++v) lg[3 * V + v] = -INFINITY;  // all −inf → 0
  float* d_l = Upload(lg);
  int32_t* d_t = Upload(std::vector<int32_t>(rows, -1));
  float* d_p = Upload(std::vector<float>(rows, -1));
  ASSERT_EQ(DlmTop1(d_l, rows, V, d_t, d_p, nullptr), cudaSuccess);
  const auto top = Download(d_t, rows);
  const auto prob = Download(d_p, rows);
  for (int r = 0; r < rows; ++r) {
    int best = -1;
    for (int v = 0; v < V; ++v) {
      const float x = lg[r * V + v];
      if (x == x && (best < 0 || x > lg[r * V + best])) best = v;
    }
    EXPECT_EQ(top[r], best < 0 ? 0 : best) << r;
    if (r == 3) continue;
    double sum = 0;
    for (int v = 0; v < V; ++v) {
      const double x = lg[r * V + v];
      if (x == x) sum += std::exp(x - lg[r * V + best]);
    }
    EXPECT_NEAR(prob[r], 1.0 / sum, 1e-5 + 1e-5 / sum) << r;
  }
  EXPECT_EQ(top[1], 17);
  // Softmax rows (finite values) within bf16 rounding.
  uint16_t* d_sm = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_sm), rows * V * 2), cudaSuccess);
  std::vector<float> fin(lg);
  for (float& x : fin) x = std::isfinite(x) ? x : 0.0f;
  float* d_f = Upload(fin);
  ASSERT_EQ(DlmSoftmaxRowsToBf16(d_f, rows, V, d_sm, nullptr), cudaSuccess);
  const auto sm = Download(d_sm, rows * V);
  for (int r = 0; r < rows; ++r) {
    const float mx = *std::max_element(fin.begin() + r * V, fin.begin() + (r + 1) * V);
    double sum = 0;
    for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(fin[r * V + v]) - mx);
    for (int v = 0; v < V; ++v) {
      const double ref = std::exp(static_cast<double>(fin[r * V + v]) - mx) / sum;
      EXPECT_NEAR(Bf16ToFloat(sm[r * V + v]), ref, 1e-7 + 8e-3 * ref) << r << " " << v;
    }
  }
  EXPECT_EQ(DlmTop1(nullptr, 1, V, d_t, d_p, nullptr), cudaErrorInvalidValue);
  for (void* p : {static_cast<void*>(d_l), static_cast<void*>(d_t), static_cast<void*>(d_p),
                  static_cast<void*>(d_sm), static_cast<void*>(d_f)}) {
    cudaFree(p);
  }
}

// DlmResidual and DlmResidualRmsNorm against the reference: live rows of two requests, some with
// a fresh update (stored as the cached delta) and some reading the cached delta; x and the
// stored deltas exactly (the same f32 additions), the fused norm within one bf16 rounding
// (|out − ref| <= 2⁻⁸·|ref| + 1e-6, ref in float64 from the updated x). Widths 1, 7, 200, 4099.
class DlmResidualTest : public ::testing::TestWithParam<int> {};

TEST_P(DlmResidualTest, MatchesReference) {
  SKIP_WITHOUT_DEVICE();
  const int d = GetParam(), layers = 3, layer = 1;
  const int rows[2] = {11, 6};  // canvas rows per request
  std::mt19937 rng(d);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  // Live rows: request 0 rows 2..10, request 1 rows 0..5 → n = 15; every third row fresh.
  std::vector<int32_t> live_row, live_req, inv;
  int m = 0;
  for (int b = 0; b < 2; ++b) {
    for (int r = b == 0 ? 2 : 0; r < rows[b]; ++r) {
      live_row.push_back(r);
      live_req.push_back(b);
      inv.push_back(live_row.size() % 3 == 1 ? m++ : -1);
    }
  }
  const int n = static_cast<int>(live_row.size());
  std::vector<float> x(static_cast<size_t>(n) * d), fresh(static_cast<size_t>(m) * d), w(d);
  for (auto& v : x) v = u(rng);
  for (auto& v : fresh) v = u(rng);
  for (auto& v : w) v = u(rng);
  std::vector<std::vector<float>> delta(2);
  for (int b = 0; b < 2; ++b) {
    delta[b].resize(static_cast<size_t>(layers) * rows[b] * d);
    for (auto& v : delta[b]) v = u(rng);
  }
  // Reference.
  std::vector<float> x_ref = x;
  std::vector<std::vector<float>> delta_ref = delta;
  std::vector<double> out_ref(static_cast<size_t>(n) * d);
  for (int i = 0; i < n; ++i) {
    float* dl = delta_ref[live_req[i]].data() +
                (static_cast<size_t>(layer) * rows[live_req[i]] + live_row[i]) * d;
    if (inv[i] >= 0) std::copy_n(fresh.data() + static_cast<size_t>(inv[i]) * d, d, dl);
    double ss = 0;
    for (int e = 0; e < d; ++e) {
      x_ref[static_cast<size_t>(i) * d + e] += dl[e];
      ss += static_cast<double>(x_ref[static_cast<size_t>(i) * d + e]) *
            x_ref[static_cast<size_t>(i) * d + e];
    }
    const double inv_rms = 1.0 / std::sqrt(ss / d + 1e-5);
    for (int e = 0; e < d; ++e) {
      out_ref[static_cast<size_t>(i) * d + e] =
          w[e] * (x_ref[static_cast<size_t>(i) * d + e] * inv_rms);
    }
  }
  for (const bool fused : {false, true}) {
    float* dx = Upload(x);
    float* df = Upload(fresh);
    float* dw = Upload(w);
    float* dd[2] = {Upload(delta[0]), Upload(delta[1])};
    int32_t* drow = Upload(live_row);
    int32_t* dreq = Upload(live_req);
    int32_t* dinv = Upload(inv);
    std::vector<DlmCacheView> views(2);
    for (int b = 0; b < 2; ++b) {
      views[b].delta = dd[b];
      views[b].rows = rows[b];
    }
    DlmCacheView* dviews = Upload(views);
    uint16_t* dout = Upload(std::vector<uint16_t>(static_cast<size_t>(n) * d, 0));
    if (fused) {
      ASSERT_EQ(DlmResidualRmsNorm(dx, dinv, df, n, d, layer, drow, dreq, dviews, dw, 1e-5f, dout,
                                   nullptr),
                cudaSuccess);
    } else {
      ASSERT_EQ(DlmResidual(dx, dinv, df, n, d, layer, drow, dreq, dviews, nullptr), cudaSuccess);
    }
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(Download(dx, x.size()), x_ref) << "fused " << fused;
    for (int b = 0; b < 2; ++b) EXPECT_EQ(Download(dd[b], delta[b].size()), delta_ref[b]) << b;
    if (fused) {
      const std::vector<uint16_t> out = Download(dout, out_ref.size());
      int bad = 0;
      for (size_t e = 0; e < out.size(); ++e) {
        const double g = Bf16ToFloat(out[e]);
        if (!std::isfinite(g) || std::fabs(g - out_ref[e]) > std::ldexp(1.0, -8) *
                                                                   std::fabs(out_ref[e]) + 1e-6) {
          if (bad++ < 5) ADD_FAILURE() << "out[" << e << "] = " << g << ", ref " << out_ref[e];
        }
      }
      EXPECT_EQ(bad, 0);
    }
    // Refusals name nothing but must not launch: null norm weight for the fused form.
    EXPECT_EQ(DlmResidualRmsNorm(dx, dinv, df, n, d, layer, drow, dreq, dviews, nullptr, 1e-5f,
                                 dout, nullptr),
              cudaErrorInvalidValue);
    for (void* ptr : {static_cast<void*>(dx), static_cast<void*>(df), static_cast<void*>(dw),
                      static_cast<void*>(dd[0]), static_cast<void*>(dd[1]),
                      static_cast<void*>(drow), static_cast<void*>(dreq), static_cast<void*>(dinv),
                      static_cast<void*>(dviews), static_cast<void*>(dout)}) {
      cudaFree(ptr);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Widths, DlmResidualTest, ::testing::Values(1, 7, 200, 4096, 4099));

// DlmQkvRopeScatter (one launch) writes exactly what DlmRopeQ + DlmKvScatter write: Q rows, and
// K / V rows of two requests' caches (GQA 6 / 2 heads, head_dim 64 and 128, biases, a row
// selection; also K without V, as dllm's selected rows).
TEST(DlmOpsTest, QkvRopeScatterEqualsSeparateKernels) {
  SKIP_WITHOUT_DEVICE();
  for (const int hd : {64, 128}) {
    for (const bool with_v : {true, false}) {
      const int heads = 6, kvh = 2, layers = 3, layer = 1, rows[2] = {9, 5};
      const int width = (heads + 2 * kvh) * hd, m = 7;
      std::mt19937 rng(hd + with_v);
      std::uniform_real_distribution<float> u(-2.0f, 2.0f);
      std::vector<int32_t> live_row = {1, 3, 4, 8, 0, 2, 4}, live_req = {0, 0, 0, 0, 1, 1, 1};
      std::vector<int32_t> sel = {6, 0, 3, 1, 5, 2, 4};
      std::vector<float> src(static_cast<size_t>(m) * width), bias(width), inv_freq(hd / 2);
      for (auto& v : src) v = u(rng);
      for (auto& v : bias) v = u(rng);
      for (int e = 0; e < hd / 2; ++e) inv_freq[e] = std::pow(10000.0f, -2.0f * e / hd);
      float* dsrc = Upload(src);
      float* dbias = Upload(bias);
      float* dfreq = Upload(inv_freq);
      int32_t* drow = Upload(live_row);
      int32_t* dreq = Upload(live_req);
      int32_t* dsel = Upload(sel);
      std::vector<uint16_t> q[2], kc[2][2], vc[2][2];
      for (int path = 0; path < 2; ++path) {
        std::vector<DlmCacheView> views(2);
        std::vector<void*> owned;
        for (int b = 0; b < 2; ++b) {
          const size_t elems = static_cast<size_t>(layers) * kvh * rows[b] * hd;
          views[b].k = Upload(std::vector<uint16_t>(elems, 0x7fc0u));
          views[b].v = Upload(std::vector<uint16_t>(elems, 0x7fc0u));
          views[b].rows = rows[b];
          owned.push_back(views[b].k);
          owned.push_back(views[b].v);
        }
        DlmCacheView* dviews = Upload(views);
        uint16_t* dq = Upload(std::vector<uint16_t>(static_cast<size_t>(m) * heads * hd, 0));
        DlmKvScatterParams kp;
        kp.m = m;
        kp.kv_heads = kvh;
        kp.head_dim = hd;
        kp.layer = layer;
        kp.d_src = dsrc;
        kp.src_ld = width;
        kp.k_col = heads * hd;
        kp.v_col = with_v ? (heads + kvh) * hd : -1;
        kp.d_bias_k = dbias + heads * hd;
        kp.d_bias_v = dbias + (heads + kvh) * hd;
        kp.d_sel = dsel;
        kp.d_live_row = drow;
        kp.d_live_req = dreq;
        kp.d_caches = dviews;
        kp.d_inv_freq = dfreq;
        if (path == 0) {
          ASSERT_EQ(DlmKvScatter(kp, nullptr), cudaSuccess);
          ASSERT_EQ(DlmRopeQ(dsrc, width, dbias, dsel, drow, m, heads, hd, dfreq, dq, nullptr),
                    cudaSuccess);
        } else {
          ASSERT_EQ(DlmQkvRopeScatter(kp, heads, dbias, dq, nullptr), cudaSuccess);
        }
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        q[path] = Download(dq, static_cast<size_t>(m) * heads * hd);
        for (int b = 0; b < 2; ++b) {
          const size_t elems = static_cast<size_t>(layers) * kvh * rows[b] * hd;
          kc[path][b] = Download(views[b].k, elems);
          vc[path][b] = Download(views[b].v, elems);
        }
        for (void* ptr : owned) cudaFree(ptr);
        cudaFree(dviews);
        cudaFree(dq);
      }
      EXPECT_EQ(q[0], q[1]) << hd;
      for (int b = 0; b < 2; ++b) {
        EXPECT_EQ(kc[0][b], kc[1][b]) << hd << " " << b;
        EXPECT_EQ(vc[0][b], vc[1][b]) << hd << " " << b;
      }
      // Something was written: request 0's row 8, layer 1, head 1 of K differs from the fill.
      EXPECT_NE(kc[1][0][((static_cast<size_t>(layer) * kvh + 1) * rows[0] + 8) * hd], 0x7fc0u);
      for (void* ptr : {static_cast<void*>(dsrc), static_cast<void*>(dbias),
                        static_cast<void*>(dfreq), static_cast<void*>(drow),
                        static_cast<void*>(dreq), static_cast<void*>(dsel)}) {
        cudaFree(ptr);
      }
    }
  }
}

// DlmFusedAttention against a float64 reference on the same bf16 inputs. Entries are laid
// out as in the forward: Q and O of entry e are head e of [m][count·head_dim] matrices, K and V
// one [n_keys][head_dim] matrix each. Bound per element: P and the output are rounded to bf16,
// so |out − ref| <= 8e-3 · (Σ_t p_t |v_t| + |ref|) + 1e-5 (a wrong index or a missed tile is
// off by O(Σ p |v|)).
struct AttnCase {
  int head_dim, m, n_keys, count, splits;  // splits 0: DlmAttentionSplits(count, m, n_keys, 132)
};
class DlmFusedAttentionTest : public ::testing::TestWithParam<AttnCase> {};

TEST_P(DlmFusedAttentionTest, MatchesReference) {
  SKIP_WITHOUT_DEVICE();
  int dev = 0, major = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (major < 8) GTEST_SKIP() << "needs sm_80+";
  const AttnCase c = GetParam();
  const int hd = c.head_dim, m = c.m, N = c.n_keys, count = c.count, ldq = count * hd;
  const int splits = c.splits > 0 ? c.splits : DlmAttentionSplits(count, m, N, 132);
  std::mt19937 rng(static_cast<unsigned>(hd * 7919 + m * 31 + N));
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<uint16_t> q(static_cast<size_t>(m) * ldq), kk(static_cast<size_t>(count) * N * hd),
      vv(kk.size());
  for (auto& x : q) x = FloatToBf16(2.0f * g(rng));  // sharp enough that the softmax is not flat
  for (auto& x : kk) x = FloatToBf16(g(rng));
  for (auto& x : vv) x = FloatToBf16(g(rng));
  uint16_t* d_q = Upload(q);
  uint16_t* d_k = Upload(kk);
  uint16_t* d_v = Upload(vv);
  uint16_t* d_o = Upload(std::vector<uint16_t>(static_cast<size_t>(m) * ldq, 0xffffu));
  std::vector<const void*> ptrs(4 * count);
  for (int e = 0; e < count; ++e) {
    ptrs[e] = d_k + static_cast<size_t>(e) * N * hd;
    ptrs[count + e] = d_q + e * hd;
    ptrs[2 * count + e] = d_v + static_cast<size_t>(e) * N * hd;
    ptrs[3 * count + e] = d_o + e * hd;
  }
  const void** d_ptrs = Upload(ptrs);
  const size_t wf = DlmAttentionWorkFloats(count, m, hd, splits);
  EXPECT_EQ(wf == 0, splits == 1);
  float* d_w = Upload(std::vector<float>(std::max<size_t>(wf, 1), std::nanf("")));
  DlmAttentionParams p;
  p.count = count;
  p.m = m;
  p.n_keys = N;
  p.head_dim = hd;
  p.ldq = ldq;
  p.splits = splits;
  p.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  p.d_k = d_ptrs;
  p.d_q = d_ptrs + count;
  p.d_v = d_ptrs + 2 * count;
  p.d_o = const_cast<void* const*>(d_ptrs + 3 * count);
  p.d_work = d_w;
  ASSERT_EQ(DlmFusedAttention(p, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto out = Download(d_o, static_cast<size_t>(m) * ldq);
  double worst = 0;
  for (int e = 0; e < count; ++e) {
    for (int r = 0; r < m; ++r) {
      std::vector<double> sc(N);
      double mx = -INFINITY;
      for (int t = 0; t < N; ++t) {
        double dot = 0;
        for (int d = 0; d < hd; ++d) {
          dot += static_cast<double>(Bf16ToFloat(q[static_cast<size_t>(r) * ldq + e * hd + d])) *
                 Bf16ToFloat(kk[(static_cast<size_t>(e) * N + t) * hd + d]);
        }
        sc[t] = dot * p.scale;
        mx = std::max(mx, sc[t]);
      }
      double sum = 0;
      for (double& x : sc) sum += (x = std::exp(x - mx));
      for (int d = 0; d < hd; ++d) {
        double ref = 0, mag = 0;
        for (int t = 0; t < N; ++t) {
          const double v = Bf16ToFloat(vv[(static_cast<size_t>(e) * N + t) * hd + d]);
          ref += sc[t] / sum * v;
          mag += sc[t] / sum * std::fabs(v);
        }
        const double got = Bf16ToFloat(out[static_cast<size_t>(r) * ldq + e * hd + d]);
        const double err = std::fabs(got - ref);
        worst = std::max(worst, err / (mag + std::fabs(ref)));
        ASSERT_LE(err, 8e-3 * (mag + std::fabs(ref)) + 1e-5)
            << "entry " << e << " row " << r << " dim " << d << " got " << got << " ref " << ref;
      }
    }
  }
  std::printf("attention hd %d m %d keys %d count %d splits %d: worst err / (sum p|v| + |ref|) "
              "%.2e\n", hd, m, N, count, splits, worst);
  for (void* ptr : {static_cast<void*>(d_q), static_cast<void*>(d_k), static_cast<void*>(d_v),
                    static_cast<void*>(d_o), static_cast<void*>(d_ptrs), static_cast<void*>(d_w)}) {
    cudaFree(ptr);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, DlmFusedAttentionTest,
    ::testing::Values(AttnCase{128, 41, 1256, 3, 0},  // LLaDA-8B partial step, auto splits
                      AttnCase{128, 64, 1256, 2, 1},  // one split: written directly
                      AttnCase{128, 17, 64, 2, 3},    // more splits than tiles: empty splits
                      AttnCase{128, 2, 300, 4, 2},    // min_rows, a partial last tile
                      AttnCase{64, 1, 1, 2, 1},       // one key
                      AttnCase{64, 64, 65, 3, 2},     // a 1-key last tile
                      AttnCase{64, 33, 263, 6, 0},    // the shipped model's shape
                      AttnCase{128, 100, 300, 2, 2},  // two row blocks, the second partial
                      AttnCase{128, 256, 1256, 2, 0},  // a response refresh
                      AttnCase{128, 1256, 1256, 1, 1},  // a full step (20 row blocks)
                      AttnCase{64, 263, 263, 2, 0}));   // the shipped model's full step

TEST(DlmOpsTest, FusedAttentionRefusals) {
  DlmAttentionParams p;
  p.count = 1;
  p.m = 1;
  p.n_keys = 1;
  p.head_dim = 128;
  p.ldq = 128;
  p.splits = 1;
  p.d_k = p.d_q = p.d_v = reinterpret_cast<const void* const*>(&p);
  p.d_o = reinterpret_cast<void* const*>(&p);
  for (auto bad : {+[](DlmAttentionParams& q) { q.m = 0; },
                   +[](DlmAttentionParams& q) { q.head_dim = 96; q.ldq = 96; },
                   +[](DlmAttentionParams& q) { q.ldq = 64; },
                   +[](DlmAttentionParams& q) { q.splits = 2; },  // no work buffer
                   +[](DlmAttentionParams& q) { q.n_keys = 0; }}) {
    DlmAttentionParams q = p;
    bad(q);
    EXPECT_EQ(DlmFusedAttention(q, nullptr), cudaErrorInvalidValue);
  }
  EXPECT_EQ(DlmAttentionSplits(32, 41, 1256, 132), 8);    // one wave of 2 CTAs per SM
  EXPECT_EQ(DlmAttentionSplits(32, 256, 1256, 132), 2);   // 4 row blocks per head
  EXPECT_EQ(DlmAttentionSplits(32, 1256, 1256, 132), 1);  // 20 row blocks: enough CTAs
  EXPECT_EQ(DlmAttentionSplits(512, 41, 1256, 132), 1);   // enough entries already
  EXPECT_EQ(DlmAttentionSplits(1, 5, 100, 132), 2);       // at most one split per 64-key tile
  EXPECT_EQ(DlmAttentionWorkFloats(3, 5, 64, 1), 0u);
  EXPECT_EQ(DlmAttentionWorkFloats(3, 5, 64, 4), 3u * 4 * 5 * 66);
}

}  // namespace
}  // namespace prehoc::kernels
