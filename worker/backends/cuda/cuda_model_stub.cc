// CudaModel for builds without CUDA (no nvcc or no cuBLAS): Create reports UNAVAILABLE, so
// callers fall back to the CPU engine. No CudaModel object can exist in such a build; the other
// members are never reached.
#include "absl/strings/str_cat.h"
#include "worker/backends/cuda/cuda_model.h"

namespace prehoc {

struct CudaModel::Impl {
  ModelConfig config;
};

absl::StatusOr<std::unique_ptr<CudaModel>> CudaModel::Create(const CudaModelOptions&) {
  return absl::UnavailableError(
      "CUDA backend unavailable: prehoc was built without CUDA (nvcc or cuBLAS not found); use "
      "the CPU engine");
}

CudaModel::CudaModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaModel::~CudaModel() = default;
const ModelConfig& CudaModel::config() const { return impl_->config; }
int CudaModel::max_context() const { return 0; }
int CudaModel::page_size() const { return 0; }
int32_t CudaModel::num_pages() const { return 0; }
int32_t CudaModel::free_pages() const { return 0; }
int64_t CudaModel::weight_bytes() const { return 0; }
int64_t CudaModel::kv_bytes_per_token() const { return 0; }
std::string CudaModel::device_name() const { return ""; }
void* CudaModel::cuda_stream() const { return nullptr; }
CudaModel::SeqId CudaModel::CreateSequence() { return 0; }
absl::Status CudaModel::FreeSequence(SeqId) { return absl::UnavailableError("no CUDA"); }
absl::StatusOr<int> CudaModel::SequenceLength(SeqId) const {
  return absl::UnavailableError("no CUDA");
}
absl::StatusOr<int64_t> CudaModel::AliasedPages(SeqId) const {
  return absl::UnavailableError("no CUDA");
}
absl::StatusOr<std::vector<std::vector<float>>> CudaModel::Step(std::span<const StepItem>, bool,
                                                                std::vector<int32_t>*,
                                                                const CudaKvSelection*) {
  return absl::UnavailableError("no CUDA");
}
absl::StatusOr<std::vector<int32_t>> CudaModel::StepSample(std::span<const StepItem>,
                                                           std::span<const TokenDraw>, bool,
                                                           std::vector<std::vector<float>>*) {
  return absl::UnavailableError("no CUDA");
}
absl::Status CudaModel::DecodeGreedyAsync(std::span<const SeqId>, const int32_t*, int32_t*,
                                          const CudaKvSelection*) {
  return absl::UnavailableError("no CUDA");
}
absl::Status CudaModel::DecodeGreedyAsync(std::span<const SeqId>, const int32_t*, int32_t*,
                                          std::span<const SelectionPlan* const>,
                                          std::span<SelectionTelemetry* const>) {
  return absl::UnavailableError("no CUDA");
}
absl::Status CudaModel::Synchronize() { return absl::UnavailableError("no CUDA"); }
absl::Status CudaModel::AppendUninitialized(SeqId, int) { return absl::UnavailableError("no CUDA"); }
absl::Status CudaModel::FillKvRandom(uint64_t) { return absl::UnavailableError("no CUDA"); }

}  // namespace prehoc
