// Offset between this process's clock and a peer's (the cache manager's), estimated NTP-style
// from request/response round trips in which the peer stamps its clock: for a round trip sent at
// local time t0 and answered at t3, with the peer's stamp s taken in between,
//   offset = s − (t0 + t3) / 2   (peer clock − local clock),   |error| ≤ (t3 − t0) / 2.
// The estimate is the sample with the smallest round trip among the last `window` samples (the
// least queueing, hence the tightest bound), so it follows slow drift and ignores slow trips.
// A worker maps the cache manager's plan time stamps onto its own clock with it, so its
// plan-age metric does not include the clock skew between the machines (docs/metrics.md).
//
// Thread-safe.
#ifndef PREHOC_SERVICES_COMMON_CLOCK_OFFSET_H_
#define PREHOC_SERVICES_COMMON_CLOCK_OFFSET_H_

#include <deque>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace prehoc {

class ClockOffsetEstimator {
 public:
  struct Estimate {
    absl::Duration offset;  // peer clock − local clock
    absl::Duration rtt;     // round trip of the sample it comes from (error bound: rtt / 2)
  };

  explicit ClockOffsetEstimator(int window = 32) : window_(window < 1 ? 1 : window) {}

  // One round trip: sent at `local_sent`, answered at `local_received` (local clock), with the
  // peer's clock reading `peer` taken in between. Samples with received < sent are ignored.
  void AddSample(absl::Time local_sent, absl::Time peer, absl::Time local_received);
  // Forgets every sample (e.g. the peer restarted: it may run on another machine).
  void Reset();
  // The min-RTT sample of the window; nullopt before the first sample.
  std::optional<Estimate> estimate() const;
  // A peer time stamp on the local clock (unchanged before the first sample).
  absl::Time ToLocal(absl::Time peer) const;

 private:
  const int window_;
  mutable absl::Mutex mu_;
  std::deque<Estimate> samples_ ABSL_GUARDED_BY(mu_);  // oldest first
};

}  // namespace prehoc

#endif  // PREHOC_SERVICES_COMMON_CLOCK_OFFSET_H_
