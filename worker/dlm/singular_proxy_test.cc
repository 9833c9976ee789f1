#include "worker/dlm/singular_proxy.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"

namespace prehoc::dlm {
namespace {

std::vector<float> RandomMatrix(int m, int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> w(static_cast<size_t>(m) * n);
  for (float& x : w) x = nd(rng);
  return w;
}

// W = A · diag(σ) · B with random orthonormal-ish A [m, k], B [k, n] and a decaying spectrum.
std::vector<float> DecayingMatrix(int m, int n, uint64_t seed) {
  const int k = std::min(m, n);
  std::vector<float> a = RandomMatrix(m, k, seed), b = RandomMatrix(k, n, seed + 1);
  std::vector<float> w(static_cast<size_t>(m) * n, 0.0f);
  for (int t = 0; t < k; ++t) {
    const float s = std::pow(0.7f, static_cast<float>(t));
    for (int i = 0; i < m; ++i) {
      const float ai = a[static_cast<size_t>(i) * k + t] * s;
      for (int j = 0; j < n; ++j) w[static_cast<size_t>(i) * n + j] += ai * b[static_cast<size_t>(t) * n + j];
    }
  }
  return w;
}

double RowDot(const std::vector<float>& p, int n, int i, int j) {
  double s = 0;
  for (int t = 0; t < n; ++t) s += static_cast<double>(p[static_cast<size_t>(i) * n + t]) * p[static_cast<size_t>(j) * n + t];
  return s;
}

TEST(JacobiTest, DecomposesASymmetricMatrix) {
  const int n = 20;
  std::vector<float> r = RandomMatrix(n, n, 7);
  std::vector<double> a(n * n);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) a[i * n + j] = 0.5 * (r[i * n + j] + r[j * n + i]);
  }
  std::vector<double> vals, vecs;
  JacobiEigenSymmetric(a, n, &vals, &vecs);
  for (int i = 0; i + 1 < n; ++i) EXPECT_GE(vals[i], vals[i + 1]);
  for (int i = 0; i < n; ++i) {
    for (int r2 = 0; r2 < n; ++r2) {  // (A v_i)[r2] = λ_i v_i[r2]
      double av = 0;
      for (int c = 0; c < n; ++c) av += a[r2 * n + c] * vecs[i * n + c];
      EXPECT_NEAR(av, vals[i] * vecs[i * n + r2], 1e-10);
    }
    for (int j = 0; j < n; ++j) {
      double d = 0;
      for (int c = 0; c < n; ++c) d += vecs[i * n + c] * vecs[j * n + c];
      EXPECT_NEAR(d, i == j ? 1.0 : 0.0, 1e-12);
    }
  }
}

TEST(SingularProxyTest, KnownSpectrum) {
  // Rows are scaled unit vectors along permuted axes: σ = {5, 3, 2}, v_i = the axes.
  const int m = 3, n = 4;
  std::vector<float> w(m * n, 0.0f);
  w[0 * n + 2] = 2.0f;
  w[1 * n + 0] = -5.0f;
  w[2 * n + 3] = 3.0f;
  auto p = ComputeSingularProxy(w.data(), m, n, 2, nullptr);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_NEAR(p->singular_values[0], 5.0, 1e-12);
  EXPECT_NEAR(p->singular_values[1], 3.0, 1e-12);
  EXPECT_NEAR(std::abs(p->proj[0 * n + 0]), 5.0f, 1e-6);  // σ_1 v_1 = ±5 e_0
  EXPECT_NEAR(std::abs(p->proj[1 * n + 3]), 3.0f, 1e-6);  // σ_2 v_2 = ±3 e_3
  EXPECT_NEAR(p->energy, (25.0 + 9.0) / 38.0, 1e-12);
}

