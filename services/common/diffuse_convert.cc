#include "services/common/diffuse_convert.h"

#include "absl/strings/str_cat.h"
#include "services/common/proto_convert.h"

namespace prehoc {
namespace {

// DlmCacheParams -> MakeDlmSchedule's override keys (the proto's `rho_uniform` is its `rho`).
void ParamsToOverrides(const v1::DlmCacheParams& p, std::map<std::string, double>* o) {
  if (p.has_r_full()) (*o)["r_full"] = p.r_full();
  if (p.has_r_gen()) (*o)["r_gen"] = p.r_gen();
  if (p.has_rho_peak_pos()) (*o)["rho_peak_pos"] = p.rho_peak_pos();
  if (p.has_rho_start()) (*o)["rho_start"] = p.rho_start();
  if (p.has_rho_peak()) (*o)["rho_peak"] = p.rho_peak();
  if (p.has_rho_end()) (*o)["rho_end"] = p.rho_end();
  if (p.has_rho_floor()) (*o)["rho_floor"] = p.rho_floor();
  if (p.has_rho_scale()) (*o)["rho_scale"] = p.rho_scale();
  if (p.has_rho_mean()) (*o)["rho_mean"] = p.rho_mean();
  if (p.has_rho_uniform()) (*o)["rho"] = p.rho_uniform();
  if (p.has_kv_all_rows()) (*o)["kv_all_rows"] = p.kv_all_rows() ? 1 : 0;
  if (p.has_min_rows()) (*o)["min_rows"] = p.min_rows();
  if (p.has_prompt_refresh()) (*o)["prompt_refresh"] = p.prompt_refresh();
  if (p.has_gen_refresh()) (*o)["gen_refresh"] = p.gen_refresh();
  if (p.has_dllm_ratio()) (*o)["dllm_ratio"] = p.dllm_ratio();
  if (p.has_block_refresh()) (*o)["block_refresh"] = p.block_refresh();
}

void OverridesToParams(const std::map<std::string, double>& o, v1::DlmCacheParams* p) {
  for (const auto& [k, v] : o) {
    if (k == "r_full") p->set_r_full(static_cast<int32_t>(v));
    if (k == "r_gen") p->set_r_gen(static_cast<int32_t>(v));
    if (k == "rho_peak_pos") p->set_rho_peak_pos(v);
    if (k == "rho_start") p->set_rho_start(v);
    if (k == "rho_peak") p->set_rho_peak(v);
    if (k == "rho_end") p->set_rho_end(v);
    if (k == "rho_floor") p->set_rho_floor(v);
    if (k == "rho_scale") p->set_rho_scale(v);
    if (k == "rho_mean") p->set_rho_mean(v);
    if (k == "rho") p->set_rho_uniform(v);
    if (k == "kv_all_rows") p->set_kv_all_rows(v != 0);
    if (k == "min_rows") p->set_min_rows(static_cast<int32_t>(v));
    if (k == "prompt_refresh") p->set_prompt_refresh(static_cast<int32_t>(v));
    if (k == "gen_refresh") p->set_gen_refresh(static_cast<int32_t>(v));
    if (k == "dllm_ratio") p->set_dllm_ratio(v);
    if (k == "block_refresh") p->set_block_refresh(static_cast<int32_t>(v));
  }
}

}  // namespace

absl::StatusOr<DiffusionRequest> DiffusionFromProto(const v1::DiffuseRequest& p) {
  DiffusionRequest r;
  absl::Status common = CommonRequestFromProto(p, &r);
  if (!common.ok()) return common;
  if (p.sampling().top_k() != 0) return FieldError("sampling.top_k", "must be 0 for Diffuse");
  if (p.sampling().top_p() != 0 && p.sampling().top_p() != 1) {
    return FieldError("sampling.top_p", "must be 0 (or 1) for Diffuse");
  }
  dlm::DiffuseOptions& o = r.options;
  o.gen_length = p.gen_length();
  o.block_length = p.block_length();
  o.steps = p.steps();
  o.remasking = p.remasking();
  o.temperature = p.sampling().temperature();
  o.seed = p.sampling().seed();
  o.parallel_threshold = p.parallel_threshold();
  o.stop_at_eos = p.stop_at_eos();
  o.cache = p.cache();
  ParamsToOverrides(p.cache_params(), &o.cache_overrides);
  r.rho.assign(p.rho().begin(), p.rho().end());
  if (p.has_plan()) {
    absl::StatusOr<DlmSchedule> plan = DlmPlanFromProto(p.plan());
    if (!plan.ok()) return plan.status();
    r.plan = std::move(*plan);
  }
  return r;
}

v1::DiffuseRequest DiffusionToProto(const DiffusionRequest& r) {
  v1::DiffuseRequest p;
  CommonRequestToProto(r, &p);
  const dlm::DiffuseOptions& o = r.options;
  p.set_gen_length(o.gen_length);
  p.set_block_length(o.block_length);
  p.set_steps(o.steps);
  p.set_remasking(o.remasking);
  p.mutable_sampling()->set_temperature(o.temperature);
  p.mutable_sampling()->set_seed(o.seed);
  p.set_parallel_threshold(static_cast<float>(o.parallel_threshold));
  p.set_stop_at_eos(o.stop_at_eos);
  p.set_cache(o.cache);
  OverridesToParams(o.cache_overrides, p.mutable_cache_params());
  for (double v : r.rho) p.add_rho(static_cast<float>(v));
  if (r.plan.has_value()) *p.mutable_plan() = DlmPlanToProto(*r.plan);
  return p;
}

void AppendDiffusionEvent(const DiffusionEvent& e, v1::DiffuseResponse* out) {
  if (!e.tokens.empty() && out->token_ids().empty()) {
    out->set_block(e.block);
    out->set_block_start(e.block_start);
  }
  AppendCommonEvent(e, out);
  out->set_step(e.step);
  if (e.finished) {
    const DiffusionStats& s = e.stats;
    v1::DiffuseStats* ps = out->mutable_stats();
    ps->set_cache(s.cache);
    ps->set_steps(s.steps);
    ps->set_full_steps(s.full_steps);
    ps->set_gen_refresh_steps(s.gen_refresh_steps);
    ps->set_partial_steps(s.partial_steps);
    ps->set_blocks(s.blocks);
    ps->set_canvas_rows(s.canvas_rows);
    ps->mutable_rows_recomputed()->Add(s.rows_recomputed.begin(), s.rows_recomputed.end());
    ps->mutable_kv_rows_recomputed()->Add(s.kv_rows_recomputed.begin(),
                                          s.kv_rows_recomputed.end());
    ps->set_refreshes(s.refreshes());
    ps->set_decode_seconds(s.decode_seconds);
    ps->set_tokens_per_second(s.tokens_per_second);
    ps->set_time_to_first_block_s(s.time_to_first_block_s);
    ps->set_plan_version(s.plan_version);
    ps->mutable_rho()->Add(s.rho.begin(), s.rho.end());
  }
}

DiffusionEvent DiffusionEventFromProto(const v1::DiffuseResponse& p) {
  DiffusionEvent e;
  CommonEventFromProto(p, &e);
  e.block = p.block();
  e.block_start = p.block_start();
  e.step = p.step();
  if (p.finished()) {
    const v1::DiffuseStats& ps = p.stats();
    DiffusionStats& s = e.stats;
    s.cache = ps.cache();
    s.steps = ps.steps();
    s.full_steps = ps.full_steps();
    s.gen_refresh_steps = ps.gen_refresh_steps();
    s.partial_steps = ps.partial_steps();
    s.blocks = ps.blocks();
    s.canvas_rows = ps.canvas_rows();
    s.rows_recomputed.assign(ps.rows_recomputed().begin(), ps.rows_recomputed().end());
    s.kv_rows_recomputed.assign(ps.kv_rows_recomputed().begin(), ps.kv_rows_recomputed().end());
    s.decode_seconds = ps.decode_seconds();
    s.tokens_per_second = ps.tokens_per_second();
    s.time_to_first_block_s = ps.time_to_first_block_s();
    s.plan_version = ps.plan_version();
    s.rho.assign(ps.rho().begin(), ps.rho().end());
  }
  return e;
}

v1::DlmPlan DlmPlanToProto(const DlmSchedule& s) {
  v1::DlmPlan p;
  p.set_version(static_cast<int64_t>(s.version));
  p.set_policy(s.policy_name);
  p.mutable_rho()->Add(s.rho.begin(), s.rho.end());
  p.set_r_full(s.r_full);
  p.set_r_gen(s.r_gen);
  p.set_prompt_refresh(s.prompt_refresh);
  p.set_gen_refresh(s.gen_refresh);
  p.set_dllm_ratio(s.dllm_ratio);
  p.set_block_refresh(s.block_refresh);
  p.set_kv_all_rows(s.kv_all_rows);
  p.set_min_rows(s.min_rows);
  return p;
}

absl::StatusOr<DlmSchedule> DlmPlanFromProto(const v1::DlmPlan& p) {
  absl::StatusOr<DlmCachePolicy> policy = ParseDlmCachePolicy(p.policy());
  if (!policy.ok()) return FieldError("plan.policy", "unknown policy '", p.policy(), "'");
  DlmSchedule s;
  s.version = static_cast<uint64_t>(p.version());
  s.policy = *policy;
  s.policy_name = DlmCachePolicyName(*policy);
  s.rho.assign(p.rho().begin(), p.rho().end());
  s.r_full = p.r_full();
  s.r_gen = p.r_gen();
  s.prompt_refresh = p.prompt_refresh();
  s.gen_refresh = p.gen_refresh();
  s.dllm_ratio = p.dllm_ratio();
  s.block_refresh = p.block_refresh();
  s.kv_all_rows = p.kv_all_rows();
  s.min_rows = p.min_rows();
  return s;
}

}  // namespace prehoc
