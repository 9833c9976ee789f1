// What the cache manager's two relays (Router for Generate, DlmRouter for Diffuse) share about
// the client streams they forward: the outcome label of a stream's final status, the status of
// streams whose worker died, and the drain wait.
#ifndef PREHOC_CACHEMGR_RELAY_H_
#define PREHOC_CACHEMGR_RELAY_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace prehoc {

// The `outcome` label of a relayed stream's final status (docs/metrics.md): ok, cancelled,
// deadline_exceeded, invalid_argument (also FAILED_PRECONDITION: a request the worker cannot
// run), resource_exhausted, unavailable, error.
const char* RelayOutcome(const absl::Status& status);

// Every value RelayOutcome returns. The relays create their (model, policy, outcome) request
// counters at 0 for these when a worker registers a model, so that the first request of each
// outcome shows in rate()/increase() (a series born at its first increment does not).
const std::vector<std::string>& RelayOutcomes();

// Adds the `requests` children of `family` at 0 for every (model, policy, outcome) of `policies`.
template <typename Family>
void PrepareOutcomeCounters(Family& family, const std::string& model,
                            const std::vector<std::string>& policies) {
  for (const std::string& policy : policies) {
    for (const std::string& outcome : RelayOutcomes()) {
      family.Add({{"model", model}, {"policy", policy}, {"outcome", outcome}});
    }
  }
}

// UNAVAILABLE for the streams of a worker declared dead (missed heartbeats).
absl::Status DeadWorkerStatus(const std::string& worker_id);

// Blocks until `streams` (guarded by `mu`, not held by the caller) is empty or until `deadline`;
// true when empty. The relays' WaitIdle.
template <typename Map>
bool AwaitNoStreams(absl::Mutex& mu, const Map& streams, absl::Time deadline) {
  absl::MutexLock l(&mu);
  return mu.AwaitWithDeadline(
      absl::Condition(+[](const Map* m) { return m->empty(); }, &streams), deadline);
}

}  // namespace prehoc

#endif  // PREHOC_CACHEMGR_RELAY_H_
