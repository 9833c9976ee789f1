// The cache manager's registry of workers: registration (with an epoch), heartbeats carrying
// load, and expiry after missed heartbeats. Core library: no gRPC types; the link to a worker is
// an interface (gRPC in split mode, in-process in embedded mode, fakes in tests).
#ifndef PREHOC_CACHEMGR_WORKER_REGISTRY_H_
#define PREHOC_CACHEMGR_WORKER_REGISTRY_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "worker/scheduler_types.h"

namespace prehoc {

// How the cache manager reaches one worker. Thread-safe.
class WorkerLink {
 public:
  virtual ~WorkerLink() = default;
  // Starts sequence `sequence_id` running `request` on the worker (request.request_id is
  // ignored: the worker knows the sequence by `sequence_id`). Events follow the
  // InferenceBackend contract (scheduler_types.h): exactly one terminal event, the last;
  // `sequence_length` / `kv_pages` report the sequence's growth. An error returned here means
  // the callback is never called.
  virtual absl::Status Start(const std::string& sequence_id, const InferenceRequest& request,
                             InferenceCallback callback) = 0;
  // Ends the sequence on the worker, best effort and without blocking; a stream started through
  // this link then ends (its terminal event still arrives).
  virtual void Free(const std::string& sequence_id) = 0;
  // False while the transport is known to be broken (placement skips the worker).
  virtual bool Healthy() const { return true; }
};

// Creates the link to a worker at `address` when it registers without one.
using WorkerLinkFactory = std::function<std::shared_ptr<WorkerLink>(
    const std::string& worker_id, const std::string& address)>;

struct WorkerRegistration {
  std::string worker_id;
  std::string address;
  std::vector<ModelDescription> models;
  int page_size = 16;
  LoadReport load;
  bool ready = false;
  // Sequences the worker still runs (after a cache-manager restart).
  std::vector<std::string> live_sequences;
  // In-process worker (embedded mode): never expires.
  bool local = false;
  // Link to use; null = made by WorkerRegistryOptions::link_factory.
  std::shared_ptr<WorkerLink> link;
};

struct WorkerSnapshot {
  std::string worker_id;
  std::string address;
  std::vector<ModelDescription> models;
  int page_size = 16;
  LoadReport load;
  bool ready = false;
  bool local = false;
  int64_t epoch = 0;
  absl::Time last_heartbeat;
  std::shared_ptr<WorkerLink> link;
};

struct WorkerRegistryOptions {
  // Interval workers are told to heartbeat at.
  absl::Duration heartbeat_interval = absl::Seconds(1);
  // A worker is dead after this many intervals without a heartbeat (>= 1).
  int missed_heartbeats = 2;
  // Clock; null = absl::Now.
  std::function<absl::Time()> clock;
  // Makes links for registrations that carry none; may be null when every registration does.
  WorkerLinkFactory link_factory;
};

// Thread-safe.
class WorkerRegistry {
 public:
  explicit WorkerRegistry(WorkerRegistryOptions options);

  // Adds the worker, or replaces an entry with the same id (a restarted or re-registering
  // worker; its link is replaced when the address changed). Returns the new epoch (unique and
  // increasing within this process). INVALID_ARGUMENT naming the field for an empty worker_id,
  // address or model list; FAILED_PRECONDITION when no link can be made.
  absl::StatusOr<int64_t> Register(WorkerRegistration registration);
  // Records a heartbeat. NOT_FOUND when the id is unknown or `epoch` is not the current one
  // (the worker must register again).
  absl::Status Heartbeat(const std::string& worker_id, int64_t epoch, const LoadReport& load,
                         bool ready);
  // Removes and returns the non-local workers whose last heartbeat is older than
  // missed_heartbeats × heartbeat_interval at `now`.
  std::vector<WorkerSnapshot> ExpireDead(absl::Time now);
  // Removes a worker; nullopt when unknown.
  std::optional<WorkerSnapshot> Remove(const std::string& worker_id);

  std::vector<WorkerSnapshot> Snapshot() const;
  std::optional<WorkerSnapshot> Get(const std::string& worker_id) const;
  int NumReady() const;
  // Blocks until at least `n` workers are registered and ready, or until `deadline`; true when
  // they are (for tests and startup scripts).
  bool AwaitReady(int n, absl::Time deadline) const;
  absl::Duration heartbeat_interval() const { return options_.heartbeat_interval; }
  absl::Time Now() const { return options_.clock ? options_.clock() : absl::Now(); }

 private:
  const WorkerRegistryOptions options_;
  mutable absl::Mutex mu_;
  std::map<std::string, WorkerSnapshot> workers_ ABSL_GUARDED_BY(mu_);
  int64_t next_epoch_ ABSL_GUARDED_BY(mu_);
};

}  // namespace prehoc

#endif  // PREHOC_CACHEMGR_WORKER_REGISTRY_H_
