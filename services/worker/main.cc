// prehoc-worker: serves one model with continuous batching. See worker_server.h.
// On start it prints one line to stdout once serving:
//   prehoc-worker ready grpc=HOST:PORT metrics_port=PORT id=WORKER_ID
// SIGTERM / SIGINT drain gracefully (readiness false, in-flight requests finish until
// --drain-timeout-s), then exit 0.
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "services/common/flags.h"
#include "services/common/server_util.h"
#include "services/worker/worker_server.h"

int main(int argc, char** argv) {
  using namespace prehoc;
  InstallTerminationHandler();
  std::vector<std::string> args(argv, argv + argc);

  WorkerServerOptions o;
  o.engine.model_dir = "models/prehoc-code-ar";
  o.device = "auto";
  o.listen_address = "0.0.0.0:50052";
  o.metrics_address = "0.0.0.0:9092";
  int64_t kv_cache_mb = 1024;
  int step_delay_ms = 0;
  double drain_timeout_s = 30;
  std::string policies;
  std::string log_level = "info";
  FlagSet f(
      "Usage: prehoc-worker [flags]\n\n"
      "Serves a Hugging Face Llama/Mistral/Qwen2 model over gRPC (prehoc.v1.Inference and the\n"
      "internal prehoc.v1.Worker API) with continuous batching, grpc.health.v1 (\"liveness\",\n"
      "\"readiness\"), server reflection and Prometheus /metrics. With --cachemgr it registers\n"
      "with the cache manager and heartbeats.");
  f.String("model", &o.engine.model_dir, "Hugging Face model directory");
  f.String("model-name", &o.model_name, "name served by ListModels (default: directory name)");
  f.String("listen", &o.listen_address, "gRPC listen address host:port (port 0 = any)");
  f.String("metrics-listen", &o.metrics_address,
           "Prometheus /metrics address host:port (empty = off)");
  f.String("cachemgr", &o.cachemgr_address, "cache manager address to register with (empty = standalone)");
  f.String("advertise-address", &o.advertise_address,
           "address the cache manager dials (default: listen host + bound port)");
  f.String("worker-id", &o.worker_id, "registry id (default: the advertise address)");
  f.String("device", &o.device, "auto (CUDA when a device is usable, else CPU), cpu or cuda");
  f.Int("threads", &o.engine.num_threads, "CPU threads for kernels (0 = all cores)");
  f.Int64("kv-cache-mb", &kv_cache_mb, "KV cache size in MiB");
  f.Int("page-size", &o.engine.page_size, "tokens per KV page");
  f.Int("max-context", &o.engine.max_context, "longest sequence (0 = the model's)");
  f.Int("max-running", &o.scheduler.max_running, "requests in the running batch at once");
  f.Int("max-queue", &o.scheduler.max_queue,
        "requests waiting for admission before RESOURCE_EXHAUSTED");
  f.Int("max-step-tokens", &o.scheduler.max_step_tokens,
        "tokens per engine step (decode + prefill chunks)");
  f.Int("prefill-chunk", &o.scheduler.prefill_chunk, "prompt tokens of one request per step");
  f.Int("max-tokens-limit", &o.scheduler.max_tokens_limit,
        "largest max_tokens accepted (0 = the context)");
  f.String("policies", &policies, "comma-separated sparsity policies to serve (default: all)");
  f.String("default-policy", &o.scheduler.default_policy, "policy for requests naming none");
  f.Int64("max-request-bytes", &o.max_request_bytes, "largest request message accepted");
  f.Int("dlm-max-running", &o.dlm.max_running,
        "diffusion models: Diffuse requests decoding at once (batched per step)");
  f.Int("dlm-max-queue", &o.dlm.max_queue,
        "diffusion models: Diffuse requests waiting before RESOURCE_EXHAUSTED");
  f.Int("dlm-max-gen-length", &o.dlm.max_gen_length, "diffusion models: largest gen_length");
  f.Bool("dlm-calibrate", &o.dlm_calibrate,
         "diffusion models: measure the drift profile at load (enables cache spa-auto)");
  f.Bool("liveness-follows-backend", &o.liveness_follows_backend,
         "after a backend (device) failure also turn health 'liveness' NOT_SERVING, so a "
         "liveness probe restarts the process (default: only readiness goes NOT_SERVING)");
  f.Double("drain-timeout-s", &drain_timeout_s, "graceful drain time on SIGTERM");
  f.Int("debug-step-delay-ms", &step_delay_ms,
        "artificial delay per engine step (tests and benchmarks only)");
  f.String("log-level", &log_level, "debug, info, warning or error");
  bool help = false;
  if (absl::Status s = f.Parse(args, 1, &help); !s.ok()) {
    std::cerr << "prehoc-worker: " << s.message() << "\n\n" << f.Usage();
    return 2;
  }
  if (help) {
    std::cout << f.Usage();
    return 0;
  }
  LogLevel level;
  if (!ParseLogLevel(log_level, &level)) {
    std::cerr << "prehoc-worker: invalid --log-level '" << log_level << "'\n";
    return 2;
  }
  SetMinLogLevel(level);
  if (kv_cache_mb <= 0) {
    std::cerr << "prehoc-worker: --kv-cache-mb must be > 0\n";
    return 2;
  }
  o.engine.kv_cache_bytes = kv_cache_mb << 20;
  o.scheduler.step_delay = absl::Milliseconds(step_delay_ms);
  if (!policies.empty()) {
    o.scheduler.sparsity_policies = absl::StrSplit(policies, ',', absl::SkipWhitespace());
  }

  auto server = WorkerServer::Create(o);
  if (!server.ok()) {
    std::cerr << "prehoc-worker: " << server.status() << "\n";
    return 1;
  }
  std::cout << "prehoc-worker ready grpc=" << (*server)->address()
            << " metrics_port=" << (*server)->metrics_port() << " id=" << (*server)->worker_id()
            << std::endl;
  const int sig = WaitForTerminationSignal();
  LOG(INFO) << "signal " << sig << ": draining for up to " << drain_timeout_s << " s";
  (*server)->Shutdown(absl::Now() + absl::Seconds(drain_timeout_s));
  server->reset();
  return 0;
}
