#include "worker/dlm/dlm_metrics.h"

#include "common/metrics_test_util.h"
#include "gtest/gtest.h"

namespace prehoc::dlm {
namespace {

using ::prehoc::testing::MetricValue;

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
  r.stats.rows_per_step = {10, 3};
  metrics.Record(r);
  metrics.Record(r);
  metrics.RecordOutcome(DlmCachePolicy::kSpa, absl::OkStatus());
  metrics.RecordOutcome(DlmCachePolicy::kSpa, absl::OkStatus());
  metrics.RecordOutcome(DlmCachePolicy::kSpa, absl::CancelledError("x"));
  metrics.RecordOutcome(DlmCachePolicy::kDual, absl::FailedPreconditionError("x"));
  EXPECT_EQ(MetricValue(reg, "prehoc_dlm_requests_total", {{"policy", "spa"}, {"outcome", "ok"}}), 2);
  EXPECT_EQ(MetricValue(reg, "prehoc_dlm_requests_total", {{"policy", "spa"}, {"outcome", "cancelled"}}),
            1);
  EXPECT_EQ(MetricValue(reg, "prehoc_dlm_requests_total", {{"policy", "dual"}, {"outcome", "ok"}}), 0);
  EXPECT_EQ(MetricValue(reg, "prehoc_dlm_requests_total",
                  {{"policy", "dual"}, {"outcome", "invalid_argument"}}),
            1);
  EXPECT_EQ(MetricValue(reg, "prehoc_dlm_tokens_recomputed_per_step", {{"policy", "spa"}}), 2);
  EXPECT_EQ(MetricValue(reg, "prehoc_dlm_steps_total", {{"policy", "spa"}, {"kind", "partial"}}), 14);
  EXPECT_EQ(MetricValue(reg, "prehoc_dlm_steps_total", {{"policy", "spa"}, {"kind", "full"}}), 2);
  EXPECT_EQ(MetricValue(reg, "prehoc_dlm_generated_tokens_total", {{"policy", "spa"}}), 20);
  EXPECT_EQ(MetricValue(reg, "prehoc_dlm_decode_seconds_total", {{"policy", "spa"}}), 4);
  EXPECT_EQ(MetricValue(reg, "prehoc_dlm_tokens_recomputed_total", {{"policy", "spa"}, {"layer", "1"}}), 60);
  EXPECT_EQ(MetricValue(reg, "prehoc_dlm_kv_recomputed_total", {{"policy", "spa"}, {"layer", "1"}}), 120);
  EXPECT_EQ(MetricValue(reg, "prehoc_dlm_recompute_fraction", {{"policy", "spa"}}), 2);
  EXPECT_EQ(MetricValue(reg, "prehoc_dlm_tokens_per_second", {{"policy", "spa"}}), 2);
  EXPECT_EQ(MetricValue(reg, "prehoc_dlm_batch_size", {{"model", "m"}}), 0);
  metrics.RecordBatch(3);
  metrics.RecordBatch(1);
  EXPECT_EQ(MetricValue(reg, "prehoc_dlm_batch_size", {{"model", "m"}}), 2);
}

}  // namespace
}  // namespace prehoc::dlm
