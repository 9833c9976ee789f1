// Paged KV cache: fixed-size pages of `page_size` tokens. One page id addresses the same slot in
// every layer's pool, so a sequence has a single page table (int32 page ids) for all layers.
//
// Physical layout per layer and per K/V (float32, HND inside a page):
//   pool[num_pages][num_kv_heads][page_size][head_dim]
// Token t of a sequence lives in page page_table[t / page_size], slot t % page_size.
#ifndef PREHOC_WORKER_KV_CACHE_H_
#define PREHOC_WORKER_KV_CACHE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace prehoc {

// Hands out page ids in [0, num_pages). Thread-safe.
class PageAllocator {
 public:
  explicit PageAllocator(int32_t num_pages);

  // Returns `n` distinct free page ids, or RESOURCE_EXHAUSTED naming how many were asked for and
  // how many are free (nothing is allocated then).
  absl::StatusOr<std::vector<int32_t>> Allocate(int32_t n);
  // Returns pages to the free list. Returns INVALID_ARGUMENT (and frees nothing) for an id out of
  // range or not currently allocated (double free).
  absl::Status Free(std::span<const int32_t> pages);

  int32_t num_pages() const { return num_pages_; }
  int32_t num_free() const;
  int32_t num_used() const { return num_pages_ - num_free(); }

 private:
  const int32_t num_pages_;
  mutable absl::Mutex mu_;
  std::vector<int32_t> free_ ABSL_GUARDED_BY(mu_);  // stack of free ids
  std::vector<bool> used_ ABSL_GUARDED_BY(mu_);
};

struct KvCacheShape {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int page_size = 16;
  int32_t num_pages = 0;
};

// Storage only; which pages belong to whom is the allocator's and the sequences' business.
// Not thread-safe for writes to the same page; distinct pages may be written concurrently.
class KvCache {
 public:
  explicit KvCache(const KvCacheShape& shape);

  const KvCacheShape& shape() const { return shape_; }
  size_t bytes() const { return size_ * sizeof(float); }

  // Pointer to [page_size][head_dim] of (layer, page, kv_head).
  float* K(int layer, int32_t page, int kv_head) { return pool_.get() + Offset(0, layer, page, kv_head); }
  float* V(int layer, int32_t page, int kv_head) { return pool_.get() + Offset(1, layer, page, kv_head); }
  const float* K(int layer, int32_t page, int kv_head) const {
    return pool_.get() + Offset(0, layer, page, kv_head);
  }
  const float* V(int layer, int32_t page, int kv_head) const {
    return pool_.get() + Offset(1, layer, page, kv_head);
  }

 private:
  size_t Offset(int kv, int layer, int32_t page, int kv_head) const {
    const size_t page_elems = static_cast<size_t>(shape_.page_size) * shape_.head_dim;
    return ((((static_cast<size_t>(layer) * 2 + kv) * shape_.num_pages + page) * shape_.num_kv_heads +
             kv_head) *
            page_elems);
  }
  KvCacheShape shape_;
  // [layer][k|v][page][kv_head][slot][dim]. Left uninitialised: a large pool costs no time or
  // resident memory until pages are written (the OS maps them lazily).
  size_t size_;
  std::unique_ptr<float[]> pool_;
};

// Number of pages needed for `tokens` tokens.
inline int32_t PagesFor(int64_t tokens, int page_size) {
  return static_cast<int32_t>((tokens + page_size - 1) / page_size);
}

}  // namespace prehoc

#endif  // PREHOC_WORKER_KV_CACHE_H_
