#include "services/common/proto_convert.h"

#include <random>

#include "absl/strings/str_cat.h"

namespace prehoc {

v1::SparsityParams::Policy PolicyToProto(const std::string& name) {
  const std::vector<std::string>& names = KnownSparsityPolicies();
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i] == name) return static_cast<v1::SparsityParams::Policy>(i + 1);
  }
  return v1::SparsityParams::POLICY_UNSPECIFIED;
}

absl::StatusOr<InferenceRequest> FromProto(const v1::GenerateRequest& proto) {
  InferenceRequest r;
  absl::Status common = CommonRequestFromProto(proto, &r);
  if (!common.ok()) return common;
  r.max_tokens = proto.max_tokens();
  r.stop_at_eos = proto.stop_at_eos();
  const v1::SamplingParams& s = proto.sampling();
  r.sampling.temperature = s.temperature();
  r.sampling.top_k = s.top_k();
  r.sampling.top_p = s.top_p() == 0.0f ? 1.0f : s.top_p();
  r.sampling.seed = s.seed();
  if (r.sampling.seed == 0 && r.sampling.temperature > 0) {
    std::random_device rd;
    r.sampling.seed = (static_cast<uint64_t>(rd()) << 32) | rd() | 1;
  }
  const v1::SparsityParams& sp = proto.sparsity();
  const int policy = static_cast<int>(sp.policy());
  const std::vector<std::string>& names = KnownSparsityPolicies();
  if (policy < 0 || policy > static_cast<int>(names.size())) {
    return FieldError("sparsity.policy", "unknown value ", policy);
  }
  r.sparsity.policy = policy == 0 ? "" : names[policy - 1];
  r.sparsity.target_delta = sp.target_delta();
  r.sparsity.budget = sp.budget_fraction() > 0 ? sp.budget_fraction() : sp.budget();
  if (sp.budget() < 0) {
    return FieldError("sparsity.budget", "must be >= 0, got ", sp.budget());
  }
  if (!(sp.budget_fraction() >= 0 && sp.budget_fraction() <= 1)) {
    return FieldError("sparsity.budget_fraction", "must be in [0, 1], got ",
                      sp.budget_fraction());
  }
  r.sparsity.overrides = sp.overrides();
  return r;
}

v1::GenerateRequest ToProto(const InferenceRequest& r) {
  v1::GenerateRequest p;
  CommonRequestToProto(r, &p);
  p.set_max_tokens(r.max_tokens);
  p.set_stop_at_eos(r.stop_at_eos);
  v1::SamplingParams* s = p.mutable_sampling();
  s->set_temperature(r.sampling.temperature);
  s->set_top_k(r.sampling.top_k);
  s->set_top_p(r.sampling.top_p);
  s->set_seed(r.sampling.seed);
  v1::SparsityParams* sp = p.mutable_sparsity();
  sp->set_policy(r.sparsity.policy.empty() ? v1::SparsityParams::POLICY_UNSPECIFIED
                                           : PolicyToProto(r.sparsity.policy));
  sp->set_target_delta(static_cast<float>(r.sparsity.target_delta));
  if (r.sparsity.budget > 0 && r.sparsity.budget <= 1) {
    sp->set_budget_fraction(static_cast<float>(r.sparsity.budget));
  } else {
    sp->set_budget(static_cast<int32_t>(r.sparsity.budget));
  }
  sp->set_overrides(r.sparsity.overrides);
  return p;
}

void AppendEvent(const InferenceEvent& e, v1::GenerateResponse* out) {
  AppendCommonEvent(e, out);
  if (e.finished) {
    out->set_time_to_first_token_s(e.time_to_first_token_s);
    v1::SparsityReport* s = out->mutable_sparsity();
    s->set_policy(e.sparsity.policy);
    s->set_mean_kept_fraction(e.sparsity.mean_kept_fraction);
    s->set_mean_delta(e.sparsity.mean_delta);
    s->set_max_delta(e.sparsity.max_delta);
    s->set_refreshes(e.sparsity.refreshes);
    s->set_shares(e.sparsity.shares);
    s->set_target_delta(e.sparsity_target_delta);
    s->set_plan_version(e.sparsity.plan_version);
    s->set_plan_updates(e.sparsity.plan_updates);
    s->set_dense_fallback_steps(e.sparsity.dense_fallback_steps);
  }
}

InferenceEvent EventFromProto(const v1::GenerateResponse& p) {
  InferenceEvent e;
  CommonEventFromProto(p, &e);
  if (p.finished()) {
    e.time_to_first_token_s = p.time_to_first_token_s();
    e.sparsity.policy = p.sparsity().policy();
    e.sparsity.mean_kept_fraction = p.sparsity().mean_kept_fraction();
    e.sparsity.mean_delta = p.sparsity().mean_delta();
    e.sparsity.max_delta = p.sparsity().max_delta();
    e.sparsity.refreshes = p.sparsity().refreshes();
    e.sparsity.shares = p.sparsity().shares();
    e.sparsity_target_delta = p.sparsity().target_delta();
    e.sparsity.plan_version = p.sparsity().plan_version();
    e.sparsity.plan_updates = p.sparsity().plan_updates();
    e.sparsity.dense_fallback_steps = p.sparsity().dense_fallback_steps();
  }
  return e;
}

