#include "services/cli/serve.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/logging.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "prehoc/v1/inference.grpc.pb.h"
#include "services/common/diffuse_convert.h"
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
    "in-process embedded backend (--model DIR, no gRPC). Drives Generate (autoregressive\n"
    "models) or Diffuse (--rpc diffuse, diffusion LMs). Prints tokens/s and TTFT / inter-token\n"
    "latency percentiles (ITL: gap between messages spread over their tokens; for Diffuse, TTFT\n"
    "is the time to the first committed block). --wait-ready waits for the server first.";

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

// Times one request: `run(on_message)` calls on_message(tokens_in_message) per message and
// returns the final status.
RequestStats Measure(
    const std::function<absl::Status(const std::function<void(int)>&)>& run) {
  RequestStats s;
  const absl::Time start = absl::Now();
  absl::Time last = start;
  absl::Status st = run([&](int n) {
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

// Polls `channel` until grpc.health.v1 "readiness" is SERVING and ListModels lists `model` (any
// model when empty): the cache manager lists only the models of ready, registered workers, so
// this also waits for worker registration. DEADLINE_EXCEEDED with the last observation.
absl::Status WaitReady(const std::shared_ptr<grpc::Channel>& channel, const std::string& model,
                       absl::Duration timeout) {
  auto health = grpc::health::v1::Health::NewStub(channel);
  auto inference = v1::Inference::NewStub(channel);
  const absl::Time deadline = absl::Now() + timeout;
  std::string last = "no answer yet";
  while (true) {
    const absl::Time rpc_deadline = std::min(deadline, absl::Now() + absl::Seconds(1));
    grpc::ClientContext hctx;
    hctx.set_deadline(absl::ToChronoTime(rpc_deadline));
    grpc::health::v1::HealthCheckRequest hreq;
    hreq.set_service("readiness");
    grpc::health::v1::HealthCheckResponse hres;
    grpc::Status hs = health->Check(&hctx, hreq, &hres);
    if (!hs.ok()) {
      last = absl::StrCat("health check: ", hs.error_message());
    } else if (hres.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
      last = "readiness is not SERVING";
    } else {
      grpc::ClientContext lctx;
      lctx.set_deadline(absl::ToChronoTime(rpc_deadline));
      v1::ListModelsResponse lres;
      grpc::Status ls = inference->ListModels(&lctx, v1::ListModelsRequest(), &lres);
      if (!ls.ok()) {
        last = absl::StrCat("ListModels: ", ls.error_message());
      } else {
        std::vector<std::string> names;
        for (const v1::ModelInfo& m : lres.models()) names.push_back(m.name());
        if (model.empty() ? !names.empty()
                          : std::find(names.begin(), names.end(), model) != names.end()) {
          return absl::OkStatus();
        }
        last = absl::StrCat("readiness SERVING, ListModels lists [", absl::StrJoin(names, ", "),
                            "]", model.empty() ? "" : absl::StrCat(", waiting for '", model, "'"));
      }
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("not ready after ", absl::FormatDuration(timeout), " (", last, ")"));
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
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
  f.Bool("liveness-follows-backend", &o.liveness_follows_backend,
         "after a backend (device) failure also turn health 'liveness' NOT_SERVING, so a "
         "liveness probe restarts the process (default: only readiness goes NOT_SERVING)");
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
  int block_length = 0, steps = 0;
  std::string rpc = "generate", model_name, policy, cache;
  double budget = 0, wait_ready_s = 0;
  std::string label;
  std::string log_level = "warning";
  FlagSet f(kLoadgenHeader);
  f.String("target", &target, "server address host:port (cache manager, worker or serve)");
  f.String("model", &eo.engine.model_dir, "model directory for the in-process backend");
  f.String("device", &eo.device, "in-process backend: auto, cpu or cuda");
  f.Int("threads", &eo.engine.num_threads, "CPU threads of the in-process backend (0 = all)");
  f.Int64("kv-cache-mb", &kv_cache_mb, "KV cache of the in-process backend in MiB");
  f.Int("max-running", &eo.scheduler.max_running, "running batch of the in-process backend");
  f.Int("dlm-max-running", &eo.dlm.max_running,
        "in-process backend, diffusion models: Diffuse requests decoding at once");
  f.String("rpc", &rpc, "generate (autoregressive) or diffuse (diffusion LM)");
  f.String("model-name", &model_name,
           "model named in the requests, as ListModels lists it (default: the server's default)");
  f.Int("streams", &streams, "concurrent client streams");
  f.Int("requests", &requests, "requests to measure (default: 4 x streams)");
  f.Int("warmup", &warmup, "requests before measuring (default: streams)");
  f.Int("prompt-len", &prompt_len, "prompt tokens (BOS + bytes)");
  f.Int("max-tokens", &max_tokens, "tokens per request (diffuse: gen_length)");
  f.String("policy", &policy, "generate: sparsity policy (default: the server's)");
  f.Double("budget", &budget, "generate: sparsity budget (tokens, or a fraction in (0, 1])");
  f.String("cache", &cache, "diffuse: cache policy none|prefix|dual|dllm|spa|spa-auto");
  f.Int("block-length", &block_length, "diffuse: block length (0 = max-tokens, one block)");
  f.Int("steps", &steps, "diffuse: denoising steps (0 = max-tokens)");
  f.Double("wait-ready", &wait_ready_s,
           "--target: wait up to this many seconds until the server's readiness health is "
           "SERVING and ListModels lists the model (--model-name, else any) before the load");
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
  if (rpc != "generate" && rpc != "diffuse") {
    err << "prehoc loadgen: --rpc must be generate or diffuse, got '" << rpc << "'\n";
    return 2;
  }
  const bool diffuse = rpc == "diffuse";
  if (diffuse && (!policy.empty() || budget != 0)) {
    err << "prehoc loadgen: --policy and --budget are for --rpc generate (diffuse: --cache)\n";
    return 2;
  }
  if (!diffuse && (!cache.empty() || block_length != 0 || steps != 0)) {
    err << "prehoc loadgen: --cache, --block-length and --steps are for --rpc diffuse\n";
    return 2;
  }
  if (wait_ready_s < 0 || (wait_ready_s > 0 && target.empty())) {
    err << "prehoc loadgen: --wait-ready needs --target and a value >= 0\n";
    return 2;
  }
  if (requests <= 0) requests = 4 * streams;
  if (warmup < 0) warmup = streams;
  eo.engine.kv_cache_bytes = kv_cache_mb << 20;
  if (!eo.engine.model_dir.empty()) eo.model_name = model_name;

  auto prompt = [&](int i) {
    std::vector<int32_t> ids{256};
    for (int j = 1; j < prompt_len; ++j) ids.push_back(32 + (i * 131 + j * 7) % 95);
    return ids;
  };
  auto make_request = [&](int i) {
    InferenceRequest r;
    r.model = model_name;
    r.token_ids = prompt(i);
    r.max_tokens = max_tokens;
    r.sparsity.policy = policy;
    r.sparsity.budget = budget;
    return r;
  };
  auto make_diffuse = [&](int i) {
    v1::DiffuseRequest r;
    r.set_model(model_name);
    const std::vector<int32_t> ids = prompt(i);
    r.mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
    r.set_gen_length(max_tokens);
    r.set_block_length(block_length);
    r.set_steps(steps);
    r.set_cache(cache);
    return r;
  };

  // One request `i` through the backend: on_message(tokens_in_message) per message; returns
  // the final status.
  using Runner = std::function<absl::Status(int, const std::function<void(int)>&)>;
  std::unique_ptr<EmbeddedCluster> cluster;
  std::unique_ptr<v1::Inference::Stub> stub;
  Runner run;
  if (!target.empty()) {
    grpc::ChannelArguments cargs;
    cargs.SetMaxReceiveMessageSize(64 << 20);
    std::shared_ptr<grpc::Channel> channel =
        grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), cargs);
    stub = v1::Inference::NewStub(channel);
    if (wait_ready_s > 0) {
      if (absl::Status s = WaitReady(channel, model_name, absl::Seconds(wait_ready_s)); !s.ok()) {
        err << "prehoc loadgen: " << target << " not ready: " << s.message() << "\n";
        return 1;
      }
    }
    auto finish = [](grpc::Status s) {
      return s.ok() ? absl::OkStatus()
                    : absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
    };
    if (diffuse) {
      run = [&, finish](int i, const std::function<void(int)>& on_message) {
        grpc::ClientContext ctx;
        auto reader = stub->Diffuse(&ctx, make_diffuse(i));
        v1::DiffuseResponse m;
        while (reader->Read(&m)) on_message(m.token_ids_size());
        return finish(reader->Finish());
      };
    } else {
      run = [&, finish](int i, const std::function<void(int)>& on_message) {
        const InferenceRequest r = make_request(i);
        v1::GenerateRequest p;
        p.set_model(r.model);
        p.mutable_token_ids()->mutable_ids()->Add(r.token_ids.begin(), r.token_ids.end());
        p.set_max_tokens(r.max_tokens);
        if (!r.sparsity.policy.empty()) {
          const auto& names = KnownSparsityPolicies();
          for (size_t k = 0; k < names.size(); ++k) {
            if (names[k] == r.sparsity.policy) {
              p.mutable_sparsity()->set_policy(static_cast<v1::SparsityParams::Policy>(k + 1));
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
        return finish(reader->Finish());
      };
    }
  } else {
    auto c = EmbeddedCluster::Create(eo);
    if (!c.ok()) {
      err << "prehoc loadgen: " << c.status() << "\n";
      return 1;
    }
    cluster = std::move(*c);
    // Events arrive in order on one thread; the terminal one is last.
    auto await = [](auto start, const std::function<void(int)>& on_message) {
      absl::Mutex mu;
      absl::Status final_status;
      absl::Notification done;
      auto id = start([&](auto ev) {
        on_message(static_cast<int>(ev.tokens.size()));
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
    if (diffuse) {
      run = [&, await](int i, const std::function<void(int)>& on_message) {
        absl::StatusOr<DiffusionRequest> r = DiffusionFromProto(make_diffuse(i));
        if (!r.ok()) return r.status();
        return await(
            [&](auto cb) { return cluster->diffusion().Diffuse(*std::move(r), std::move(cb)); },
            on_message);
      };
    } else {
      run = [&, await](int i, const std::function<void(int)>& on_message) {
        return await(
            [&](auto cb) { return cluster->backend().Generate(make_request(i), std::move(cb)); },
            on_message);
      };
    }
  }

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
        RequestStats s = Measure(
            [&](const std::function<void(int)>& on_message) { return run(i, on_message); });
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
  const std::string what = diffuse ? absl::StrCat(" rpc=diffuse cache=", cache.empty() ? "default" : cache)
                                   : absl::StrCat(" rpc=generate policy=",
                                                  policy.empty() ? "default" : policy);
  out << absl::StrFormat(
      "loadgen %s mode=%s streams=%d requests=%d ok=%d tokens=%d wall_s=%.3f tokens_per_s=%.1f "
      "ttft_p50_ms=%.2f ttft_p99_ms=%.2f itl_p50_ms=%.3f itl_p99_ms=%.3f%s\n",
      label, target.empty() ? "in-process" : "grpc", streams, requests, ok, tokens, wall,
      tokens / wall, Percentile(ttft, 0.5) * 1e3, Percentile(ttft, 0.99) * 1e3,
      Percentile(itl, 0.5) * 1e3, Percentile(itl, 0.99) * 1e3, what);
  if (ok < static_cast<int>(measured.size())) {
    err << "prehoc loadgen: " << measured.size() - ok << " requests failed, first: " << first_error
        << "\n";
    return 1;
  }
  return 0;
}

}  // namespace prehoc
