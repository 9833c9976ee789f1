// A fixed pool of worker threads for data-parallel CPU kernels.
#ifndef PREHOC_COMMON_THREAD_POOL_H_
#define PREHOC_COMMON_THREAD_POOL_H_

#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace prehoc {

class ThreadPool {
 public:
  // `num_threads` <= 0 means std::thread::hardware_concurrency(). The calling thread also works
  // during ParallelFor, so num_threads - 1 background threads are started.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Calls fn(begin, end) on disjoint chunks that cover [0, n), each of at least `min_chunk`
  // items (except possibly the last), and returns when every call has returned. Work is split
  // into at most num_threads() contiguous chunks. Thread-safe: concurrent ParallelFor calls are
  // serialised. fn must not call ParallelFor on the same pool.
  void ParallelFor(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void WorkerLoop(int index);

  const int num_threads_;
  std::vector<std::thread> threads_;
  absl::Mutex call_mu_;  // serialises ParallelFor callers
  absl::Mutex mu_;
  absl::CondVar work_cv_;  // generation_ advanced or stop_ set
  absl::CondVar done_cv_;  // pending_ reached zero
  const std::function<void(int64_t, int64_t)>* fn_ ABSL_GUARDED_BY(mu_) = nullptr;
  int64_t n_ ABSL_GUARDED_BY(mu_) = 0;
  int num_chunks_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
  int pending_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace prehoc

#endif  // PREHOC_COMMON_THREAD_POOL_H_
