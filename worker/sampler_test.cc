#include "worker/sampler.h"

#include <cmath>
#include <map>
#include <vector>

#include "gtest/gtest.h"

namespace prehoc {
namespace {

TEST(SamplerTest, GreedyPicksArgmaxLowestIdOnTies) {
  Sampler s(SamplingOptions{});
  std::vector<float> l = {0.1f, 2.0f, -1.0f, 2.0f};
  EXPECT_EQ(s.Sample(l), 1);
}

TEST(SamplerTest, SameSeedSameTokensDifferentSeedDiffers) {
  std::vector<float> l(50);
  for (int i = 0; i < 50; ++i) l[i] = 0.1f * (i % 7);
  SamplingOptions o;
  o.temperature = 1.0f;
  o.seed = 42;
  Sampler a(o), b(o);
  std::vector<int32_t> ta, tb, tc;
  for (int i = 0; i < 64; ++i) {
    ta.push_back(a.Sample(l));
    tb.push_back(b.Sample(l));
  }
  EXPECT_EQ(ta, tb);
  o.seed = 43;
  Sampler c(o);
  for (int i = 0; i < 64; ++i) tc.push_back(c.Sample(l));
  EXPECT_NE(ta, tc);
}

TEST(SamplerTest, TopKOneIsGreedy) {
  SamplingOptions o;
  o.temperature = 5.0f;
  o.top_k = 1;
  Sampler s(o);
  std::vector<float> l = {0.0f, 0.5f, 0.4f};
  for (int i = 0; i < 20; ++i) EXPECT_EQ(s.Sample(l), 1);
}

TEST(SamplerTest, TopKRestrictsSupport) {
  SamplingOptions o;
  o.temperature = 1.0f;
  o.top_k = 2;
  o.seed = 7;
  Sampler s(o);
  std::vector<float> l = {1.0f, 3.0f, 2.9f, 0.0f};
  for (int i = 0; i < 200; ++i) {
    int32_t t = s.Sample(l);
    EXPECT_TRUE(t == 1 || t == 2) << t;
  }
}

TEST(SamplerTest, TopPKeepsSmallestPrefixReachingMass) {
  // probabilities ~ {0.6, 0.3, 0.1} at T=1.
  std::vector<float> l = {std::log(0.6f), std::log(0.3f), std::log(0.1f)};
  SamplingOptions o;
  o.temperature = 1.0f;
  o.top_p = 0.85f;
  o.seed = 3;
  Sampler s(o);
  std::map<int32_t, int> counts;
  for (int i = 0; i < 3000; ++i) counts[s.Sample(l)]++;
  EXPECT_EQ(counts.count(2), 0u);
  // Renormalised {2/3, 1/3}.
  EXPECT_NEAR(counts[0] / 3000.0, 2.0 / 3.0, 0.04);
}

TEST(SamplerTest, TemperatureSamplingFollowsDistribution) {
  std::vector<float> l = {0.0f, std::log(3.0f)};  // p = {0.25, 0.75}
  SamplingOptions o;
  o.temperature = 1.0f;
  o.seed = 11;
  Sampler s(o);
  int ones = 0;
  for (int i = 0; i < 4000; ++i) ones += s.Sample(l) == 1;
  EXPECT_NEAR(ones / 4000.0, 0.75, 0.03);
}

// SampleWithUniform is the draw of Sample without the generator: the inverse CDF of the sorted
// candidates (ties by lower id) at u, and the candidate count of each cut.
TEST(SamplerTest, SampleWithUniformInverseCdfAndCandidates) {
  // Temperature 1: p ∝ {e^2, 1, e^2, 1, 1} -> sorted ids {0, 2, 1, 3, 4}; mass e^2·2 + 3.
  const std::vector<float> l = {2.0f, 0.0f, 2.0f, 0.0f, 0.0f};
  const double e2 = std::exp(2.0), mass = 2 * e2 + 3;
  int32_t cand = 0;
  EXPECT_EQ(SampleWithUniform(l, SamplingOptions{1.0f, 0, 1.0f}, 0.0, &cand), 0);
  EXPECT_EQ(cand, 5);
  EXPECT_EQ(SampleWithUniform(l, SamplingOptions{1.0f, 0, 1.0f}, (e2 + 0.5) / mass), 2);
  EXPECT_EQ(SampleWithUniform(l, SamplingOptions{1.0f, 0, 1.0f}, (2 * e2 + 0.5) / mass), 1);
  EXPECT_EQ(SampleWithUniform(l, SamplingOptions{1.0f, 0, 1.0f}, 0.999999), 4);
  // Nucleus: the two leaders hold 2e²/(2e²+3) ≈ 0.83 -> top_p 0.8 keeps them.
  EXPECT_EQ(SampleWithUniform(l, SamplingOptions{1.0f, 0, 0.8f}, 0.75, &cand), 2);
  EXPECT_EQ(cand, 2);
  EXPECT_EQ(SampleWithUniform(l, SamplingOptions{1.0f, 3, 1.0f}, 0.999, &cand), 1);
  EXPECT_EQ(cand, 3);
  EXPECT_EQ(SampleWithUniform(l, SamplingOptions{0.0f, 3, 0.5f}, 0.999, &cand), 0);
  EXPECT_EQ(cand, 1);
  // Sample = SampleWithUniform at the generator's next uniform.
  SamplingOptions o{0.9f, 4, 0.95f, 21};
  Sampler a(o), b(o);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(a.Sample(l), SampleWithUniform(l, o, b.NextUniform()));
}

// NextDraw gives what Sample would have: greedy draws take no uniform (the stream stays in step
// with Sample's), sampled ones take the next one.
TEST(SamplerTest, NextDrawReproducesSample) {
  std::vector<float> l(40);
  for (int i = 0; i < 40; ++i) l[i] = 0.3f * static_cast<float>((i * 7) % 11);
  for (const SamplingOptions& o :
       {SamplingOptions{}, SamplingOptions{0.8f, 0, 0.9f, 5}, SamplingOptions{1.2f, 6, 1.0f, 9}}) {
    Sampler a(o), b(o);
    for (int i = 0; i < 40; ++i) {
      const TokenDraw d = b.NextDraw();
      EXPECT_TRUE(d.wanted);
      EXPECT_EQ(d.options.temperature, o.temperature);
      if (o.temperature == 0.0f) EXPECT_EQ(d.u, 0.0);
      EXPECT_EQ(a.Sample(l), SampleWithUniform(l, d.options, d.u)) << "draw " << i;
    }
    EXPECT_EQ(a.NextUniform(), b.NextUniform());  // same position in the stream
  }
}

TEST(TokenDrawTest, ValidateNamesTheFieldAndTheItem) {
  TokenDraw d;
  EXPECT_TRUE(d.Validate().ok());
  d.u = 1.0;
  EXPECT_NE(d.Validate().message().find("u must be in [0, 1)"), std::string::npos);
  d.u = NAN;
  EXPECT_FALSE(d.Validate().ok());
  d.wanted = false;  // an unwanted draw is not looked at
  EXPECT_TRUE(d.Validate().ok());
  TokenDraw bad;
  bad.options.top_p = 2;
  const std::vector<TokenDraw> draws = {TokenDraw{}, bad};
  const absl::Status s = ValidateDraws(2, draws);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("batch item 1"), std::string::npos) << s;
  EXPECT_NE(s.message().find("top_p"), std::string::npos) << s;
  EXPECT_NE(ValidateDraws(3, draws).message().find("3 items but 2 draws"), std::string::npos);
}

TEST(SamplingOptionsTest, ValidateNamesTheField) {
  SamplingOptions o;
  EXPECT_TRUE(o.Validate().ok());
  o.temperature = -1;
  EXPECT_NE(o.Validate().message().find("temperature"), std::string::npos);
  o = SamplingOptions{};
  o.top_p = 0;
  EXPECT_NE(o.Validate().message().find("top_p"), std::string::npos);
  o = SamplingOptions{};
  o.top_k = -2;
  EXPECT_NE(o.Validate().message().find("top_k"), std::string::npos);
}

}  // namespace
}  // namespace prehoc
