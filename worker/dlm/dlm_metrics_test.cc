#include "worker/dlm/dlm_metrics.h"

#include "gtest/gtest.h"

namespace prehoc::dlm {
namespace {

double Value(prometheus::Registry& reg, const std::string& name,
             const std::map<std::string, std::string>& labels) {
  for (const auto& fam : reg.Collect()) {
    if (fam.name != name) continue;
    for (const auto& m : fam.metric) {
      bool match = true;
      for (const auto& [k, v] : labels) {
        bool found = false;
        for (const auto& lp : m.label) found |= (lp.name == k && lp.value == v);
        match &= found;
      }
      if (!match) continue;
      if (fam.type == prometheus::MetricType::Counter) return m.counter.value;
      if (fam.type == prometheus::MetricType::Histogram) return static_cast<double>(m.histogram.sample_count);
    }
  }
  return -1;
}

TEST(DlmMetricsTest, RecordsStepsTokensAndPerLayerRecompute) {
  prometheus::Registry reg;
  DlmMetrics metrics(reg, "m", 2);
  DiffuseResult r;
  r.schedule.policy = DlmCachePolicy::kSpa;
  r.stats.steps = 10;
  r.stats.full_steps = 1;
  r.stats.gen_refresh_steps = 2;
  r.stats.partial_steps = 7;
  r.stats.decoded_tokens = 10;
  r.stats.seconds = 2;
  r.stats.forward.Resize(2);
  r.stats.forward.q_rows = {100, 30};
  r.stats.forward.kv_rows = {100, 60};
  r.stats.recompute_fraction = {0.5, 0.15};
  metrics.Record(r);
  metrics.Record(r);
  EXPECT_EQ(Value(reg, "prehoc_dlm_requests_total", {{"policy", "spa"}}), 2);
  EXPECT_EQ(Value(reg, "prehoc_dlm_requests_total", {{"policy", "dual"}}), 0);
  EXPECT_EQ(Value(reg, "prehoc_dlm_steps_total", {{"policy", "spa"}, {"kind", "partial"}}), 14);
  EXPECT_EQ(Value(reg, "prehoc_dlm_steps_total", {{"policy", "spa"}, {"kind", "full"}}), 2);
  EXPECT_EQ(Value(reg, "prehoc_dlm_generated_tokens_total", {{"policy", "spa"}}), 20);
  EXPECT_EQ(Value(reg, "prehoc_dlm_decode_seconds_total", {{"policy", "spa"}}), 4);
  EXPECT_EQ(Value(reg, "prehoc_dlm_tokens_recomputed_total", {{"policy", "spa"}, {"layer", "1"}}), 60);
  EXPECT_EQ(Value(reg, "prehoc_dlm_kv_recomputed_total", {{"policy", "spa"}, {"layer", "1"}}), 120);
  EXPECT_EQ(Value(reg, "prehoc_dlm_recompute_fraction", {{"policy", "spa"}}), 2);
  EXPECT_EQ(Value(reg, "prehoc_dlm_tokens_per_second", {{"policy", "spa"}}), 2);
}

}  // namespace
}  // namespace prehoc::dlm
