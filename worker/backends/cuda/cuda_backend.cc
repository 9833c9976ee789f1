#include "worker/backends/cuda/cuda_backend.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "worker/kv_cache.h"

namespace prehoc {
namespace {

// The item's decode selection on the device: its plan when it is a single token whose selector
// runs a non-dense plan, else null (dense attention).
const SelectionPlan* DecodePlan(const BackendStepItem& it) {
  if (it.tokens.size() != 1 || it.selector == nullptr || it.selector->is_dense()) return nullptr;
  return &it.selector->plan();
}

// Whether two PrHS plans can share one forward (the selection kernels take one value of each of
// these per layer for the whole batch; sink, local and k are per sequence).
bool SameCisScalars(const SelectionPlan& a, const SelectionPlan& b) {
  if (a.layers.size() != b.layers.size()) return false;
  for (size_t l = 0; l < a.layers.size(); ++l) {
    const LayerSelectionPlan &x = a.layers[l], &y = b.layers[l];
    if (x.tau != y.tau || x.max_reuse != y.max_reuse || x.dilate_r != y.dilate_r ||
        x.dilate_m_fraction != y.dilate_m_fraction) {
      return false;
    }
  }
  return true;
}

// Whether two HShare plans can share one forward (the kernels take one refresh interval and
// one calibrated-channel count per layer for the batch's HShare items).
bool SameHShareScalars(const SelectionPlan& a, const SelectionPlan& b) {
  if (a.layers.size() != b.layers.size()) return false;
  for (size_t l = 0; l < a.layers.size(); ++l) {
    const LayerSelectionPlan &x = a.layers[l], &y = b.layers[l];
    if (x.refresh_interval != y.refresh_interval || x.approx_channels != y.approx_channels) {
      return false;
    }
  }
  return true;
}

// Batch items grouped by plan: an item joins the first group whose first plan `same` matches
// its own, else starts a new group (groups in order of first appearance).
class PlanGroups {
 public:
  explicit PlanGroups(bool (*same)(const SelectionPlan&, const SelectionPlan&)) : same_(same) {}

  void Add(const SelectionPlan& plan, size_t item) {
    size_t g = 0;
    while (g < plans_.size() && !same_(*plans_[g], plan)) ++g;
    if (g == plans_.size()) {
      plans_.push_back(&plan);
      items_.emplace_back();
    }
    items_[g].push_back(item);
  }
  std::vector<std::vector<size_t>>& items() { return items_; }

