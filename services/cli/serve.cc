#include "services/cli/serve.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <thread>

#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/logging.h"
#include "prehoc/v1/inference.grpc.pb.h"
#include "services/common/embedded.h"
#include "services/common/flags.h"
#include "services/common/server_util.h"

namespace prehoc {
namespace {

constexpr char kServeHeader[] =
    "Usage: prehoc serve [flags]\n\n"
    "Embedded mode: loads the model and serves prehoc.v1.Inference (the cache manager's API)\n"
    "from one process, with grpc.health.v1, reflection and Prometheus /metrics. Prints\n"
    "`prehoc serve ready grpc_port=P metrics_port=M` once serving; SIGTERM/SIGINT drain.";

constexpr char kLoadgenHeader[] =
    "Usage: prehoc loadgen [flags]\n\n"
    "Closed-loop load: --streams concurrent clients each send requests back to back until\n"
    "--requests have completed (after --warmup). Target: a server (--target HOST:PORT) or an\n"
    "in-process embedded backend (--model DIR, no gRPC). Prints tokens/s and TTFT /\n"
    "inter-token latency percentiles (ITL: gap between messages spread over their tokens).";

bool SetLogLevel(const std::string& name, std::ostream& err) {
  LogLevel level;
  if (!ParseLogLevel(name, &level)) {
    err << "invalid --log-level '" << name << "'\n";
    return false;
  }
  SetMinLogLevel(level);
  return true;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5));
  return v[i];
}

struct RequestStats {
  bool ok = false;
  std::string error;
  int tokens = 0;
  double ttft_s = 0;
  std::vector<double> itl_s;
};

// One request through a backend-agnostic "send" function: `run(request, on_message)` where
// on_message(tokens_in_message) is called per message and run returns the final status.
using Runner = std::function<absl::Status(const InferenceRequest&, const std::function<void(int)>&)>;

RequestStats Measure(const Runner& run, const InferenceRequest& req) {
  RequestStats s;
  const absl::Time start = absl::Now();
  absl::Time last = start;
  absl::Status st = run(req, [&](int n) {
    if (n <= 0) return;
    const absl::Time now = absl::Now();
    if (s.tokens == 0) {
      s.ttft_s = absl::ToDoubleSeconds(now - start);
      for (int i = 1; i < n; ++i) s.itl_s.push_back(0);
    } else {
      const double gap = absl::ToDoubleSeconds(now - last) / n;
      for (int i = 0; i < n; ++i) s.itl_s.push_back(gap);
    }
    s.tokens += n;
    last = now;
  });
  s.ok = st.ok();
  if (!st.ok()) s.error = std::string(st.message());
  return s;
}

}  // namespace

int RunServe(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  InstallTerminationHandler();
  EmbeddedServerOptions o;
  o.cluster.engine.model_dir = "models/prehoc-code-ar";
  o.cluster.device = "auto";
  o.listen_address = "0.0.0.0:50051";
  o.metrics_address = "0.0.0.0:9091";
  int64_t kv_cache_mb = 1024;
  double drain_timeout_s = 30;
  std::string log_level = "info";
  std::string policies;
  FlagSet f(kServeHeader);
  f.String("model", &o.cluster.engine.model_dir, "Hugging Face model directory");
  f.String("model-name", &o.cluster.model_name, "name served by ListModels (default: directory name)");
  f.String("listen", &o.listen_address, "gRPC listen address host:port (port 0 = any)");
  f.String("metrics-listen", &o.metrics_address, "Prometheus address host:port (empty = off)");
  f.String("device", &o.cluster.device,
           "auto (CUDA when a device is usable, else CPU), cpu or cuda");
  f.Int("threads", &o.cluster.engine.num_threads, "CPU threads (0 = all cores)");
  f.Int64("kv-cache-mb", &kv_cache_mb, "KV cache size in MiB");
  f.Int("max-context", &o.cluster.engine.max_context, "longest sequence (0 = the model's)");
  f.Int("max-running", &o.cluster.scheduler.max_running, "requests in the running batch");
  f.Int("max-queue", &o.cluster.scheduler.max_queue, "waiting requests before RESOURCE_EXHAUSTED");
  f.Int("max-step-tokens", &o.cluster.scheduler.max_step_tokens, "tokens per engine step");
  f.Int("prefill-chunk", &o.cluster.scheduler.prefill_chunk, "prompt tokens of one request per step");
  f.Int("max-tokens-limit", &o.cluster.scheduler.max_tokens_limit, "largest max_tokens (0 = context)");
  f.String("policies", &policies, "comma-separated sparsity policies to serve (default: all)");
  f.Int64("max-request-bytes", &o.max_request_bytes, "largest request message accepted");
  f.Int("dlm-max-running", &o.cluster.dlm.max_running,
        "diffusion models: Diffuse requests decoding at once (batched per step)");
  f.Int("dlm-max-queue", &o.cluster.dlm.max_queue,
        "diffusion models: Diffuse requests waiting before RESOURCE_EXHAUSTED");
  f.Int("dlm-max-gen-length", &o.cluster.dlm.max_gen_length, "diffusion models: largest gen_length");
  f.Bool("dlm-calibrate", &o.cluster.dlm_calibrate,
         "diffusion models: measure the drift profile at load (enables cache spa-auto)");
  f.Double("drain-timeout-s", &drain_timeout_s, "graceful drain time on SIGTERM");
  f.String("log-level", &log_level, "debug, info, warning or error");
  bool help = false;
  if (absl::Status s = f.Parse(args, 2, &help); !s.ok()) {
    err << "prehoc serve: " << s.message() << "\n\n" << f.Usage();
    return 2;
  }
  if (help) {
    out << f.Usage();
    return 0;
  }
  if (!SetLogLevel(log_level, err)) return 2;
  if (kv_cache_mb <= 0) {
    err << "prehoc serve: --kv-cache-mb must be > 0\n";
    return 2;
  }
  o.cluster.engine.kv_cache_bytes = kv_cache_mb << 20;
  if (!policies.empty()) {
    o.cluster.scheduler.sparsity_policies = absl::StrSplit(policies, ',', absl::SkipWhitespace());
  }
  auto server = EmbeddedServer::Create(o);
  if (!server.ok()) {
    err << "prehoc serve: " << server.status() << "\n";
    return 1;
  }
  out << "prehoc serve ready grpc_port=" << (*server)->port()
      << " metrics_port=" << (*server)->metrics_port() << std::endl;
  const int sig = WaitForTerminationSignal();
  LOG(INFO) << "signal " << sig << ": draining for up to " << drain_timeout_s << " s";
  (*server)->Shutdown(absl::Now() + absl::Seconds(drain_timeout_s));
  return 0;
}

