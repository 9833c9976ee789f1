// Small filesystem helpers shared by the loaders (config.json, generation_config.json,
// safetensors index files).
#ifndef PREHOC_COMMON_FILE_UTIL_H_
#define PREHOC_COMMON_FILE_UTIL_H_

#include <string>

#include "absl/status/statusor.h"

namespace prehoc {

// Returns the whole file at `path`. Errors name the path: NOT_FOUND when it does not exist,
// INVALID_ARGUMENT when it exists but cannot be opened (with the OS reason) or read.
absl::StatusOr<std::string> ReadWholeFile(const std::string& path);

}  // namespace prehoc

#endif  // PREHOC_COMMON_FILE_UTIL_H_
