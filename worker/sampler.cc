#include "worker/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace prehoc {

absl::Status SamplingOptions::Validate() const {
  if (!std::isfinite(temperature) || temperature < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be finite and >= 0, got ", temperature));
  }
  if (top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", top_k));
  if (!(top_p > 0.0f && top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", top_p));
  }
  return absl::OkStatus();
}

absl::Status TokenDraw::Validate() const {
  if (!wanted) return absl::OkStatus();
  RETURN_IF_ERROR(options.Validate());
  if (!(u >= 0.0 && u < 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("u must be in [0, 1), got ", u));
  }
  return absl::OkStatus();
}

absl::Status ValidateDraws(size_t items, std::span<const TokenDraw> draws) {
  if (draws.size() != items) {
    return absl::InvalidArgumentError(
        absl::StrCat("step has ", items, " items but ", draws.size(), " draws"));
  }
  for (size_t b = 0; b < draws.size(); ++b) {
    if (absl::Status s = draws[b].Validate(); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch item ", b, ": draw: ", s.message()));
    }
  }
  return absl::OkStatus();
}

int32_t ArgMax(std::span<const float> values) {
  int32_t best = 0;
  for (size_t i = 1; i < values.size(); ++i) {
    if (values[i] > values[best]) best = static_cast<int32_t>(i);
  }
  return best;
}

Sampler::Sampler(const SamplingOptions& options) : options_(options), rng_(options.seed) {}

double Sampler::NextUniform() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

TokenDraw Sampler::NextDraw() {
  TokenDraw d;
  d.options = options_;
  d.u = options_.temperature == 0.0f ? 0.0 : NextUniform();
  return d;
}

int32_t Sampler::Sample(std::span<const float> logits) {
  if (options_.temperature == 0.0f) return ArgMax(logits);
  return SampleWithUniform(logits, options_, NextUniform());
}

int32_t SampleWithUniform(std::span<const float> logits, const SamplingOptions& options, double u,
                          int32_t* candidates) {
  if (options.temperature == 0.0f) {
    if (candidates != nullptr) *candidates = 1;
    return ArgMax(logits);
  }
  const int32_t n = static_cast<int32_t>(logits.size());
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  // Sort by logit descending, lower id first on ties: a total order, so results are portable.
  auto by_logit = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  int32_t keep = n;
  if (options.top_k > 0 && options.top_k < n) {
    keep = options.top_k;
    std::partial_sort(order.begin(), order.begin() + keep, order.end(), by_logit);
  } else {
    std::sort(order.begin(), order.end(), by_logit);
  }
  const double inv_t = 1.0 / options.temperature;
  const double max_l = logits[order[0]];
  std::vector<double> p(keep);
  double sum = 0;
  for (int32_t i = 0; i < keep; ++i) {
    p[i] = std::exp((logits[order[i]] - max_l) * inv_t);
    sum += p[i];
  }
  if (options.top_p < 1.0f) {
    double acc = 0;
    int32_t cut = keep;
    for (int32_t i = 0; i < keep; ++i) {
      acc += p[i] / sum;
      if (acc >= options.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    sum = 0;
    for (int32_t i = 0; i < keep; ++i) sum += p[i];
  }
  if (candidates != nullptr) *candidates = keep;
  const double x = u * sum;
  double acc = 0;
  for (int32_t i = 0; i < keep; ++i) {
    acc += p[i];
    if (x < acc) return order[i];
  }
  return order[keep - 1];
}

}  // namespace prehoc
