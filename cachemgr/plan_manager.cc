#include "cachemgr/plan_manager.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/model_config.h"
#include "common/status.h"

namespace prehoc {

PlanMetrics::PlanMetrics(prometheus::Registry& registry) {
  using prometheus::BuildCounter;
  using prometheus::BuildGauge;
  open_plans = &BuildGauge()
                    .Name("prehoc_cachemgr_selection_plans")
                    .Help("Sequences with a selection plan computed by the cache manager.")
                    .Register(registry)
                    .Add({});
  versions = &BuildCounter()
                  .Name("prehoc_cachemgr_selection_plan_versions_total")
                  .Help("Selection plan versions computed (placement and delta-controller "
                        "changes), by policy.")
                  .Register(registry);
  plans_sent = &BuildCounter()
                    .Name("prehoc_cachemgr_selection_plans_sent_total")
                    .Help("Selection plans handed to workers' plan streams.")
                    .Register(registry)
                    .Add({});
  streams = &BuildGauge()
                 .Name("prehoc_cachemgr_plan_streams")
                 .Help("Workers connected to the selection plan stream.")
                 .Register(registry)
                 .Add({});
  refresh_samples = &BuildCounter()
                         .Name("prehoc_cachemgr_delta_samples_total")
                         .Help("Refresh delta samples fed to the delta-controllers.")
                         .Register(registry)
                         .Add({});
  unknown_samples = &BuildCounter()
                         .Name("prehoc_cachemgr_delta_samples_ignored_total")
                         .Help("Refresh delta samples of sequences without a plan or a delta "
                               "target, or out of the model's layer/head range.")
                         .Register(registry)
                         .Add({});
}

PlanManager::PlanManager(PlanManagerOptions options) : options_(std::move(options)) {}

absl::StatusOr<uint64_t> PlanManager::Open(const std::string& sequence_id,
                                           const std::string& worker_id,
                                           const std::string& model, const PlanModelShape& shape,
                                           const SparsityOptions& sparsity) {
  if (sparsity.policy.empty() || sparsity.policy == "dense") {
    return absl::FailedPreconditionError(
        absl::StrCat("sparsity.policy '", sparsity.policy, "': nothing to plan"));
  }
  if (shape.num_layers <= 0 || shape.num_kv_heads <= 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("model '", model, "': layer and kv-head counts unknown (worker did not "
                     "report them)"));
  }
  ModelConfig config;
  config.num_hidden_layers = shape.num_layers;
  config.num_key_value_heads = shape.num_kv_heads;
  ASSIGN_OR_RETURN(auto overrides, ParseOverrides(sparsity.overrides));
  ASSIGN_OR_RETURN(SelectionPlan plan, MakeSelectionPlan(config, sparsity, overrides));
  std::set<std::string> wake;
  uint64_t version;
  {
    absl::MutexLock l(&mu_);
    if (plans_.contains(sequence_id)) {
      return absl::AlreadyExistsError(
          absl::StrCat("sequence '", sequence_id, "' already has a plan"));
    }
    Entry e;
    e.worker_id = worker_id;
    if (plan.target_delta > 0) {
      std::unique_ptr<DeltaController>& c =
          controllers_[Key{model, plan.policy_name, plan.target_delta}];
      if (c == nullptr) {
        DeltaControllerOptions o = options_.controller;
        o.target_delta = plan.target_delta;
        c = std::make_unique<DeltaController>(shape.num_layers, shape.num_kv_heads, o);
      }
      e.controller = c.get();
      // Start from what the controller has learned on earlier sequences.
      e.controller->Apply(&plan);
    }
    e.update.sequence_id = sequence_id;
    e.update.produced = Now();
    e.update.plan = std::move(plan);
    version = e.update.plan.version;
    auto [it, inserted] = plans_.emplace(sequence_id, std::move(e));
    wake.insert(QueueLocked(sequence_id, it->second));
    if (options_.metrics != nullptr) {
      options_.metrics->open_plans->Set(static_cast<double>(plans_.size()));
      options_.metrics->versions->Add({{"policy", it->second.update.plan.policy_name}})
          .Increment();
    }
  }
  Wake(wake);
  return version;
}

void PlanManager::Close(const std::string& sequence_id) {
  absl::MutexLock l(&mu_);
  auto it = plans_.find(sequence_id);
  if (it == plans_.end()) return;
  auto p = pending_.find(it->second.worker_id);
  if (p != pending_.end()) {
    p->second.erase(sequence_id);
    if (p->second.empty()) pending_.erase(p);
  }
  plans_.erase(it);
  if (options_.metrics != nullptr) {
    options_.metrics->open_plans->Set(static_cast<double>(plans_.size()));
  }
}

