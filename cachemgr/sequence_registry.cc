#include "cachemgr/sequence_registry.h"

#include "absl/strings/str_cat.h"

namespace prehoc {

absl::Status SequenceRegistry::Add(SequenceRecord record) {
  absl::MutexLock l(&mu_);
  if (seqs_.contains(record.sequence_id)) {
    return absl::AlreadyExistsError(
        absl::StrCat("sequence_id: '", record.sequence_id, "' already exists"));
  }
  SequenceUsage& u = per_worker_[record.worker_id];
  ++u.sequences;
  u.kv_pages += record.kv_pages;
  u.reserved_pages += record.reserved_pages;
  std::string id = record.sequence_id;
  seqs_.emplace(std::move(id), std::move(record));
  return absl::OkStatus();
}

bool SequenceRegistry::Update(const std::string& sequence_id, int length, int kv_pages) {
  absl::MutexLock l(&mu_);
  auto it = seqs_.find(sequence_id);
  if (it == seqs_.end()) return false;
  per_worker_[it->second.worker_id].kv_pages += kv_pages - it->second.kv_pages;
  it->second.length = length;
  it->second.kv_pages = kv_pages;
  return true;
}

std::optional<SequenceRecord> SequenceRegistry::Remove(const std::string& sequence_id) {
  absl::MutexLock l(&mu_);
  auto it = seqs_.find(sequence_id);
  if (it == seqs_.end()) return std::nullopt;
  SequenceRecord r = std::move(it->second);
  seqs_.erase(it);
  auto u = per_worker_.find(r.worker_id);
  --u->second.sequences;
  u->second.kv_pages -= r.kv_pages;
  u->second.reserved_pages -= r.reserved_pages;
  if (u->second.sequences == 0) per_worker_.erase(u);
  return r;
}

std::vector<SequenceRecord> SequenceRegistry::RemoveWorker(const std::string& worker_id) {
  absl::MutexLock l(&mu_);
  std::vector<SequenceRecord> out;
  for (auto it = seqs_.begin(); it != seqs_.end();) {
    if (it->second.worker_id == worker_id) {
      out.push_back(std::move(it->second));
      it = seqs_.erase(it);
    } else {
      ++it;
    }
  }
  per_worker_.erase(worker_id);
  return out;
}

std::optional<SequenceRecord> SequenceRegistry::Get(const std::string& sequence_id) const {
  absl::MutexLock l(&mu_);
  auto it = seqs_.find(sequence_id);
  if (it == seqs_.end()) return std::nullopt;
  return it->second;
}

SequenceUsage SequenceRegistry::Usage(const std::string& worker_id) const {
  absl::MutexLock l(&mu_);
  auto it = per_worker_.find(worker_id);
  return it == per_worker_.end() ? SequenceUsage{} : it->second;
}

SequenceUsage SequenceRegistry::Totals() const {
  absl::MutexLock l(&mu_);
  SequenceUsage t;
  for (const auto& [id, u] : per_worker_) {
    t.sequences += u.sequences;
    t.kv_pages += u.kv_pages;
    t.reserved_pages += u.reserved_pages;
  }
  return t;
}

std::vector<SequenceRecord> SequenceRegistry::List() const {
  absl::MutexLock l(&mu_);
  std::vector<SequenceRecord> out;
  for (const auto& [id, r] : seqs_) out.push_back(r);
  return out;
}

}  // namespace prehoc
