// The one mapping between absl::Status and grpc::Status (the codes are numerically identical).
#ifndef PREHOC_COMMON_GRPC_STATUS_H_
#define PREHOC_COMMON_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace prehoc {

// Returns a grpc::Status with the same code and message as `status`.
grpc::Status ToGrpcStatus(const absl::Status& status);

// Returns an absl::Status with the same code and message as `status`.
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace prehoc

#endif  // PREHOC_COMMON_GRPC_STATUS_H_
