#include "worker/dlm/calibration.h"

#include <random>

#include "common/status.h"
#include "worker/dlm/decoder.h"

namespace prehoc::dlm {
namespace {

constexpr const char* kSnippets[] = {
    "import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"Entry point.\"\"\"\n    args = parse(argv)\n",
    "class Config(object):\n    def __init__(self, path, verbose=False):\n        self.path = path\n",
    "def load(path):\n    with open(path, \"rb\") as f:\n        data = f.read()\n    return data\n",
    "for i, item in enumerate(items):\n    if item is None:\n        continue\n    result.append(i)\n",
};

}  // namespace

std::vector<std::vector<int32_t>> DefaultCalibrationPrompts(const DlmModel& model) {
  std::vector<std::vector<int32_t>> out;
  if (const Tokenizer* tok = model.tokenizer(); tok != nullptr) {
    for (const char* s : kSnippets) out.push_back(tok->Encode(s, /*add_bos=*/true));
    return out;
  }
  std::mt19937_64 rng(20251123);
  const int hi = std::min(model.config().vocab_size, 256);
  for (int p = 0; p < 4; ++p) {
    std::vector<int32_t> ids;
    while (ids.size() < 48) {
      const int32_t t = static_cast<int32_t>(rng() % hi);
      if (t != model.mask_id()) ids.push_back(t);
    }
    out.push_back(std::move(ids));
  }
  return out;
}

absl::StatusOr<std::vector<double>> MeasureDriftProfile(
    const DlmModel& model, const std::vector<std::vector<int32_t>>& prompts,
    const CalibrationOptions& options) {
  ASSIGN_OR_RETURN(DriftProfile d, MeasureDrift(model, prompts, options));
  return d.output;
}

absl::StatusOr<DriftProfile> MeasureDrift(const DlmModel& model,
                                          const std::vector<std::vector<int32_t>>& prompts,
                                          const CalibrationOptions& options) {
  if (model.proxy_rank() <= 0) {
    return absl::FailedPreconditionError("spa-auto calibration needs singular proxies (proxy_rank > 0)");
  }
  const std::vector<std::vector<int32_t>> defaults =
      prompts.empty() ? DefaultCalibrationPrompts(model) : std::vector<std::vector<int32_t>>{};
  const auto& use = prompts.empty() ? defaults : prompts;
  // SPA with a full refresh every step is exact (vanilla) decoding that also stores the proxies
  // of the response rows at every step; the forward stats then hold Σ(1 − cos) per layer.
  ASSIGN_OR_RETURN(DlmSchedule schedule,
                   MakeDlmSchedule(model.config(), "spa", {{"r_full", 1}}));
  const int NL = model.config().num_hidden_layers;
  std::vector<double> sum(NL, 0.0), osum(NL, 0.0);
  std::vector<int64_t> count(NL, 0), ocount(NL, 0);
  for (const auto& prompt : use) {
    DiffuseRequest req;
    req.prompt = prompt;
    req.options.gen_length = options.gen_length;
    req.options.block_length = options.block_length;
    req.options.steps = options.steps;
    req.options.cache = "spa";
    ASSIGN_OR_RETURN(DiffuseResult r, DiffuseWithSchedule(model, req, schedule));
    for (int l = 0; l < NL; ++l) {
      sum[l] += r.stats.forward.drift_sum[l];
      count[l] += r.stats.forward.drift_count[l];
      osum[l] += r.stats.forward.out_drift_sum[l];
      ocount[l] += r.stats.forward.out_drift_count[l];
    }
  }
  DriftProfile d;
  d.proxy.assign(NL, 0.0);
  d.output.assign(NL, 0.0);
  for (int l = 1; l < NL; ++l) {
    d.proxy[l] = count[l] > 0 ? sum[l] / count[l] : 0.0;
    d.output[l] = ocount[l] > 0 ? osum[l] / ocount[l] : 0.0;
  }
  return d;
}

}  // namespace prehoc::dlm