int RunLoadgen(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  std::string target;
  EmbeddedOptions eo;
  eo.device = "auto";
  int64_t kv_cache_mb = 1024;
  int streams = 4, requests = 0, warmup = -1, prompt_len = 128, max_tokens = 64;
  std::string policy;
  double budget = 0;
  std::string label;
  std::string log_level = "warning";
  FlagSet f(kLoadgenHeader);
  f.String("target", &target, "server address host:port (cache manager, worker or serve)");
  f.String("model", &eo.engine.model_dir, "model directory for the in-process backend");
  f.String("device", &eo.device, "in-process backend: auto, cpu or cuda");
  f.Int("threads", &eo.engine.num_threads, "CPU threads of the in-process backend (0 = all)");
  f.Int64("kv-cache-mb", &kv_cache_mb, "KV cache of the in-process backend in MiB");
  f.Int("max-running", &eo.scheduler.max_running, "running batch of the in-process backend");
  f.Int("streams", &streams, "concurrent client streams");
  f.Int("requests", &requests, "requests to measure (default: 4 x streams)");
  f.Int("warmup", &warmup, "requests before measuring (default: streams)");
  f.Int("prompt-len", &prompt_len, "prompt tokens (BOS + bytes)");
  f.Int("max-tokens", &max_tokens, "tokens per request");
  f.String("policy", &policy, "sparsity policy (default: the server's)");
  f.Double("budget", &budget, "sparsity budget (tokens, or a fraction in (0, 1])");
  f.String("label", &label, "label printed with the result line");
  f.String("log-level", &log_level, "debug, info, warning or error");
  bool help = false;
  if (absl::Status s = f.Parse(args, 2, &help); !s.ok()) {
    err << "prehoc loadgen: " << s.message() << "\n\n" << f.Usage();
    return 2;
  }
  if (help) {
    out << f.Usage();
    return 0;
  }
  if (!SetLogLevel(log_level, err)) return 2;
  if (target.empty() == eo.engine.model_dir.empty()) {
    err << "prehoc loadgen: give exactly one of --target and --model\n";
    return 2;
  }
  if (streams < 1 || prompt_len < 1 || max_tokens < 1) {
    err << "prehoc loadgen: --streams, --prompt-len and --max-tokens must be >= 1\n";
    return 2;
  }
  if (requests <= 0) requests = 4 * streams;
  if (warmup < 0) warmup = streams;
  eo.engine.kv_cache_bytes = kv_cache_mb << 20;

  std::unique_ptr<EmbeddedCluster> cluster;
  std::unique_ptr<v1::Inference::Stub> stub;
  Runner run;
  if (!target.empty()) {
    grpc::ChannelArguments cargs;
    cargs.SetMaxReceiveMessageSize(64 << 20);
    stub = v1::Inference::NewStub(
        grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), cargs));
    run = [&](const InferenceRequest& r, const std::function<void(int)>& on_message) {
      v1::GenerateRequest p;
      p.mutable_token_ids()->mutable_ids()->Add(r.token_ids.begin(), r.token_ids.end());
      p.set_max_tokens(r.max_tokens);
      if (!r.sparsity.policy.empty()) {
        const auto& names = KnownSparsityPolicies();
        for (size_t i = 0; i < names.size(); ++i) {
          if (names[i] == r.sparsity.policy) {
            p.mutable_sparsity()->set_policy(static_cast<v1::SparsityParams::Policy>(i + 1));
          }
        }
        if (r.sparsity.budget > 0 && r.sparsity.budget <= 1) {
          p.mutable_sparsity()->set_budget_fraction(static_cast<float>(r.sparsity.budget));
        } else {
          p.mutable_sparsity()->set_budget(static_cast<int32_t>(r.sparsity.budget));
        }
      }
      grpc::ClientContext ctx;
      auto reader = stub->Generate(&ctx, p);
      v1::GenerateResponse m;
      while (reader->Read(&m)) on_message(m.token_ids_size());
      grpc::Status s = reader->Finish();
      return s.ok() ? absl::OkStatus()
                    : absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
    };
  } else {
    auto c = EmbeddedCluster::Create(eo);
    if (!c.ok()) {
      err << "prehoc loadgen: " << c.status() << "\n";
      return 1;
    }
    cluster = std::move(*c);
    run = [&](const InferenceRequest& r, const std::function<void(int)>& on_message) {
      absl::Mutex mu;
      absl::Status final_status;
      absl::Notification done;
      auto id = cluster->backend().Generate(r, [&](InferenceEvent ev) {
        on_message(static_cast<int>(ev.tokens.size()));  // events arrive in order, one thread
        if (ev.terminal()) {
          absl::MutexLock l(&mu);
          final_status = ev.status;
          done.Notify();
        }
      });
      if (!id.ok()) return id.status();
      done.WaitForNotification();
      absl::MutexLock l(&mu);
      return final_status;
    };
  }

  auto make_request = [&](int i) {
    InferenceRequest r;
    r.token_ids.push_back(256);
    for (int j = 1; j < prompt_len; ++j) r.token_ids.push_back(32 + (i * 131 + j * 7) % 95);
    r.max_tokens = max_tokens;
    r.sparsity.policy = policy;
    r.sparsity.budget = budget;
    return r;
  };
  std::atomic<int> next{0};
  absl::Mutex mu;
  std::vector<RequestStats> measured;
  absl::Time t0 = absl::InfinitePast(), t1 = absl::InfinitePast();
  std::vector<std::thread> clients;
  const int total = warmup + requests;
  for (int c = 0; c < streams; ++c) {
    clients.emplace_back([&] {
      while (true) {
        const int i = next.fetch_add(1);
        if (i >= total) break;
        if (i == warmup) {
          absl::MutexLock l(&mu);
          t0 = absl::Now();
        }
        RequestStats s = Measure(run, make_request(i));
        if (i >= warmup) {
          absl::MutexLock l(&mu);
          measured.push_back(std::move(s));
          t1 = absl::Now();
        }
      }
    });
  }
  for (auto& t : clients) t.join();
  int ok = 0;
  int64_t tokens = 0;
  std::vector<double> ttft, itl;
  std::string first_error;
  for (const RequestStats& s : measured) {
    if (!s.ok) {
      if (first_error.empty()) first_error = s.error;
      continue;
    }
    ++ok;
    tokens += s.tokens;
    ttft.push_back(s.ttft_s);
    itl.insert(itl.end(), s.itl_s.begin(), s.itl_s.end());
  }
  const double wall = std::max(1e-9, absl::ToDoubleSeconds(t1 - t0));
  out << absl::StrFormat(
      "loadgen %s mode=%s streams=%d requests=%d ok=%d tokens=%d wall_s=%.3f tokens_per_s=%.1f "
      "ttft_p50_ms=%.2f ttft_p99_ms=%.2f itl_p50_ms=%.3f itl_p99_ms=%.3f\n",
      label, target.empty() ? "in-process" : "grpc", streams, requests, ok, tokens, wall,
      tokens / wall, Percentile(ttft, 0.5) * 1e3, Percentile(ttft, 0.99) * 1e3,
      Percentile(itl, 0.5) * 1e3, Percentile(itl, 0.99) * 1e3);
  if (ok < static_cast<int>(measured.size())) {
    err << "prehoc loadgen: " << measured.size() - ok << " requests failed, first: " << first_error
        << "\n";
    return 1;
  }
  return 0;
}

}  // namespace prehoc
