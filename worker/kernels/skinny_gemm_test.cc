// SkinnyGemmBf16 against a float64 CPU reference of the same bf16 inputs (label gpu; skipped
// without a device). Bound per output: |gpu − ref| <= 1e-5 · Σ_k |x_k w_k| + 1e-30 (f32
// accumulation in a fixed order; measured well below), finite everywhere.
#include "worker/kernels/skinny_gemm.h"

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <tuple>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "worker/testing/gpu_test_util.h"

namespace prehoc::kernels {
namespace {

bool HaveSm90() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    return false;
  }
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  return major >= 9;
}

struct Problem {
  int m, n, k, ldx, ldw, ldy;
  float beta;
  std::vector<uint16_t> x, w;
  std::vector<float> y0;
};

Problem Make(int m, int n, int k, int pad, float beta, uint32_t seed) {
  Problem p{m, n, k, k + pad, k + pad, n + (pad > 0 ? 3 : 0), beta, {}, {}, {}};
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  p.x.resize(static_cast<size_t>(m) * p.ldx);
  p.w.resize(static_cast<size_t>(n) * p.ldw);
  p.y0.resize(static_cast<size_t>(m) * p.ldy);
  for (auto& v : p.x) v = FloatToBf16(u(rng));
  for (auto& v : p.w) v = FloatToBf16(0.05f * u(rng));
  for (auto& v : p.y0) v = u(rng);
  return p;
}

// Runs the kernel on p (splits as given) and returns Y.
std::vector<float> RunGpu(const Problem& p, int splits, cudaError_t* err) {
  uint16_t* dx = Upload(p.x);
  uint16_t* dw = Upload(p.w);
  float* dy = Upload(p.y0);
  SkinnyGemmParams sp;
  sp.d_x = dx;
  sp.m = p.m;
  sp.k = p.k;
  sp.ldx = p.ldx;
  sp.d_w = dw;
  sp.n = p.n;
  sp.ldw = p.ldw;
  sp.d_y = dy;
  sp.ldy = p.ldy;
  sp.beta = p.beta;
  sp.splits = splits;
  *err = SkinnyGemmBf16(sp, nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> y = Download(dy, p.y0.size());
  cudaFree(dx);
  cudaFree(dw);
  cudaFree(dy);
  return y;
}

// Checks y against the reference; padding columns of Y (>= n) must be untouched.
void Check(const Problem& p, const std::vector<float>& y, const std::string& what) {
  double worst = 0;
  int bad = 0;
  for (int i = 0; i < p.m; ++i) {
    for (int j = 0; j < p.ldy; ++j) {
      const size_t at = static_cast<size_t>(i) * p.ldy + j;
      if (j >= p.n) {
        if (y[at] != p.y0[at] && bad++ < 5) ADD_FAILURE() << what << " wrote padding " << i;
        continue;
      }
      double ref = 0, scale = 0;
      for (int kk = 0; kk < p.k; ++kk) {
        const double t =
            static_cast<double>(Bf16ToFloat(p.x[static_cast<size_t>(i) * p.ldx + kk])) *
            Bf16ToFloat(p.w[static_cast<size_t>(j) * p.ldw + kk]);
        ref += t;
        scale += std::fabs(t);
      }
      if (p.beta != 0.0f) {
        ref += static_cast<double>(p.beta) * p.y0[at];
        scale += std::fabs(static_cast<double>(p.beta) * p.y0[at]);
      }
      const double diff = std::fabs(y[at] - ref);
      if (!std::isfinite(y[at]) || diff > 1e-5 * scale + 1e-30) {
        if (bad++ < 5) {
          ADD_FAILURE() << what << " Y[" << i << "][" << j << "] = " << y[at] << ", ref " << ref;
        }
      }
      if (scale > 0) worst = std::max(worst, diff / scale);
    }
  }
  EXPECT_EQ(bad, 0) << what;
  std::printf("  %s: worst |err| / sum|x w| = %.2e\n", what.c_str(), worst);
}

// (m, n, k, padding of the leading dimensions, beta).
using Shape = std::tuple<int, int, int, int, float>;
class SkinnyGemmTest : public ::testing::TestWithParam<Shape> {};

TEST_P(SkinnyGemmTest, MatchesReference) {
  if (!HaveSm90()) GTEST_SKIP() << "no sm_90 CUDA device";
  const auto [m, n, k, pad, beta] = GetParam();
  const Problem p = Make(m, n, k, pad, beta, static_cast<uint32_t>(m * 7919 + n * 31 + k));
  cudaError_t err;
  const std::vector<float> y = RunGpu(p, 0, &err);
  ASSERT_EQ(err, cudaSuccess);
  Check(p, y, "m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SkinnyGemmTest,
    ::testing::Values(Shape{1, 1, 8, 0, 0.0f}, Shape{1, 17, 24, 8, 0.0f},
                      Shape{7, 129, 136, 0, 1.0f}, Shape{8, 128, 128, 0, 0.0f},
                      Shape{9, 255, 264, 16, 0.5f}, Shape{16, 300, 1000, 0, 0.0f},
                      Shape{33, 1000, 520, 8, 1.0f}, Shape{41, 4096, 4096, 0, 0.0f},
                      Shape{57, 777, 2056, 0, 1.0f}, Shape{63, 130, 12288, 0, 1.0f},
                      Shape{64, 2049, 4096, 8, 0.0f}, Shape{64, 64, 8, 0, 1.0f},
                      Shape{24, 8192, 384, 0, 0.0f}, Shape{5, 40000, 64, 0, 0.0f}));

// Every split count gives the reference; a repeated call is bitwise identical (no atomics).
TEST(SkinnyGemmSplitsTest, EverySplitAndDeterministic) {
  if (!HaveSm90()) GTEST_SKIP() << "no sm_90 CUDA device";
  const Problem p = Make(41, 300, 1160, 0, 1.0f, 3);
  for (int s = 1; s <= 8; ++s) {
    cudaError_t e1, e2;
    const std::vector<float> a = RunGpu(p, s, &e1);
    const std::vector<float> b = RunGpu(p, s, &e2);
    ASSERT_EQ(e1, cudaSuccess);
    ASSERT_EQ(e2, cudaSuccess);
    Check(p, a, "splits=" + std::to_string(s));
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * 4)) << "splits " << s;
  }
}