const std::string& PlanManager::QueueLocked(const std::string& sequence_id, const Entry& e) {
  pending_[e.worker_id].insert(sequence_id);
  return e.worker_id;
}

int PlanManager::Observe(std::span<const RefreshSample> samples) {
  struct Batch {
    std::vector<int16_t> layers, heads;
    std::vector<float> deltas;
  };
  std::set<std::string> wake;
  int versions = 0;
  int64_t ignored = 0;
  {
    absl::MutexLock l(&mu_);
    std::map<DeltaController*, Batch> batches;
    for (const RefreshSample& s : samples) {
      auto it = plans_.find(s.sequence_id);
      if (it == plans_.end() || it->second.controller == nullptr || s.layer < 0 ||
          s.kv_head < 0 || s.layer >= static_cast<int>(it->second.update.plan.layers.size())) {
        ++ignored;
        continue;
      }
      Batch& b = batches[it->second.controller];
      b.layers.push_back(static_cast<int16_t>(s.layer));
      b.heads.push_back(static_cast<int16_t>(s.kv_head));
      b.deltas.push_back(static_cast<float>(s.delta));
    }
    std::set<DeltaController*> changed;
    for (auto& [c, b] : batches) {
      if (c->Observe(b.layers, b.heads, b.deltas)) changed.insert(c);
    }
    if (!changed.empty()) {
      const absl::Time now = Now();
      for (auto& [id, e] : plans_) {
        if (!changed.contains(e.controller)) continue;
        const uint64_t before = e.update.plan.version;
        e.controller->Apply(&e.update.plan);
        if (e.update.plan.version == before) continue;
        e.update.produced = now;
        wake.insert(QueueLocked(id, e));
        ++versions;
        if (options_.metrics != nullptr) {
          options_.metrics->versions->Add({{"policy", e.update.plan.policy_name}}).Increment();
        }
      }
    }
    if (options_.metrics != nullptr) {
      options_.metrics->refresh_samples->Increment(static_cast<double>(samples.size() - ignored));
      options_.metrics->unknown_samples->Increment(static_cast<double>(ignored));
    }
  }
  Wake(wake);
  return versions;
}

uint64_t PlanManager::Subscribe(const std::string& worker_id, std::function<void()> wake) {
  uint64_t handle;
  {
    absl::MutexLock s(&subs_mu_);
    handle = next_sub_++;
    subs_[handle] = Subscriber{worker_id, std::move(wake)};
    if (options_.metrics != nullptr) {
      options_.metrics->streams->Set(static_cast<double>(subs_.size()));
    }
  }
  {
    absl::MutexLock l(&mu_);
    for (const auto& [id, e] : plans_) {
      if (e.worker_id == worker_id) QueueLocked(id, e);
    }
  }
  Wake({worker_id});
  return handle;
}

void PlanManager::Unsubscribe(uint64_t handle) {
  absl::MutexLock s(&subs_mu_);
  subs_.erase(handle);
  if (options_.metrics != nullptr) {
    options_.metrics->streams->Set(static_cast<double>(subs_.size()));
  }
}

void PlanManager::Wake(const std::set<std::string>& workers) {
  if (workers.empty()) return;
  std::vector<std::function<void()>> wakes;
  {
    absl::MutexLock s(&subs_mu_);
    for (const auto& [handle, sub] : subs_) {
      if (workers.contains(sub.worker_id)) wakes.push_back(sub.wake);
    }
  }
  for (const auto& wake : wakes) wake();  // no lock held: a wake may start gRPC operations
}

std::vector<PlanUpdate> PlanManager::TakePending(const std::string& worker_id) {
  std::vector<PlanUpdate> out;
  absl::MutexLock l(&mu_);
  auto p = pending_.find(worker_id);
  if (p == pending_.end()) return out;
  for (const std::string& id : p->second) {
    auto it = plans_.find(id);
    if (it != plans_.end()) out.push_back(it->second.update);
  }
  pending_.erase(p);
  if (options_.metrics != nullptr) {
    options_.metrics->plans_sent->Increment(static_cast<double>(out.size()));
  }
  return out;
}

std::optional<PlanUpdate> PlanManager::Get(const std::string& sequence_id) const {
  absl::MutexLock l(&mu_);
  auto it = plans_.find(sequence_id);
  if (it == plans_.end()) return std::nullopt;
  return it->second.update;
}

const DeltaController* PlanManager::Controller(const std::string& model,
                                               const std::string& policy,
                                               double target_delta) const {
  absl::MutexLock l(&mu_);
  auto it = controllers_.find(Key{model, policy, target_delta});
  return it == controllers_.end() ? nullptr : it->second.get();
}

int PlanManager::open_plans() const {
  absl::MutexLock l(&mu_);
  return static_cast<int>(plans_.size());
}

}  // namespace prehoc
