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

}  // namespace
}  // namespace prehoc::kernels
