#include "worker/rope.h"

#include <cmath>

#include "gtest/gtest.h"

namespace prehoc {
namespace {

ModelConfig Config(int head_dim, double theta) {
  ModelConfig c;
  c.head_dim = head_dim;
  c.rope_theta = theta;
  return c;
}

TEST(RopeTest, UnscaledFrequencies) {
  auto inv = RopeInvFrequencies(Config(8, 10000.0));
  ASSERT_EQ(inv.size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(inv[i], std::pow(10000.0, -2.0 * i / 8), 1e-7);
}

TEST(RopeTest, LinearScalingDividesEveryFrequency) {
  ModelConfig c = Config(16, 10000.0);
  auto base = RopeInvFrequencies(c);
  c.rope_scaling.type = RopeScaling::Type::kLinear;
  c.rope_scaling.factor = 4.0;
  auto scaled = RopeInvFrequencies(c);
  for (size_t i = 0; i < base.size(); ++i) EXPECT_FLOAT_EQ(scaled[i], base[i] / 4.0f);
}

TEST(RopeTest, Llama3ScalingHasThreeRegimes) {
  ModelConfig c = Config(128, 500000.0);
  auto base = RopeInvFrequencies(c);
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 8.0;
  c.rope_scaling.low_freq_factor = 1.0;
  c.rope_scaling.high_freq_factor = 4.0;
  c.rope_scaling.original_max_position_embeddings = 8192;
  auto scaled = RopeInvFrequencies(c);
  int same = 0, divided = 0, blended = 0;
  for (size_t i = 0; i < base.size(); ++i) {
    const double wavelen = 2 * M_PI / base[i];
    if (wavelen < 8192.0 / 4.0) {
      EXPECT_FLOAT_EQ(scaled[i], base[i]);  // high frequency: unchanged
      ++same;
    } else if (wavelen > 8192.0) {
      EXPECT_FLOAT_EQ(scaled[i], base[i] / 8.0f);  // low frequency: divided by factor
      ++divided;
    } else {
      EXPECT_LT(scaled[i], base[i]);  // in between: a blend strictly inside
      EXPECT_GT(scaled[i], base[i] / 8.0f);
      ++blended;
    }
  }
  EXPECT_GT(same, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(blended, 0);
}

TEST(RopeTest, ApplyRopeRotatesPairsAndPreservesNorm) {
  auto inv = RopeInvFrequencies(Config(4, 100.0));
  float x[8] = {1, 2, 3, 4, -1, 0.5f, 2, 0};  // two heads of dim 4
  float orig[8];
  std::copy(x, x + 8, orig);
  ApplyRope(x, 2, 4, 3, inv);
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 2; ++i) {
      const float a = orig[h * 4 + i], b = orig[h * 4 + i + 2];
      const float ang = 3 * inv[i];
      EXPECT_NEAR(x[h * 4 + i], a * std::cos(ang) - b * std::sin(ang), 1e-6);
      EXPECT_NEAR(x[h * 4 + i + 2], b * std::cos(ang) + a * std::sin(ang), 1e-6);
      EXPECT_NEAR(x[h * 4 + i] * x[h * 4 + i] + x[h * 4 + i + 2] * x[h * 4 + i + 2],
                  a * a + b * b, 1e-5);
    }
  }
  float y[4] = {1, 2, 3, 4};
  ApplyRope(y, 1, 4, 0, inv);  // position 0 is the identity
  EXPECT_FLOAT_EQ(y[0], 1);
  EXPECT_FLOAT_EQ(y[3], 4);
}

}  // namespace
}  // namespace prehoc
