#include "services/common/test_util.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <grpcpp/generic/generic_stub.h>

#include "absl/strings/str_cat.h"
#include "common/grpc_status.h"
#include "google/protobuf/unknown_field_set.h"

namespace prehoc::testing {

absl::StatusOr<std::string> HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::UnavailableError("socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("connect to port ", port));
  }
  const std::string req =
      absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
  if (write(fd, req.data(), req.size()) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return absl::UnavailableError("write");
  }
  std::string resp;
  char buf[8192];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) resp.append(buf, static_cast<size_t>(n));
  close(fd);
  const size_t body = resp.find("\r\n\r\n");
  if (body == std::string::npos) return absl::UnavailableError("malformed HTTP response");
  return resp.substr(body + 4);
}

absl::StatusOr<std::vector<std::string>> ListServicesByReflection(
    const std::shared_ptr<grpc::Channel>& channel) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::CompletionQueue cq;
  auto call = stub.PrepareCall(
      &ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag;
  bool ok;
  auto step = [&](intptr_t want) {
    return cq.Next(&tag, &ok) && ok && reinterpret_cast<intptr_t>(tag) == want;
  };
  call->StartCall(reinterpret_cast<void*>(1));
  if (!step(1)) return absl::UnavailableError("reflection: start failed");
  // ServerReflectionRequest{list_services (field 7) = ""}.
  const char req_bytes[] = {0x3A, 0x00};
  grpc::Slice slice(req_bytes, sizeof(req_bytes));
  grpc::ByteBuffer req(&slice, 1);
  call->Write(req, reinterpret_cast<void*>(2));
  if (!step(2)) return absl::UnavailableError("reflection: write failed");
  grpc::ByteBuffer resp;
  call->Read(&resp, reinterpret_cast<void*>(3));
  if (!step(3)) return absl::UnavailableError("reflection: read failed");
  call->WritesDone(reinterpret_cast<void*>(4));
  step(4);
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  step(5);
  std::vector<grpc::Slice> slices;
  if (!resp.Dump(&slices).ok()) return absl::InternalError("reflection: bad buffer");
  std::string bytes;
  for (const grpc::Slice& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  // ServerReflectionResponse.list_services_response (6) -> ListServiceResponse.service (1)
  // -> ServiceResponse.name (1).
  google::protobuf::UnknownFieldSet top;
  if (!top.ParseFromString(bytes)) return absl::InternalError("reflection: bad response");
  std::vector<std::string> names;
  for (int i = 0; i < top.field_count(); ++i) {
    if (top.field(i).number() != 6) continue;
    google::protobuf::UnknownFieldSet list;
    if (!list.ParseFromString(top.field(i).length_delimited())) continue;
    for (int j = 0; j < list.field_count(); ++j) {
      google::protobuf::UnknownFieldSet svc;
      if (!svc.ParseFromString(list.field(j).length_delimited())) continue;
      for (int k = 0; k < svc.field_count(); ++k) {
        if (svc.field(k).number() == 1) names.push_back(svc.field(k).length_delimited());
      }
    }
  }
  return names;
}

absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> CheckHealth(
    const std::shared_ptr<grpc::Channel>& channel, const std::string& service) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  grpc::Status s = stub->Check(&ctx, req, &resp);
  if (!s.ok()) return FromGrpcStatus(s);
  return resp.status();
}

HealthWatch::HealthWatch(const std::shared_ptr<grpc::Channel>& channel,
                         const std::string& service)
    : stub_(grpc::health::v1::Health::NewStub(channel)) {
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  reader_ = stub_->Watch(&ctx_, req);
}

HealthWatch::~HealthWatch() {
  ctx_.TryCancel();
  grpc::health::v1::HealthCheckResponse h;
  while (reader_->Read(&h)) {
  }
  static_cast<void>(reader_->Finish());  // CANCELLED
}

bool HealthWatch::Await(grpc::health::v1::HealthCheckResponse::ServingStatus want) {
  grpc::health::v1::HealthCheckResponse h;
  while (reader_->Read(&h)) {
    if (h.status() == want) return true;
  }
  return false;
}

std::function<void()> StepGate::Hook() {
  return [this] {
    absl::MutexLock l(&mu_);
    if (++calls_ == block_at_) {
      reached_ = true;
      mu_.Await(absl::Condition(&open_));
    }
  };
}

bool StepGate::WaitReached(absl::Time deadline) {
  absl::MutexLock l(&mu_);
  return mu_.AwaitWithDeadline(absl::Condition(&reached_), deadline);
}

void StepGate::Open() {
  absl::MutexLock l(&mu_);
  open_ = true;
}

}  // namespace prehoc::testing
