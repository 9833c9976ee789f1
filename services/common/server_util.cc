#include "services/common/server_util.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace prehoc {

std::string WithPort(const std::string& address, int port) {
  const size_t colon = address.rfind(':');
  const std::string host = colon == std::string::npos ? address : address.substr(0, colon);
  return absl::StrCat(host, ":", port);
}

absl::StatusOr<GrpcServer> StartGrpcServer(const std::string& address,
                                           const std::vector<grpc::Service*>& services,
                                           int max_receive_message_bytes) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  GrpcServer out;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &out.port);
  builder.SetMaxReceiveMessageSize(max_receive_message_bytes);
  for (grpc::Service* s : services) builder.RegisterService(s);
  out.server = builder.BuildAndStart();
  if (out.server == nullptr || out.port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", address));
  }
  grpc::HealthCheckServiceInterface* health = out.server->GetHealthCheckService();
  health->SetServingStatus("", true);
  health->SetServingStatus("liveness", true);
  SetReadiness(out.server.get(), false);
  return out;
}

void SetLiveness(grpc::Server* server, bool live) {
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus("", live);
  health->SetServingStatus("liveness", live);
}

void SetReadiness(grpc::Server* server, bool ready) {
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  if (health == nullptr) return;
  // "readiness" last: whoever sees it change also sees the service's status changed.
  health->SetServingStatus("prehoc.v1.Inference", ready);
  health->SetServingStatus("readiness", ready);
}

absl::StatusOr<MetricsEndpoint> StartMetricsEndpoint(
    const std::string& address, const std::shared_ptr<prometheus::Registry>& registry) {
  MetricsEndpoint out;
  ASSIGN_OR_RETURN(out.server, MetricsHttpServer::Start(address, registry));
  out.port = out.server->port();
  return out;
}

void InstallTerminationHandler() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int WaitForTerminationSignal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  int sig = 0;
  while (sigwait(&set, &sig) != 0) {
  }
  return sig;
}

}  // namespace prehoc
