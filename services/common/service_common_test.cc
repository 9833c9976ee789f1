#include <cstdio>
#include <filesystem>
#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/common/clock_offset.h"
#include "services/common/flags.h"
#include "services/common/proto_convert.h"

namespace prehoc {
namespace {

using ::testing::HasSubstr;

TEST(FlagSetTest, ParsesFormsConfigFileAndReportsBadFlags) {
  std::string model = "m";
  int port = 1;
  double d = 0.5;
  bool flag = false;
  int64_t big = 0;
  FlagSet f("Usage: x");
  f.String("model", &model, "model dir");
  f.Int("port", &port, "port");
  f.Double("drain", &d, "seconds");
  f.Bool("verbose", &flag, "verbose");
  f.Int64("bytes", &big, "bytes");
  const std::string cfg =
      (std::filesystem::temp_directory_path() / ("flags_test_" + std::to_string(getpid()))).string();
  {
    std::ofstream out(cfg);
    out << R"({"port": 7, "model": "from-file", "verbose": true, "drain": 2.5})";
  }
  bool help = false;
  ASSERT_TRUE(f.Parse({"prog", "--config", cfg, "--port=9", "--bytes", "123"}, 1, &help).ok());
  EXPECT_EQ(port, 9);  // the command line wins over the file
  EXPECT_EQ(model, "from-file");
  EXPECT_TRUE(flag);
  EXPECT_DOUBLE_EQ(d, 2.5);
  EXPECT_EQ(big, 123);
  EXPECT_FALSE(help);
  ASSERT_TRUE(f.Parse({"prog", "--no-verbose", "-h"}, 1, &help).ok());
  EXPECT_FALSE(flag);
  EXPECT_TRUE(help);
  EXPECT_THAT(std::string(f.Parse({"prog", "--nope"}, 1, &help).message()), HasSubstr("--nope"));
  EXPECT_THAT(std::string(f.Parse({"prog", "--port", "x"}, 1, &help).message()),
              HasSubstr("--port"));
  EXPECT_THAT(std::string(f.Parse({"prog", "--port"}, 1, &help).message()), HasSubstr("--port"));
  {
    std::ofstream out(cfg);
    out << R"({"colour": 1})";
  }
  EXPECT_THAT(std::string(f.Parse({"prog", "--config=" + cfg}, 1, &help).message()),
              HasSubstr("colour"));
  std::remove(cfg.c_str());
  EXPECT_THAT(f.Usage(), HasSubstr("--model"));
}

TEST(FlagSetTest, TellsSetFlagsFromDefaultsAndParsesUnsigned) {
  std::string prompt;
  uint64_t seed = 7;
  bool eos = true;
  FlagSet f("Usage: x");
  f.String("prompt", &prompt, "text");
  f.Uint64("seed", &seed, "seed");
  f.Bool("stop-at-eos", &eos, "stop");
  bool help = false;
  ASSERT_TRUE(f.Parse({"prog", "--prompt=", "--seed", "18446744073709551615"}, 1, &help).ok());
  EXPECT_TRUE(f.IsSet("prompt"));  // set, although to the default (empty) value
  EXPECT_TRUE(f.IsSet("seed"));
  EXPECT_EQ(seed, 18446744073709551615u);
  EXPECT_FALSE(f.IsSet("stop-at-eos"));
  ASSERT_TRUE(f.Parse({"prog", "--no-stop-at-eos"}, 1, &help).ok());
  EXPECT_FALSE(f.IsSet("prompt"));  // each Parse starts afresh
  EXPECT_TRUE(f.IsSet("stop-at-eos"));
  EXPECT_FALSE(eos);
  EXPECT_THAT(std::string(f.Parse({"prog", "--seed", "-1"}, 1, &help).message()),
              HasSubstr("invalid value '-1' for --seed"));
}

TEST(ProtoConvertTest, RoundTripsRequestsAndEvents) {
  v1::GenerateRequest p;
  p.set_model("tiny");
  p.mutable_token_ids()->add_ids(256);
  p.mutable_token_ids()->add_ids(5);
  p.set_max_tokens(9);
  p.set_request_id("r1");
  p.mutable_sampling()->set_temperature(0.7f);
  p.mutable_sampling()->set_seed(42);
  p.mutable_sparsity()->set_policy(v1::SparsityParams::PRHS);
  p.mutable_sparsity()->set_budget_fraction(0.125f);
  p.mutable_sparsity()->set_target_delta(0.05f);
  auto r = FromProto(p);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->token_ids, (std::vector<int32_t>{256, 5}));
  EXPECT_EQ(r->sparsity.policy, "prhs");
  EXPECT_DOUBLE_EQ(r->sparsity.budget, 0.125);
  EXPECT_FLOAT_EQ(r->sampling.top_p, 1.0f);  // 0 = off
  EXPECT_EQ(r->sampling.seed, 42u);
  v1::GenerateRequest back = ToProto(*r);
  EXPECT_EQ(back.SerializeAsString(), ToProto(*FromProto(back)).SerializeAsString());
  EXPECT_EQ(back.sparsity().policy(), v1::SparsityParams::PRHS);