TEST(SkinnyGemmSplitsTest, AutoSplitFillsWaves) {
  // LLaDA-8B shapes on 132 SMs (2 CTAs each, 264 slots): Q/O and down 32 row blocks → 8 splits
  // (256 CTAs, 97 % of one wave); K/V 64 → 4 (256); gate/up 192 → 4 (768 = 97 % of 3 waves,
  // against 73 % for 1); the LM head 988 → 4 (3952 of 15 waves' 3960).
  EXPECT_EQ(SkinnyGemmSplits(4096, 4096, 132), 8);
  EXPECT_EQ(SkinnyGemmSplits(4096, 12288, 132), 8);
  EXPECT_EQ(SkinnyGemmSplits(8192, 4096, 132), 4);
  EXPECT_EQ(SkinnyGemmSplits(24576, 4096, 132), 4);
  EXPECT_EQ(SkinnyGemmSplits(126464, 4096, 132), 4);
  EXPECT_EQ(SkinnyGemmSplits(4096, 256, 132), 2);  // only 2 k chunks
}

TEST(SkinnyGemmRefusalTest, BadArgumentsAreRefused) {
  SkinnyGemmParams p;
  alignas(16) static uint16_t buf[256];
  static float out[64 * 16];
  p.d_x = buf;
  p.d_w = buf;
  p.d_y = out;
  p.m = 4;
  p.n = 16;
  p.k = 16;
  p.ldx = p.ldw = 16;
  p.ldy = 16;
  EXPECT_TRUE(SkinnyGemmSupported(p));
  SkinnyGemmParams q = p;
  q.m = kSkinnyGemmMaxRows + 1;
  EXPECT_FALSE(SkinnyGemmSupported(q));
  q = p;
  q.k = 12;
  EXPECT_FALSE(SkinnyGemmSupported(q));
  q = p;
  q.d_x = buf + 1;  // 2-byte aligned
  EXPECT_FALSE(SkinnyGemmSupported(q));
  q = p;
  q.ldy = 15;
  EXPECT_FALSE(SkinnyGemmSupported(q));
  q = p;
  q.splits = 9;
  EXPECT_FALSE(SkinnyGemmSupported(q));
  EXPECT_EQ(SkinnyGemmBf16(q, nullptr), cudaErrorInvalidValue);
  q = p;
  q.m = 0;  // nothing to do, nothing launched
  EXPECT_EQ(SkinnyGemmBf16(q, nullptr), cudaSuccess);
}

// beta == 0 never reads Y: NaN there does not leak into the result.
TEST(SkinnyGemmBetaTest, BetaZeroIgnoresOldY) {
  if (!HaveSm90()) GTEST_SKIP() << "no sm_90 CUDA device";
  Problem p = Make(13, 200, 264, 0, 0.0f, 9);
  const std::vector<float> y0 = p.y0;
  for (auto& v : p.y0) v = std::numeric_limits<float>::quiet_NaN();
  cudaError_t err;
  const std::vector<float> y = RunGpu(p, 0, &err);
  ASSERT_EQ(err, cudaSuccess);
  p.y0 = y0;  // reference with beta 0 does not use it
  Check(p, y, "beta 0 over NaN");
}

}  // namespace
}  // namespace prehoc::kernels
