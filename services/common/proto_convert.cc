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
  r.request_id = proto.request_id();
  r.model = proto.model();
  switch (proto.prompt_case()) {
    case v1::GenerateRequest::kText:
      r.text = proto.text();
      break;
    case v1::GenerateRequest::kTokenIds:
      r.token_ids.assign(proto.token_ids().ids().begin(), proto.token_ids().ids().end());
      break;
    default:
      return absl::InvalidArgumentError("prompt: set either text or token_ids");
  }
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
    return absl::InvalidArgumentError(absl::StrCat("sparsity.policy: unknown value ", policy));
  }
  r.sparsity.policy = policy == 0 ? "" : names[policy - 1];
  r.sparsity.target_delta = sp.target_delta();
  r.sparsity.budget = sp.budget_fraction() > 0 ? sp.budget_fraction() : sp.budget();
  if (sp.budget() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sparsity.budget: must be >= 0, got ", sp.budget()));
  }
  if (!(sp.budget_fraction() >= 0 && sp.budget_fraction() <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sparsity.budget_fraction: must be in [0, 1], got ", sp.budget_fraction()));
  }
  r.sparsity.overrides = sp.overrides();
  return r;
}

v1::GenerateRequest ToProto(const InferenceRequest& r) {
  v1::GenerateRequest p;
  p.set_request_id(r.request_id);
  p.set_model(r.model);
  if (r.text.has_value()) {
    p.set_text(*r.text);
  } else {
    p.mutable_token_ids()->mutable_ids()->Add(r.token_ids.begin(), r.token_ids.end());
  }
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
  out->mutable_token_ids()->Add(e.tokens.begin(), e.tokens.end());
  out->mutable_text()->append(e.text);
  if (e.first) {
    out->set_request_id(e.request_id);
    out->set_served_by(e.served_by);
  }
  if (e.finished) {
    out->set_finished(true);
    out->set_finish_reason(e.finish_reason);
    out->mutable_usage()->set_prompt_tokens(e.prompt_tokens);
    out->mutable_usage()->set_completion_tokens(e.completion_tokens);
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
  e.tokens.assign(p.token_ids().begin(), p.token_ids().end());
  e.text = p.text();
  if (!p.request_id().empty()) {
    e.first = true;
    e.request_id = p.request_id();
    e.served_by = p.served_by();
  }
  if (p.finished()) {
    e.finished = true;
    e.finish_reason = p.finish_reason();
    e.prompt_tokens = p.usage().prompt_tokens();
    e.completion_tokens = p.usage().completion_tokens();
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

}  // namespace prehoc