TEST(SingularProxyTest, FullRankReconstructsTheGram) {
  for (auto [m, n] : {std::pair{24, 40}, std::pair{40, 24}}) {
    std::vector<float> w = RandomMatrix(m, n, 3);
    const int r = std::min(m, n);
    auto p = ComputeSingularProxy(w.data(), m, n, r, nullptr);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_NEAR(p->energy, 1.0, 1e-9);
    // Rows orthogonal with squared norms σ_i² (descending).
    for (int i = 0; i < r; ++i) {
      EXPECT_NEAR(RowDot(p->proj, n, i, i), p->singular_values[i] * p->singular_values[i],
                  1e-4 * p->singular_values[0] * p->singular_values[0]);
      if (i + 1 < r) {
        EXPECT_GE(p->singular_values[i], p->singular_values[i + 1]);
      }
      for (int j = i + 1; j < r; ++j) EXPECT_NEAR(RowDot(p->proj, n, i, j), 0.0, 1e-3);
    }
    // Pᵀ P = Wᵀ W (the proxy keeps the whole row space at full rank).
    double max_err = 0, scale = 0;
    for (int a = 0; a < n; ++a) {
      for (int b = 0; b < n; ++b) {
        double ptp = 0, wtw = 0;
        for (int i = 0; i < r; ++i) ptp += static_cast<double>(p->proj[i * n + a]) * p->proj[i * n + b];
        for (int i = 0; i < m; ++i) wtw += static_cast<double>(w[i * n + a]) * w[i * n + b];
        max_err = std::max(max_err, std::abs(ptp - wtw));
        scale = std::max(scale, std::abs(wtw));
      }
    }
    EXPECT_LT(max_err, 1e-5 * scale) << m << "x" << n;
    // ‖P h‖ = ‖W h‖ for any h at full rank (= projection onto the whole left singular space).
    std::vector<float> h = RandomMatrix(1, n, 11);
    double ph = 0, wh = 0;
    for (int i = 0; i < r; ++i) {
      double s = 0;
      for (int t = 0; t < n; ++t) s += static_cast<double>(p->proj[i * n + t]) * h[t];
      ph += s * s;
    }
    for (int i = 0; i < m; ++i) {
      double s = 0;
      for (int t = 0; t < n; ++t) s += static_cast<double>(w[i * n + t]) * h[t];
      wh += s * s;
    }
    EXPECT_NEAR(ph, wh, 1e-4 * wh);
  }
}

TEST(SingularProxyTest, RandomisedPathMatchesExact) {
  const int m = 96, n = 160, r = 8;
  std::vector<float> w = DecayingMatrix(m, n, 5);
  ThreadPool pool(2);
  auto exact = ComputeSingularProxy(w.data(), m, n, r, &pool);
  SvdOptions fast;
  fast.exact_max_dim = 32;  // forces the randomised subspace iteration
  auto approx = ComputeSingularProxy(w.data(), m, n, r, &pool, fast);
  ASSERT_TRUE(exact.ok() && approx.ok());
  for (int i = 0; i < r; ++i) {
    EXPECT_NEAR(approx->singular_values[i], exact->singular_values[i], 1e-4 * exact->singular_values[0]);
    // Same direction up to sign.
    double d = 0;
    for (int t = 0; t < n; ++t) d += static_cast<double>(approx->proj[i * n + t]) * exact->proj[i * n + t];
    const double c =
        std::abs(d) / std::sqrt(RowDot(approx->proj, n, i, i) * RowDot(exact->proj, n, i, i));
    EXPECT_GT(c, 0.9999) << i;
  }
  EXPECT_NEAR(approx->energy, exact->energy, 1e-6);
}

TEST(SingularProxyTest, RejectsBadRank) {
  std::vector<float> w = RandomMatrix(4, 6, 1);
  for (int r : {0, -1, 5}) {
    auto p = ComputeSingularProxy(w.data(), 4, 6, r, nullptr);
    ASSERT_FALSE(p.ok()) << r;
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(p.status().message().find("proxy_rank"), std::string::npos);
  }
}

}  // namespace
}  // namespace prehoc::dlm
