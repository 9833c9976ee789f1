#include "cachemgr/worker_registry.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace prehoc {

WorkerRegistry::WorkerRegistry(WorkerRegistryOptions options) : options_(std::move(options)) {
  absl::MutexLock l(&mu_);
  // Epochs start at the wall clock in microseconds so that a restarted cache manager never
  // hands out an epoch its predecessor used.
  next_epoch_ = std::max<int64_t>(1, absl::ToUnixMicros(absl::Now()));
}

absl::StatusOr<int64_t> WorkerRegistry::Register(WorkerRegistration r) {
  if (r.worker_id.empty()) return absl::InvalidArgumentError("worker_id: is empty");
  if (r.address.empty() && r.link == nullptr) {
    return absl::InvalidArgumentError("address: is empty");
  }
  if (r.models.empty()) return absl::InvalidArgumentError("models: the worker serves no model");
  std::shared_ptr<WorkerLink> link = r.link;
  {
    absl::MutexLock l(&mu_);
    auto it = workers_.find(r.worker_id);
    if (link == nullptr && it != workers_.end() && it->second.address == r.address) {
      link = it->second.link;  // keep the connection
    }
  }
  if (link == nullptr) {
    if (!options_.link_factory) {
      return absl::FailedPreconditionError("no link for the worker and no link factory");
    }
    link = options_.link_factory(r.worker_id, r.address);
    if (link == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("cannot reach worker at ", r.address));
    }
  }
  absl::MutexLock l(&mu_);
  WorkerSnapshot& w = workers_[r.worker_id];
  w.worker_id = r.worker_id;
  w.address = r.address;
  w.models = std::move(r.models);
  w.page_size = r.page_size;
  w.load = r.load;
  w.ready = r.ready;
  w.local = r.local;
  w.epoch = next_epoch_++;
  w.last_heartbeat = Now();
  w.link = std::move(link);
  return w.epoch;
}

absl::Status WorkerRegistry::Heartbeat(const std::string& worker_id, int64_t epoch,
                                       const LoadReport& load, bool ready) {
  absl::MutexLock l(&mu_);
  auto it = workers_.find(worker_id);
  if (it == workers_.end()) {
    return absl::NotFoundError(absl::StrCat("worker_id: '", worker_id, "' is not registered"));
  }
  if (it->second.epoch != epoch) {
    return absl::NotFoundError(absl::StrCat("epoch: ", epoch, " is stale for worker '", worker_id,
                                            "' (current ", it->second.epoch, ")"));
  }
  it->second.load = load;
  it->second.ready = ready;
  it->second.last_heartbeat = Now();
  return absl::OkStatus();
}

std::vector<WorkerSnapshot> WorkerRegistry::ExpireDead(absl::Time now) {
  const absl::Duration limit = options_.heartbeat_interval * std::max(1, options_.missed_heartbeats);
  std::vector<WorkerSnapshot> dead;
  absl::MutexLock l(&mu_);
  for (auto it = workers_.begin(); it != workers_.end();) {
    if (!it->second.local && now - it->second.last_heartbeat > limit) {
      dead.push_back(std::move(it->second));
      it = workers_.erase(it);
    } else {
      ++it;
    }
  }
  return dead;
}

std::optional<WorkerSnapshot> WorkerRegistry::Remove(const std::string& worker_id) {
  absl::MutexLock l(&mu_);
  auto it = workers_.find(worker_id);
  if (it == workers_.end()) return std::nullopt;
  WorkerSnapshot w = std::move(it->second);
  workers_.erase(it);
  return w;
}

std::vector<WorkerSnapshot> WorkerRegistry::Snapshot() const {
  absl::MutexLock l(&mu_);
  std::vector<WorkerSnapshot> out;
  for (const auto& [id, w] : workers_) out.push_back(w);
  return out;
}

std::optional<WorkerSnapshot> WorkerRegistry::Get(const std::string& worker_id) const {
  absl::MutexLock l(&mu_);
  auto it = workers_.find(worker_id);
  if (it == workers_.end()) return std::nullopt;
  return it->second;
}

bool WorkerRegistry::AwaitReady(int n, absl::Time deadline) const {
  absl::MutexLock l(&mu_);
  auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    int ready = 0;
    for (const auto& [id, w] : workers_) ready += w.ready ? 1 : 0;
    return ready >= n;
  };
  return mu_.AwaitWithDeadline(absl::Condition(&enough), deadline);
}

int WorkerRegistry::NumReady() const {
  absl::MutexLock l(&mu_);
  int n = 0;
  for (const auto& [id, w] : workers_) n += w.ready ? 1 : 0;
  return n;
}

}  // namespace prehoc
