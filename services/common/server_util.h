// Shared plumbing of the prehoc servers: a gRPC server with gRPC's health service and server
// reflection, the Prometheus /metrics endpoint (metrics_http.h), and SIGTERM/SIGINT handling.
//
// Health service names (grpc.health.v1):
//   ""  and "liveness"                    SERVING while the process runs (liveness probe);
//                                         optionally NOT_SERVING after a backend failure
//   "readiness" and "prehoc.v1.Inference" SERVING when ready to serve (readiness probe)
#ifndef PREHOC_SERVICES_COMMON_SERVER_UTIL_H_
#define PREHOC_SERVICES_COMMON_SERVER_UTIL_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "prometheus/registry.h"
#include "services/common/metrics_http.h"

namespace prehoc {

struct GrpcServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;  // the bound port (resolved when the address asked for port 0)
};

// Builds and starts a server on `address` ("host:port", port 0 = any free port) with
// `services` (not owned; must outlive the server), health checking (all names NOT_SERVING for
// readiness until SetReadiness(true)) and reflection. UNAVAILABLE when the address cannot be
// bound.
absl::StatusOr<GrpcServer> StartGrpcServer(const std::string& address,
                                           const std::vector<grpc::Service*>& services,
                                           int max_receive_message_bytes);

// Sets the readiness health names (liveness stays SERVING). Thread-safe.
void SetReadiness(grpc::Server* server, bool ready);
// Sets the liveness health names ("" and "liveness"; SERVING from StartGrpcServer on). A server
// sets them NOT_SERVING only when asked to (--liveness-follows-backend: a failed device then
// fails the liveness probe, so the orchestrator restarts the process), and before turning
// readiness off, so that whoever sees readiness NOT_SERVING also sees liveness. Thread-safe.
void SetLiveness(grpc::Server* server, bool live);

struct MetricsEndpoint {
  std::unique_ptr<MetricsHttpServer> server;
  int port = 0;
};
// Serves `registry` at http://address/metrics (services/common/metrics_http.h). UNAVAILABLE when
// the address cannot be bound, INVALID_ARGUMENT when it is malformed.
absl::StatusOr<MetricsEndpoint> StartMetricsEndpoint(
    const std::string& address, const std::shared_ptr<prometheus::Registry>& registry);

// Blocks SIGTERM and SIGINT in the calling thread, so that every thread started afterwards
// inherits the mask and only WaitForTerminationSignal() receives them (sigwait: no async
// handler, which also keeps sanitizers happy). Call first thing in main(), before any thread
// exists. Processes started from this one must unblock the signals before exec.
void InstallTerminationHandler();
// Waits for SIGTERM or SIGINT (see InstallTerminationHandler) and returns its number.
int WaitForTerminationSignal();

// "host:port" with the port replaced by `port` (for addresses given with port 0).
std::string WithPort(const std::string& address, int port);

}  // namespace prehoc

#endif  // PREHOC_SERVICES_COMMON_SERVER_UTIL_H_
