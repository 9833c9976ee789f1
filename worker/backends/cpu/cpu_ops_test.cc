#include "worker/backends/cpu/cpu_ops.h"

#include <cmath>
#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"

namespace prehoc::cpu {
namespace {

std::vector<float> Random(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// Shapes include 1, odd sizes, sizes that are not multiples of the 4x2 register tile, the 8-wide
// vector or the 64 cache tile.
class MatMulTest : public ::testing::TestWithParam<std::tuple<int, int, int, bool>> {};

TEST_P(MatMulTest, MatchesDoublePrecisionReference) {
  auto [n, k, m, with_bias] = GetParam();
  std::vector<float> x = Random(n * k, 1), w = Random(m * k, 2), bias = Random(m, 3);
  std::vector<float> y(n * m, NAN);
  ThreadPool pool(2);
  MatMulNT(x.data(), n, k, w.data(), m, with_bias ? bias.data() : nullptr, y.data(), &pool);
  for (int r = 0; r < n; ++r) {
    for (int c = 0; c < m; ++c) {
      double ref = with_bias ? bias[c] : 0.0;
      double mag = std::abs(ref);
      for (int i = 0; i < k; ++i) {
        ref += static_cast<double>(x[r * k + i]) * w[c * k + i];
        mag += std::abs(static_cast<double>(x[r * k + i]) * w[c * k + i]);
      }
      // fp32 accumulation: error bounded by ~k * eps * sum|terms|.
      ASSERT_NEAR(y[r * m + c], ref, 1e-6 * k * mag + 1e-6) << r << "," << c;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, MatMulTest,
    ::testing::Combine(::testing::Values(1, 3, 4, 5, 67), ::testing::Values(1, 7, 8, 64, 130),
                       ::testing::Values(1, 2, 3, 65, 131), ::testing::Bool()));

TEST(RmsNormTest, MatchesFormula) {
  const int n = 3, d = 37;
  std::vector<float> x = Random(n * d, 4), w = Random(d, 5), y(n * d);
  RmsNorm(x.data(), n, d, w.data(), 1e-5f, y.data());
  for (int i = 0; i < n; ++i) {
    double ss = 0;
    for (int j = 0; j < d; ++j) ss += double(x[i * d + j]) * x[i * d + j];
    const double inv = 1.0 / std::sqrt(ss / d + 1e-5);
    for (int j = 0; j < d; ++j) EXPECT_NEAR(y[i * d + j], w[j] * x[i * d + j] * inv, 1e-5);
  }
}

TEST(SiluMulTest, MatchesFormulaAndAliases) {
  std::vector<float> g = {-3.0f, -0.5f, 0.0f, 0.7f, 20.0f}, u = {1.0f, 2.0f, 3.0f, -1.0f, 0.5f};
  std::vector<float> want(g.size());
  for (size_t i = 0; i < g.size(); ++i) want[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
  SiluMul(g.data(), u.data(), g.size(), g.data());
  for (size_t i = 0; i < g.size(); ++i) EXPECT_NEAR(g[i], want[i], 1e-6);
}

TEST(AttendOneTest, MatchesSoftmaxReferenceAndReturnsProbabilities) {
  const int hd = 16, n = 9;
  std::vector<float> q = Random(hd, 6), K = Random(n * hd, 7), V = Random(n * hd, 8);
  std::vector<const float*> kp(n), vp(n);
  for (int j = 0; j < n; ++j) {
    kp[j] = K.data() + j * hd;
    vp[j] = V.data() + j * hd;
  }
  std::vector<float> scores(n), out(hd);
  const float scale = 0.25f;
  AttendOne(q.data(), kp.data(), vp.data(), n, hd, scale, scores.data(), out.data());
  std::vector<double> s(n);
  double mx = -1e30, sum = 0;
  for (int j = 0; j < n; ++j) {
    s[j] = 0;
    for (int d = 0; d < hd; ++d) s[j] += double(q[d]) * K[j * hd + d];
    s[j] *= scale;
    mx = std::max(mx, s[j]);
  }
  for (int j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - mx));
  double psum = 0;
  for (int j = 0; j < n; ++j) {
    EXPECT_NEAR(scores[j], s[j] / sum, 1e-6);
    psum += scores[j];
  }
  EXPECT_NEAR(psum, 1.0, 1e-5);
  for (int d = 0; d < hd; ++d) {
    double ref = 0;
    for (int j = 0; j < n; ++j) ref += s[j] / sum * V[j * hd + d];
    EXPECT_NEAR(out[d], ref, 1e-5);
  }
}

TEST(AttendOneTest, SingleKeyReturnsItsValue) {
  std::vector<float> q = {1, 2}, k = {3, 4}, v = {5, -6};
  const float* kp = k.data();
  const float* vp = v.data();
  float score, out[2];
  AttendOne(q.data(), &kp, &vp, 1, 2, 1.0f, &score, out);
  EXPECT_FLOAT_EQ(score, 1.0f);
  EXPECT_FLOAT_EQ(out[0], 5.0f);
  EXPECT_FLOAT_EQ(out[1], -6.0f);
}

TEST(AttendOneTest, LargeScoresDoNotOverflow) {
  std::vector<float> q = {1000, 0}, k = {1000, 0, -1000, 0}, v = {1, 1, 2, 2};
  const float* kp[2] = {k.data(), k.data() + 2};
  const float* vp[2] = {v.data(), v.data() + 2};
  float scores[2], out[2];
  AttendOne(q.data(), kp, vp, 2, 2, 1.0f, scores, out);
  EXPECT_FALSE(std::isnan(out[0]));
  EXPECT_FLOAT_EQ(out[0], 1.0f);
}

}  // namespace
}  // namespace prehoc::cpu

namespace prehoc::cpu {
namespace {
TEST(DotTest, MatchesDoubleReferenceForAllTailLengths) {
  for (int n : {0, 1, 7, 8, 9, 15, 16, 17, 64, 100, 128}) {
    std::vector<float> a = Random(n, 10 + n), b = Random(n, 20 + n);
    double ref = 0, mag = 0;
    for (int i = 0; i < n; ++i) {
      ref += double(a[i]) * b[i];
      mag += std::abs(double(a[i]) * b[i]);
    }
    EXPECT_NEAR(Dot(a.data(), b.data(), n), ref, 1e-6 * (n + 1) * (mag + 1)) << n;
  }
}
}  // namespace
}  // namespace prehoc::cpu
