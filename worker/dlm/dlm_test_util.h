// Test helpers shared by the DLM tests (header-only, tests only).
#ifndef PREHOC_WORKER_DLM_DLM_TEST_UTIL_H_
#define PREHOC_WORKER_DLM_DLM_TEST_UTIL_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "worker/dlm/diffusion_types.h"

namespace prehoc::dlm_test {

// BOS (256) followed by n − 1 pseudo-random printable bytes, reproducible from `seed`.
inline std::vector<int32_t> PrintableTokens(int n, uint64_t seed) {
  std::vector<int32_t> p = {256};
  uint64_t x = seed * 2654435761u + 7;
  while (static_cast<int>(p.size()) < n) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    p.push_back(static_cast<int32_t>(32 + (x >> 33) % 95));
  }
  return p;
}

// Collects one Diffuse stream's events; Wait() returns them once the terminal event arrived.
struct Collector {
  absl::Mutex mu;
  std::vector<DiffusionEvent> events ABSL_GUARDED_BY(mu);
  absl::Notification done;
  DiffusionCallback Callback() {
    return [this](DiffusionEvent ev) {
      const bool terminal = ev.terminal();
      {
        absl::MutexLock l(&mu);
        events.push_back(std::move(ev));
      }
      if (terminal) done.Notify();
    };
  }
  std::vector<DiffusionEvent> Wait() {
    done.WaitForNotification();
    absl::MutexLock l(&mu);
    return events;
  }
};

}  // namespace prehoc::dlm_test

#endif  // PREHOC_WORKER_DLM_DLM_TEST_UTIL_H_
