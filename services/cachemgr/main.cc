// prehoc-cachemgr: the cache manager (client front door + worker registry). See
// cachemgr_server.h. Prints one line to stdout once serving:
//   prehoc-cachemgr ready grpc_port=PORT metrics_port=PORT
// SIGTERM / SIGINT drain (readiness false, active streams finish until --drain-timeout-s).
#include <iostream>
#include <string>
#include <vector>

#include "common/logging.h"
#include "services/cachemgr/cachemgr_server.h"
#include "services/common/flags.h"
#include "services/common/server_util.h"

int main(int argc, char** argv) {
  using namespace prehoc;
  InstallTerminationHandler();
  std::vector<std::string> args(argv, argv + argc);
  CacheManagerServerOptions o;
  o.listen_address = "0.0.0.0:50051";
  o.metrics_address = "0.0.0.0:9091";
  int heartbeat_ms = 1000;
  double drain_timeout_s = 30;
  std::string log_level = "info";
  FlagSet f(
      "Usage: prehoc-cachemgr [flags]\n\n"
      "The prehoc cache manager: serves prehoc.v1.Inference to clients, places requests on\n"
      "registered prehoc-worker processes (prehoc.v1.CacheManager: register + heartbeat) and\n"
      "relays their token streams. A worker that misses two heartbeats is declared dead: its\n"
      "streams end UNAVAILABLE and its pages are released. grpc.health.v1 readiness = at least\n"
      "one ready worker; server reflection; Prometheus /metrics.");
  f.String("listen", &o.listen_address, "gRPC listen address host:port (port 0 = any)");
  f.String("metrics-listen", &o.metrics_address,
           "Prometheus /metrics address host:port (empty = off)");
  f.Int("heartbeat-interval-ms", &heartbeat_ms, "interval workers heartbeat at");
  f.Int("missed-heartbeats", &o.missed_heartbeats, "missed intervals before a worker is dead");
  f.String("id-prefix", &o.id_prefix, "prefix of sequence ids (default: cm + start time)");
  f.Int64("max-request-bytes", &o.max_request_bytes, "largest request message accepted");
  f.Double("drain-timeout-s", &drain_timeout_s, "graceful drain time on SIGTERM");
  f.String("log-level", &log_level, "debug, info, warning or error");
  bool help = false;
  if (absl::Status s = f.Parse(args, 1, &help); !s.ok()) {
    std::cerr << "prehoc-cachemgr: " << s.message() << "\n\n" << f.Usage();
    return 2;
  }
  if (help) {
    std::cout << f.Usage();
    return 0;
  }
  LogLevel level;
  if (!ParseLogLevel(log_level, &level)) {
    std::cerr << "prehoc-cachemgr: invalid --log-level '" << log_level << "'\n";
    return 2;
  }
  SetMinLogLevel(level);
  if (heartbeat_ms <= 0 || o.missed_heartbeats < 1) {
    std::cerr << "prehoc-cachemgr: --heartbeat-interval-ms must be > 0 and --missed-heartbeats >= 1\n";
    return 2;
  }
  o.heartbeat_interval = absl::Milliseconds(heartbeat_ms);
  auto server = CacheManagerServer::Create(o);
  if (!server.ok()) {
    std::cerr << "prehoc-cachemgr: " << server.status() << "\n";
    return 1;
  }
  std::cout << "prehoc-cachemgr ready grpc_port=" << (*server)->port()
            << " metrics_port=" << (*server)->metrics_port() << std::endl;
  const int sig = WaitForTerminationSignal();
  LOG(INFO) << "signal " << sig << ": draining for up to " << drain_timeout_s << " s";
  (*server)->Shutdown(absl::Now() + absl::Seconds(drain_timeout_s));
  server->reset();
  return 0;
}
