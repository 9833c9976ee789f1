// CudaDlmModel in a build without CUDA / cuBLAS: Create reports UNAVAILABLE (use DlmModel).
#include "absl/status/status.h"
#include "worker/dlm/cuda_forward.h"

namespace prehoc::dlm {

struct CudaDlmModel::Impl {};

absl::StatusOr<std::unique_ptr<CudaDlmModel>> CudaDlmModel::Create(const CudaDlmOptions&) {
  return absl::UnavailableError("cuda: this binary was built without CUDA (PREHOC_ENABLE_CUDA off "
                                "or cuBLAS not found)");
}

CudaDlmModel::~CudaDlmModel() = default;
const ModelConfig& CudaDlmModel::config() const { return config_; }
int CudaDlmModel::mask_id() const { return mask_id_; }
std::span<const int> CudaDlmModel::eos_ids() const { return eos_ids_; }
int CudaDlmModel::proxy_rank() const { return proxy_rank_; }
std::string CudaDlmModel::backend_name() const { return "cuda (unavailable)"; }
std::string CudaDlmModel::device_name() const { return device_name_; }
int64_t CudaDlmModel::weight_bytes() const { return weight_bytes_; }
std::string CudaDlmModel::gemm_tuning_summary() const { return "gemm tuning off"; }
std::string CudaDlmModel::graph_summary() const { return "cuda graphs off"; }
std::vector<std::pair<std::string, double>> CudaDlmModel::TakeKernelProfile(
    int64_t* forwards) const {
  if (forwards != nullptr) *forwards = 0;
  return {};
}
absl::StatusOr<std::unique_ptr<DlmCache>> CudaDlmModel::NewCache(int) const {
  return absl::UnavailableError("cuda: built without CUDA");
}
absl::Status CudaDlmModel::ForwardBatch(std::span<const DlmBatchItem>, ForwardStats*) const {
  return absl::UnavailableError("cuda: built without CUDA");
}

}  // namespace prehoc::dlm