v1::ModelInfo ToProto(const ModelDescription& m) {
  v1::ModelInfo p;
  p.set_name(m.name);
  p.set_architecture(m.architecture);
  p.set_vocab_size(m.vocab_size);
  p.set_max_context(m.max_context);
  p.set_bidirectional(m.bidirectional);
  p.set_max_tokens_limit(m.max_tokens_limit);
  for (const std::string& s : m.sparsity_policies) p.add_sparsity_policies(s);
  p.set_num_layers(m.num_layers);
  p.mutable_dlm_drift()->Add(m.dlm_drift.begin(), m.dlm_drift.end());
  for (const std::string& s : m.dlm_cache_policies) p.add_dlm_cache_policies(s);
  return p;
}

ModelDescription FromProto(const v1::ModelInfo& p) {
  ModelDescription m;
  m.name = p.name();
  m.architecture = p.architecture();
  m.vocab_size = p.vocab_size();
  m.max_context = p.max_context();
  m.bidirectional = p.bidirectional();
  m.max_tokens_limit = p.max_tokens_limit();
  m.sparsity_policies.assign(p.sparsity_policies().begin(), p.sparsity_policies().end());
  if (p.num_layers() > 0) m.num_layers = p.num_layers();
  m.dlm_drift.assign(p.dlm_drift().begin(), p.dlm_drift().end());
  m.dlm_cache_policies.assign(p.dlm_cache_policies().begin(), p.dlm_cache_policies().end());
  return m;
}

v1::WorkerLoad ToProto(const LoadReport& l) {
  v1::WorkerLoad p;
  p.set_kv_pages_total(l.kv_pages_total);
  p.set_kv_pages_used(l.kv_pages_used);
  p.set_kv_pages_reserved(l.kv_pages_reserved);
  p.set_queue_depth(l.queue_depth);
  p.set_running(l.running);
  p.set_max_queue(l.max_queue);
  p.set_max_running(l.max_running);
  return p;
}

LoadReport FromProto(const v1::WorkerLoad& p) {
  LoadReport l;
  l.kv_pages_total = p.kv_pages_total();
  l.kv_pages_used = p.kv_pages_used();
  l.kv_pages_reserved = p.kv_pages_reserved();
  l.queue_depth = p.queue_depth();
  l.running = p.running();
  l.max_queue = p.max_queue();
  l.max_running = p.max_running();
  return l;
}

v1::TelemetryBatch TelemetryToProto(const std::string& worker_id, int64_t epoch,
                                    const LoadReport& load,
                                    const std::vector<SequenceTelemetry>& sequences) {
  v1::TelemetryBatch batch;
  batch.set_worker_id(worker_id);
  batch.set_epoch(epoch);
  *batch.mutable_load() = ToProto(load);
  for (const SequenceTelemetry& t : sequences) {
    v1::SequenceTelemetry* s = batch.add_sequences();
    s->set_sequence_id(t.request_id);
    s->set_policy(t.policy);
    s->set_length(t.length);
    s->set_kv_pages(t.kv_pages);
    s->set_refreshes(t.report.refreshes);
    s->set_shares(t.report.shares);
    s->set_mean_kept_fraction(t.report.mean_kept_fraction);
    s->set_in_progress(t.in_progress);
    s->set_target_delta(t.target_delta);
    s->set_plan_version(t.report.plan_version);
    s->set_dense_fallback_steps(t.report.dense_fallback_steps);
    for (size_t i = 0; i < t.refresh_delta.size(); ++i) {
      v1::RefreshEvent* e = batch.add_refreshes();
      e->set_sequence_id(t.request_id);
      e->set_layer(i < t.refresh_layer.size() ? t.refresh_layer[i] : -1);
      e->set_kv_head(i < t.refresh_head.size() ? t.refresh_head[i] : -1);
      e->set_delta(t.refresh_delta[i]);
      e->set_plan_version(t.report.plan_version);
    }
  }
  return batch;
}

TelemetryReport TelemetryReportFromProto(const v1::TelemetryBatch& batch) {
  TelemetryReport r;
  r.worker_id = batch.worker_id();
  for (const v1::SequenceTelemetry& s : batch.sequences()) {
    r.sequences.push_back({s.sequence_id(), s.policy(), s.mean_kept_fraction(), s.refreshes(),
                           s.shares(), s.in_progress()});
  }
  for (const v1::RefreshEvent& e : batch.refreshes()) {
    r.refreshes.push_back({e.sequence_id(), e.layer(), e.kv_head(), e.delta()});
  }
  return r;
}

}  // namespace prehoc
