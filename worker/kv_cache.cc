#include "worker/kv_cache.h"

#include "absl/strings/str_cat.h"

namespace prehoc {

PageAllocator::PageAllocator(int32_t num_pages) : num_pages_(num_pages), used_(num_pages, false) {
  free_.reserve(num_pages);
  // Hand out low ids first.
  for (int32_t i = num_pages - 1; i >= 0; --i) free_.push_back(i);
}

absl::StatusOr<std::vector<int32_t>> PageAllocator::Allocate(int32_t n) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat("cannot allocate ", n, " pages"));
  absl::MutexLock lock(&mu_);
  if (static_cast<size_t>(n) > free_.size()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache full: requested ", n, " pages, ",
                                                     free_.size(), " of ", num_pages_, " free"));
  }
  std::vector<int32_t> out(free_.end() - n, free_.end());
  free_.resize(free_.size() - n);
  for (int32_t p : out) used_[p] = true;
  return out;
}

absl::Status PageAllocator::Free(std::span<const int32_t> pages) {
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < pages.size(); ++i) {
    const int32_t p = pages[i];
    absl::Status error;
    if (p < 0 || p >= num_pages_) {
      error = absl::InvalidArgumentError(
          absl::StrCat("page id ", p, " out of range [0, ", num_pages_, ")"));
    } else if (!used_[p]) {
      error = absl::InvalidArgumentError(absl::StrCat("page ", p, " is not allocated"));
    }
    if (!error.ok()) {
      for (size_t j = 0; j < i; ++j) used_[pages[j]] = true;  // roll back: free nothing
      return error;
    }
    used_[p] = false;
  }
  free_.insert(free_.end(), pages.begin(), pages.end());
  return absl::OkStatus();
}

int32_t PageAllocator::num_free() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int32_t>(free_.size());
}

KvCache::KvCache(const KvCacheShape& shape)
    : shape_(shape),
      size_(static_cast<size_t>(shape.num_layers) * 2 * shape.num_pages * shape.num_kv_heads *
            shape.page_size * shape.head_dim),
      pool_(new float[size_]) {}

}  // namespace prehoc
