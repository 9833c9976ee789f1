#include "worker/backend_factory.h"

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "worker/backends/cuda/cuda_backend.h"

namespace prehoc {

absl::StatusOr<std::unique_ptr<ModelBackend>> CreateBackend(const BackendOptions& o,
                                                            std::string* why) {
  if (o.device != "auto" && o.device != "cpu" && o.device != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("device: '", o.device, "' is not one of auto, cpu, cuda"));
  }
  std::string reason;
  if (o.device != "cpu") {
    if (o.engine.weights != nullptr && o.engine.model_dir.empty()) {
      reason = "the CUDA backend loads a model directory, and only in-memory weights were given";
      if (o.device == "cuda") return absl::InvalidArgumentError(absl::StrCat("device: ", reason));
    } else {
      CudaBackendOptions co;
      co.model_dir = o.engine.model_dir;
      co.page_size = o.engine.page_size;
      co.kv_cache_bytes = o.engine.kv_cache_bytes;
      co.max_context = o.engine.max_context;
      co.device = o.cuda_device;
      absl::StatusOr<std::unique_ptr<CudaBackend>> cuda = CudaBackend::Create(co);
      if (cuda.ok()) {
        reason = absl::StrCat("device=", o.device, ": using CUDA on ", (*cuda)->description());
        LOG(INFO) << reason;
        if (why != nullptr) *why = reason;
        return std::unique_ptr<ModelBackend>(std::move(*cuda));
      }
      if (o.device == "cuda") {
        return absl::Status(cuda.status().code(),
                            absl::StrCat("device=cuda: ", cuda.status().message()));
      }
      reason = std::string(cuda.status().message());
    }
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, Engine::Create(o.engine));
  reason = o.device == "cpu"
               ? absl::StrCat("device=cpu: using the CPU engine (", engine->description(), ")")
               : absl::StrCat("device=auto: using the CPU engine (", engine->description(),
                              ") because: ", reason);
  LOG(INFO) << reason;
  if (why != nullptr) *why = reason;
  return std::unique_ptr<ModelBackend>(std::move(engine));
}

}  // namespace prehoc
