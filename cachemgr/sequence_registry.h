// The cache manager's per-sequence metadata: which worker runs it, its length and KV pages (as
// reported by the worker's "extend" events) and the pages reserved for it at placement. Core
// library, no gRPC types. Thread-safe.
#ifndef PREHOC_CACHEMGR_SEQUENCE_REGISTRY_H_
#define PREHOC_CACHEMGR_SEQUENCE_REGISTRY_H_

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace prehoc {

struct SequenceRecord {
  std::string sequence_id;
  std::string request_id;
  std::string worker_id;
  std::string model;
  std::string policy;
  int length = 0;          // tokens in the worker's KV cache
  int kv_pages = 0;        // pages the worker reports for it
  int reserved_pages = 0;  // worst case (prompt + max_tokens) counted at placement
  absl::Time created;
};

struct SequenceUsage {
  int sequences = 0;
  int kv_pages = 0;
  int reserved_pages = 0;
};

class SequenceRegistry {
 public:
  // ALREADY_EXISTS when the id is in use.
  absl::Status Add(SequenceRecord record);
  // Records growth; false when the sequence is unknown.
  bool Update(const std::string& sequence_id, int length, int kv_pages);
  std::optional<SequenceRecord> Remove(const std::string& sequence_id);
  // Removes and returns every sequence on `worker_id` (its pages are gone with it).
  std::vector<SequenceRecord> RemoveWorker(const std::string& worker_id);
  std::optional<SequenceRecord> Get(const std::string& sequence_id) const;
  SequenceUsage Usage(const std::string& worker_id) const;
  SequenceUsage Totals() const;
  std::vector<SequenceRecord> List() const;

 private:
  mutable absl::Mutex mu_;
  std::map<std::string, SequenceRecord> seqs_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, SequenceUsage> per_worker_ ABSL_GUARDED_BY(mu_);
};

}  // namespace prehoc

#endif  // PREHOC_CACHEMGR_SEQUENCE_REGISTRY_H_
