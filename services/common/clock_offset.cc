#include "services/common/clock_offset.h"

namespace prehoc {

void ClockOffsetEstimator::AddSample(absl::Time local_sent, absl::Time peer,
                                     absl::Time local_received) {
  const absl::Duration rtt = local_received - local_sent;
  if (rtt < absl::ZeroDuration()) return;
  const absl::Time midpoint = local_sent + rtt / 2;
  absl::MutexLock l(&mu_);
  samples_.push_back({peer - midpoint, rtt});
  while (static_cast<int>(samples_.size()) > window_) samples_.pop_front();
}

void ClockOffsetEstimator::Reset() {
  absl::MutexLock l(&mu_);
  samples_.clear();
}

std::optional<ClockOffsetEstimator::Estimate> ClockOffsetEstimator::estimate() const {
  absl::MutexLock l(&mu_);
  if (samples_.empty()) return std::nullopt;
  const Estimate* best = &samples_.front();
  for (const Estimate& s : samples_) {
    if (s.rtt < best->rtt) best = &s;  // the oldest of equal round trips stays
  }
  return *best;
}

absl::Time ClockOffsetEstimator::ToLocal(absl::Time peer) const {
  const std::optional<Estimate> e = estimate();
  return e.has_value() ? peer - e->offset : peer;
}

}  // namespace prehoc
