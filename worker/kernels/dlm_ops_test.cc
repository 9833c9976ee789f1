// dlm_ops kernels against CPU references (label gpu; skipped without a device). Index kernels
// (selection, top-1) match exactly; float kernels meet the stated bounds.
#include "worker/kernels/dlm_ops.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace prehoc::kernels {
namespace {

bool HaveDevice() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    return false;
  }
  return true;
}

template <typename T>
T* Upload(const std::vector<T>& h) {
  T* d = nullptr;
  EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&d), std::max<size_t>(h.size(), 1) * sizeof(T)),
            cudaSuccess);
  if (!h.empty()) {
    EXPECT_EQ(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  return d;
}

template <typename T>
std::vector<T> Download(const T* d, size_t n) {
  std::vector<T> h(n);
  EXPECT_EQ(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

float Bf16ToF(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Segments of 1, 7, 256, 300 and 1000 rows with duplicated values (ties) and k from 0 to len.
TEST(DlmOpsTest, SelectSmallestMatchesReference) {
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device";
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
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device";
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
      EXPECT_NEAR(Bf16ToF(sm[r * V + v]), ref, 1e-7 + 8e-3 * ref) << r << " " << v;
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
  if (!HaveDevice()) GTEST_SKIP() << "no CUDA device";
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
        const double g = Bf16ToF(out[e]);
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

INSTANTIATE_TEST_SUITE_P(Widths, DlmResidualTest, ::testing::Values(1, 7, 200, 4099));

}  // namespace
}  // namespace prehoc::kernels