 private:
  bool (*same_)(const SelectionPlan&, const SelectionPlan&);
  std::vector<const SelectionPlan*> plans_;
  std::vector<std::vector<size_t>> items_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(const CudaBackendOptions& o) {
  if (o.model_dir.empty()) return absl::InvalidArgumentError("model_dir is empty");
  CudaModelOptions mo;
  mo.model_dir = o.model_dir;
  mo.page_size = o.page_size;
  mo.kv_cache_bytes = o.kv_cache_bytes;
  mo.max_context = o.max_context;
  mo.device = o.device;
  ASSIGN_OR_RETURN(std::unique_ptr<CudaModel> model, CudaModel::Create(mo));
  ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer,
                   Tokenizer::LoadFromModelDir(o.model_dir, model->config().vocab_size));
  return std::make_unique<CudaBackend>(std::move(model), std::move(tokenizer), o.device_sampling);
}

CudaBackend::CudaBackend(std::unique_ptr<CudaModel> model, std::unique_ptr<Tokenizer> tokenizer,
                         bool device_sampling)
    : model_(std::move(model)),
      tokenizer_(std::move(tokenizer)),
      device_sampling_(device_sampling) {}

absl::Status CudaBackend::SupportsPlan(const SelectionPlan& plan) const {
  return CudaModel::SupportsPlan(model_->config(), model_->page_size(), plan);
}

CudaBackend::SeqId CudaBackend::CreateSequence() {
  const SeqId id = model_->CreateSequence();
  live_.insert(id);
  return id;
}

absl::Status CudaBackend::FreeSequence(SeqId seq) {
  RETURN_IF_ERROR(model_->FreeSequence(seq));
  live_.erase(seq);
  return absl::OkStatus();
}

absl::StatusOr<int> CudaBackend::SequenceLength(SeqId seq) const {
  return model_->SequenceLength(seq);
}

absl::Status CudaBackend::ValidateSplitStep(std::span<const StepItem> items) const {
  ASSIGN_OR_RETURN(const StepDemand demand,
                   ValidateStepItems(items, model_->config().vocab_size, model_->max_context(),
                                     model_->page_size(), [this](int64_t seq) -> std::optional<int> {
                                       absl::StatusOr<int> len = model_->SequenceLength(seq);
                                       if (!len.ok()) return std::nullopt;
                                       return *len;
                                     }));
  if (demand.new_pages > model_->free_pages()) {
    return absl::ResourceExhaustedError(absl::StrCat("step needs ", demand.new_pages,
                                                     " new KV pages; ", model_->free_pages(),
                                                     " are free"));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::RunParts(
    std::span<const StepItem> items,
    const std::function<absl::Status(std::span<const CudaModel::StepItem>,
                                     const std::vector<size_t>&)>& run_part) {
  // Plans: the GPU prefill applies PSAW's band and ETF; SupportsPlan says which run.
  for (size_t b = 0; b < items.size(); ++b) {
    const SelectionPlan* p = items[b].prefill_plan;
    if (p == nullptr && items[b].selector != nullptr) p = &items[b].selector->plan();
    if (p != nullptr) {
      absl::Status s = SupportsPlan(*p);
      if (!s.ok()) return absl::Status(s.code(), absl::StrCat("batch item ", b, ": ", s.message()));
    }
  }
  // Parts: the multi-token items (prefill chunks: the generic attention kernel), then one part
  // per group of PrHS items whose CIS scalars agree; other single-token items (dense decode,
  // oracle, streaming, Quest and H2O selection, which take no batch-wide scalars, HShare items
  // with the first HShare item's scalars, or a policy CudaModel then refuses) join the first
  // PrHS group, else part 0; HShare items whose scalars differ from the first's get one part per
  // distinct setting, last.
  std::vector<size_t> multi_token, plain_decode;
  PlanGroups prhs(SameCisScalars), hshare(SameHShareScalars);
  const SelectionPlan* first_hshare = nullptr;
  for (size_t b = 0; b < items.size(); ++b) {
    const SelectionPlan* p = DecodePlan(items[b]);
    if (p != nullptr && p->policy == SelectionPolicy::kHShare) {
      if (first_hshare == nullptr) first_hshare = p;
      if (SameHShareScalars(*first_hshare, *p)) {
        plain_decode.push_back(b);
      } else {
        hshare.Add(*p, b);
      }
    } else if (p != nullptr && p->policy == SelectionPolicy::kPrhs) {
      prhs.Add(*p, b);
    } else {
      (items[b].tokens.size() == 1 ? plain_decode : multi_token).push_back(b);
    }
  }
  std::vector<size_t>& host = prhs.items().empty() ? multi_token : prhs.items()[0];
  host.insert(host.end(), plain_decode.begin(), plain_decode.end());
  std::vector<std::vector<size_t>> parts;
  if (!multi_token.empty()) parts.push_back(std::move(multi_token));
  for (std::vector<size_t>& g : prhs.items()) parts.push_back(std::move(g));
  for (std::vector<size_t>& g : hshare.items()) parts.push_back(std::move(g));
  if (parts.size() > 1) RETURN_IF_ERROR(ValidateSplitStep(items));

  for (const std::vector<size_t>& part : parts) {
    std::vector<CudaModel::StepItem> mi(part.size());
    for (size_t j = 0; j < part.size(); ++j) {
      const StepItem& it = items[part[j]];
      mi[j].seq = it.seq;
      mi[j].tokens = it.tokens;
      mi[j].all_logits = it.all_logits;
      mi[j].prefill_plan = it.prefill_plan;  // applied to multi-token items only, as the CPU
      if (const SelectionPlan* p = DecodePlan(it); p != nullptr) {
        mi[j].plan = p;
        mi[j].telemetry = it.selector->mutable_telemetry();
      }
    }
    absl::Status st = run_part(mi, part);
    if (!st.ok()) {
      if (parts.size() == 1) return st;
      // Single-part errors leave every sequence unchanged; here earlier parts have run.
      return absl::Status(st.code(),
                          absl::StrCat("part of a split step failed after ", &part - parts.data(),
                                       " other parts ran: ", st.message()));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::vector<float>>> CudaBackend::Step(std::span<const StepItem> items,
                                                                  bool causal) {
  std::vector<std::vector<float>> out(items.size());
  RETURN_IF_ERROR(RunParts(items, [&](std::span<const CudaModel::StepItem> mi,
                                      const std::vector<size_t>& part) -> absl::Status {
    ASSIGN_OR_RETURN(std::vector<std::vector<float>> logits, model_->Step(mi, causal));
    for (size_t j = 0; j < part.size(); ++j) out[part[j]] = std::move(logits[j]);
    return absl::OkStatus();
  }));
  return out;
}

absl::StatusOr<std::vector<int32_t>> CudaBackend::StepSample(std::span<const StepItem> items,
                                                             std::span<const TokenDraw> draws,
                                                             bool causal) {
  if (!device_sampling_) return ModelBackend::StepSample(items, draws, causal);
  RETURN_IF_ERROR(ValidateDraws(items.size(), draws));
  std::vector<int32_t> out(items.size(), -1);
  RETURN_IF_ERROR(RunParts(items, [&](std::span<const CudaModel::StepItem> mi,
                                      const std::vector<size_t>& part) -> absl::Status {
    std::vector<TokenDraw> d(part.size());
    for (size_t j = 0; j < part.size(); ++j) d[j] = draws[part[j]];
    ASSIGN_OR_RETURN(std::vector<int32_t> ids, model_->StepSample(mi, d, causal));
    for (size_t j = 0; j < part.size(); ++j) out[part[j]] = ids[j];
    return absl::OkStatus();
  }));
  return out;
}

}  // namespace prehoc
