#include "cachemgr/relay.h"

#include "absl/strings/str_cat.h"

namespace prehoc {

const char* RelayOutcome(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk: return "ok";
    case absl::StatusCode::kCancelled: return "cancelled";
    case absl::StatusCode::kDeadlineExceeded: return "deadline_exceeded";
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition: return "invalid_argument";
    case absl::StatusCode::kResourceExhausted: return "resource_exhausted";
    case absl::StatusCode::kUnavailable: return "unavailable";
    default: return "error";
  }
}

const std::vector<std::string>& RelayOutcomes() {
  static const auto* const kOutcomes = new std::vector<std::string>{
      "ok", "cancelled", "deadline_exceeded", "invalid_argument", "resource_exhausted",
      "unavailable", "error"};
  return *kOutcomes;
}

absl::Status DeadWorkerStatus(const std::string& worker_id) {
  return absl::UnavailableError(
      absl::StrCat("worker ", worker_id, " stopped heartbeating; retry the request"));
}

}  // namespace prehoc
