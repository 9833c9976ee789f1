// Status helpers shared by every prehoc module.
//
// Errors are values: functions that can fail return absl::Status or absl::StatusOr<T>.
//   RETURN_IF_ERROR(expr);              // returns the status of `expr` if it is not OK
//   ASSIGN_OR_RETURN(auto x, expr);     // x = *expr, or returns expr's status
#ifndef PREHOC_COMMON_STATUS_H_
#define PREHOC_COMMON_STATUS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define PREHOC_STATUS_CONCAT_INNER_(a, b) a##b
#define PREHOC_STATUS_CONCAT_(a, b) PREHOC_STATUS_CONCAT_INNER_(a, b)

#define RETURN_IF_ERROR(expr)                                   \
  do {                                                          \
    ::absl::Status prehoc_status_ = (expr);                     \
    if (!prehoc_status_.ok()) return prehoc_status_;            \
  } while (0)

#define PREHOC_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                  \
  if (!tmp.ok()) return std::move(tmp).status();      \
  lhs = std::move(tmp).value()

#define ASSIGN_OR_RETURN(lhs, expr) \
  PREHOC_ASSIGN_OR_RETURN_IMPL_(PREHOC_STATUS_CONCAT_(prehoc_statusor_, __LINE__), lhs, expr)

#endif  // PREHOC_COMMON_STATUS_H_
