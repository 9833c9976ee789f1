#include "common/thread_pool.h"

#include <algorithm>

namespace prehoc {
namespace {
// Chunk `c` of `k` equal parts of [0, n).
inline void ChunkRange(int64_t n, int k, int c, int64_t* b, int64_t* e) {
  *b = n * c / k;
  *e = n * (c + 1) / k;
}
}  // namespace

ThreadPool::ThreadPool(int num_threads)
    : num_threads_(num_threads > 0 ? num_threads
                                   : std::max(1u, std::thread::hardware_concurrency())) {
  for (int i = 1; i < num_threads_; ++i) threads_.emplace_back([this, i] { WorkerLoop(i); });
}

ThreadPool::~ThreadPool() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  work_cv_.SignalAll();
  for (auto& t : threads_) t.join();
}

void ThreadPool::WorkerLoop(int index) {
  int64_t seen_generation = 0;
  while (true) {
    const std::function<void(int64_t, int64_t)>* fn;
    int64_t n;
    int chunks;
    {
      absl::MutexLock lock(&mu_);
      while (!stop_ && generation_ == seen_generation) work_cv_.Wait(&mu_);
      if (stop_) return;
      seen_generation = generation_;
      fn = fn_;
      n = n_;
      chunks = num_chunks_;
    }
    if (index < chunks) {
      int64_t b, e;
      ChunkRange(n, chunks, index, &b, &e);
      if (b < e) (*fn)(b, e);
    }
    absl::MutexLock lock(&mu_);
    if (--pending_ == 0) done_cv_.Signal();
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t min_chunk,
                             const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  min_chunk = std::max<int64_t>(1, min_chunk);
  const int chunks =
      static_cast<int>(std::min<int64_t>(num_threads_, std::max<int64_t>(1, n / min_chunk)));
  if (chunks == 1) {
    fn(0, n);
    return;
  }
  absl::MutexLock call_lock(&call_mu_);
  {
    absl::MutexLock lock(&mu_);
    fn_ = &fn;
    n_ = n;
    num_chunks_ = chunks;
    pending_ = static_cast<int>(threads_.size());
    ++generation_;
  }
  work_cv_.SignalAll();
  int64_t b, e;
  ChunkRange(n, chunks, 0, &b, &e);
  if (b < e) fn(b, e);
  absl::MutexLock lock(&mu_);
  while (pending_ > 0) done_cv_.Wait(&mu_);
  fn_ = nullptr;
}

}  // namespace prehoc
