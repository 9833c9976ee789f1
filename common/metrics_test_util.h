// Test helper: reads one metric from a prometheus-cpp registry (tests assert on Collect()).
#ifndef PREHOC_COMMON_METRICS_TEST_UTIL_H_
#define PREHOC_COMMON_METRICS_TEST_UTIL_H_

#include <map>
#include <string>

#include "prometheus/registry.h"

namespace prehoc::testing {

// The value of the first child of family `name` carrying every label in `labels` (others may be
// present): a counter's or gauge's value, a histogram's sample count. -1 when there is none.
inline double MetricValue(prometheus::Registry& registry, const std::string& name,
                          const std::map<std::string, std::string>& labels) {
  for (const auto& family : registry.Collect()) {
    if (family.name != name) continue;
    for (const auto& metric : family.metric) {
      bool match = true;
      for (const auto& [key, value] : labels) {
        bool found = false;
        for (const auto& pair : metric.label) found |= pair.name == key && pair.value == value;
        match &= found;
      }
      if (!match) continue;
      switch (family.type) {
        case prometheus::MetricType::Counter: return metric.counter.value;
        case prometheus::MetricType::Gauge: return metric.gauge.value;
        case prometheus::MetricType::Histogram:
          return static_cast<double>(metric.histogram.sample_count);
        default: return -1;
      }
    }
  }
  return -1;
}

// The sum of family `name`'s counter and gauge values over all its children; 0 when it has none.
inline double MetricSum(prometheus::Registry& registry, const std::string& name) {
  double sum = 0;
  for (const auto& family : registry.Collect()) {
    if (family.name != name) continue;
    for (const auto& metric : family.metric) sum += metric.counter.value + metric.gauge.value;
  }
  return sum;
}

}  // namespace prehoc::testing

#endif  // PREHOC_COMMON_METRICS_TEST_UTIL_H_