  v1::GenerateRequest none;
  none.set_max_tokens(1);
  EXPECT_THAT(std::string(FromProto(none).status().message()), HasSubstr("prompt"));
  v1::GenerateRequest random_seed;
  random_seed.set_text("x");
  random_seed.mutable_sampling()->set_temperature(1.0f);
  EXPECT_NE(FromProto(random_seed)->sampling.seed, 0u);

  InferenceEvent e;
  e.first = true;
  e.request_id = "r1";
  e.served_by = "w1";
  e.tokens = {1, 2};
  e.text = "ab";
  InferenceEvent f;
  f.tokens = {3};
  f.finished = true;
  f.finish_reason = "eos";
  f.completion_tokens = 3;
  f.sparsity.policy = "prhs";
  f.sparsity.refreshes = 4;
  v1::GenerateResponse merged;
  AppendEvent(e, &merged);
  AppendEvent(f, &merged);
  EXPECT_EQ(merged.token_ids_size(), 3);
  EXPECT_EQ(merged.request_id(), "r1");
  InferenceEvent parsed = EventFromProto(merged);
  EXPECT_TRUE(parsed.first);
  EXPECT_TRUE(parsed.finished);
  EXPECT_EQ(parsed.served_by, "w1");
  EXPECT_EQ(parsed.sparsity.refreshes, 4);
  EXPECT_EQ(parsed.tokens, (std::vector<int32_t>{1, 2, 3}));
}

// A peer whose clock runs `skew` ahead; each round trip has `up` and `down` one-way delays.
TEST(ClockOffsetEstimatorTest, RecoversAnInjectedOffsetWithinHalfTheRoundTrip) {
  for (const absl::Duration skew : {absl::Hours(1), -absl::Minutes(7), absl::ZeroDuration()}) {
    ClockOffsetEstimator est(/*window=*/4);
    EXPECT_FALSE(est.estimate().has_value());
    const absl::Time peer_stamp = absl::FromUnixSeconds(1700000000);
    EXPECT_EQ(est.ToLocal(peer_stamp), peer_stamp);  // no sample: unchanged
    absl::Time local = absl::FromUnixSeconds(1800000000);
    // Asymmetric trips (the estimate is off by (up − down) / 2 <= rtt / 2), then a symmetric
    // one with the smallest round trip, then slower ones: the min-RTT sample wins.
    const std::vector<std::pair<absl::Duration, absl::Duration>> trips = {
        {absl::Milliseconds(40), absl::Milliseconds(2)},
        {absl::Milliseconds(1), absl::Milliseconds(1)},
        {absl::Milliseconds(3), absl::Milliseconds(90)},
    };
    for (const auto& [up, down] : trips) {
      const absl::Time sent = local;
      const absl::Time peer = sent + up + skew;
      const absl::Time received = sent + up + down;
      est.AddSample(sent, peer, received);
      const auto e = est.estimate();
      ASSERT_TRUE(e.has_value());
      EXPECT_LE(absl::AbsDuration(e->offset - skew), e->rtt / 2);
      local += absl::Seconds(1);
    }
    EXPECT_EQ(est.estimate()->rtt, absl::Milliseconds(2));
    EXPECT_EQ(est.estimate()->offset, skew);  // symmetric trip: exact
    EXPECT_EQ(est.ToLocal(peer_stamp), peer_stamp - skew);
    // The window forgets the best sample after `window` newer ones.
    for (int i = 0; i < 4; ++i) {
      est.AddSample(local, local + absl::Milliseconds(5) + skew, local + absl::Milliseconds(10));
      local += absl::Seconds(1);
    }
    EXPECT_EQ(est.estimate()->rtt, absl::Milliseconds(10));
    EXPECT_EQ(est.estimate()->offset, skew);
    est.AddSample(local, local, local - absl::Seconds(1));  // received before sent: ignored
    EXPECT_EQ(est.estimate()->rtt, absl::Milliseconds(10));
    est.Reset();
    EXPECT_FALSE(est.estimate().has_value());
  }
}

}  // namespace
}  // namespace prehoc
