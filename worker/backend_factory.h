// Picks and creates the model backend for a server or the CLI: `--device auto|cpu|cuda`.
//   cpu   the CPU Engine (the reference; every policy and prefill plan);
//   cuda  the CUDA backend; without a usable device (or in a build without CUDA) the error says
//         why (UNAVAILABLE);
//   auto  CUDA when a device is usable, else the CPU engine; a log line says which and why.
#ifndef PREHOC_WORKER_BACKEND_FACTORY_H_
#define PREHOC_WORKER_BACKEND_FACTORY_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "worker/backend.h"
#include "worker/engine.h"

namespace prehoc {

struct BackendOptions {
  // "auto", "cpu" or "cuda".
  std::string device = "auto";
  // Model directory, page size, KV memory and max_context apply to both backends (the CUDA
  // backend's pools are bf16, so the same kv_cache_bytes holds twice the pages); num_threads and
  // `weights` only to the CPU engine (the CUDA backend loads model_dir itself).
  EngineOptions engine;
  // CUDA device ordinal.
  int cuda_device = 0;
};

// The backend `options.device` asks for. Errors: INVALID_ARGUMENT naming `device` for a value
// other than auto / cpu / cuda; with "cuda", CudaBackend::Create's (UNAVAILABLE with the reason
// when no device is usable); otherwise the CPU engine's. `why` (optional) receives one line
// saying which backend was chosen and why.
absl::StatusOr<std::unique_ptr<ModelBackend>> CreateBackend(const BackendOptions& options,
                                                            std::string* why = nullptr);

}  // namespace prehoc

#endif  // PREHOC_WORKER_BACKEND_FACTORY_H_
