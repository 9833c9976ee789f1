#include "cachemgr/dlm_router.h"

#include "cachemgr/relay.h"

#include "common/metrics_test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace prehoc {
namespace {

using ::prehoc::testing::MetricValue;
using ::testing::HasSubstr;
using ::testing::StartsWith;

// A link that records what it was asked and lets the test emit events by hand.
class FakeLink : public DiffusionLink {
 public:
  absl::Status Start(const DiffusionRequest& request, DiffusionCallback callback) override {
    absl::MutexLock l(&mu);
    started.push_back(request);
    callbacks[request.request_id] = std::move(callback);
    return absl::OkStatus();
  }
  void Cancel(const std::string& id) override {
    absl::MutexLock l(&mu);
    cancelled.push_back(id);
  }
  void Emit(const std::string& id, DiffusionEvent ev) {
    DiffusionCallback cb;
    {
      absl::MutexLock l(&mu);
      cb = callbacks[id];
      // The callback holds the router's stream, which holds this link: drop it at the end.
      if (ev.terminal()) callbacks.erase(id);
    }
    ev.request_id = id;
    cb(std::move(ev));
  }
  absl::Mutex mu;
  std::vector<DiffusionRequest> started ABSL_GUARDED_BY(mu);
  std::vector<std::string> cancelled ABSL_GUARDED_BY(mu);
  std::map<std::string, DiffusionCallback> callbacks ABSL_GUARDED_BY(mu);
};

ModelDescription Model(const std::string& name, bool diffusion) {
  ModelDescription m;
  m.name = name;
  m.bidirectional = diffusion;
  m.num_layers = 6;
  if (diffusion) m.dlm_cache_policies = {"none", "prefix", "dual", "dllm", "spa", "spa-auto"};
  return m;
}

struct Fixture {
  Fixture() : workers(WorkerRegistryOptions{}) {
    metrics = std::make_unique<DlmRouterMetrics>(registry);
    DlmRouterOptions o;
    o.id_prefix = "t";
    o.metrics = metrics.get();
    o.link_factory = [this](const WorkerSnapshot& w) -> std::shared_ptr<DiffusionLink> {
      return w.worker_id == "dlm" ? dlm_link : ar_link;
    };
    router = std::make_unique<DlmRouter>(&workers, o);
  }
  prometheus::Registry registry;
  WorkerRegistry workers;
  std::unique_ptr<DlmRouterMetrics> metrics;
  std::shared_ptr<FakeLink> dlm_link = std::make_shared<FakeLink>();
  std::shared_ptr<FakeLink> ar_link = std::make_shared<FakeLink>();
  std::unique_ptr<DlmRouter> router;
};

// WorkerRegistry needs a link (or a factory); registrations here carry a trivial one.
class NullWorkerLink : public WorkerLink {
 public:
  absl::Status Start(const std::string&, const InferenceRequest&, InferenceCallback) override {
    return absl::UnimplementedError("test");
  }
  void Free(const std::string&) override {}
};

void Register(WorkerRegistry* workers, const std::string& id, ModelDescription m) {
  WorkerRegistration r;
  r.worker_id = id;
  r.address = id + ":1";
  r.models = {std::move(m)};
  r.ready = true;
  r.link = std::make_shared<NullWorkerLink>();
  ASSERT_TRUE(workers->Register(r).ok());
}

TEST(DlmRouterTest, PlacesOnTheDiffusionWorkerWithThePlanAndRelaysTheStream) {
  Fixture f;
  Register(&f.workers, "ar", Model("code-ar", false));
  Register(&f.workers, "dlm", Model("code-dlm", true));
  DiffusionRequest req;
  req.model = "code-dlm";
  req.token_ids = {1, 2, 3};
  req.options.cache = "spa";
  req.options.cache_overrides = {{"r_full", 9}, {"r_gen", 3}};
  std::vector<DiffusionEvent> got;
  auto id = f.router->Diffuse(req, [&](DiffusionEvent ev) { got.push_back(std::move(ev)); });
  ASSERT_TRUE(id.ok()) << id.status();
  DiffusionRequest sent;
  {
    absl::MutexLock l(&f.dlm_link->mu);
    ASSERT_EQ(f.dlm_link->started.size(), 1u);
    sent = f.dlm_link->started[0];
  }
  ASSERT_TRUE(sent.plan.has_value());
  EXPECT_EQ(sent.plan->policy_name, "spa");
  EXPECT_EQ(sent.plan->r_full, 9);  // the request's override wins
  EXPECT_EQ(sent.plan->r_gen, 3);
  ASSERT_EQ(sent.plan->rho.size(), 6u);  // rho(l) per layer from the fixed curve
  EXPECT_EQ(sent.plan->rho[0], 1.0);
  EXPECT_GT(sent.plan->rho[4], sent.plan->rho[1]);
  EXPECT_GE(sent.plan->version, 1u);
  EXPECT_NE(sent.request_id, *id);

  DiffusionEvent block;
  block.first = true;
  block.tokens = {7, 8};
  f.dlm_link->Emit(sent.request_id, block);
  DiffusionEvent fin;
  fin.finished = true;
  fin.finish_reason = "length";
  fin.stats.steps = 4;
  fin.stats.full_steps = 1;
  fin.stats.gen_refresh_steps = 1;
  fin.stats.rows_recomputed = {10, 2, 2, 3, 3, 3};
  f.dlm_link->Emit(sent.request_id, fin);
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].request_id, *id);
  EXPECT_EQ(got[0].tokens, (std::vector<int32_t>{7, 8}));
  EXPECT_TRUE(got[1].finished);
  EXPECT_EQ(f.router->ActiveStreams(), 0);
  EXPECT_EQ(MetricValue(f.registry, "prehoc_cachemgr_dlm_requests_total",
                    {{"model", "code-dlm"}, {"policy", "spa"}, {"outcome", "ok"}}),
            1);
  EXPECT_EQ(MetricValue(f.registry, "prehoc_cachemgr_dlm_tokens_recomputed_total",
                    {{"policy", "spa"}, {"layer", "3"}}),
            3);
  EXPECT_EQ(MetricValue(f.registry, "prehoc_cachemgr_dlm_refreshes_total", {{"policy", "spa"}}), 2);
  EXPECT_EQ(MetricValue(f.registry, "prehoc_cachemgr_dlm_generated_tokens_total", {{"policy", "spa"}}),
            2);
}

TEST(DlmRouterTest, PrepareModelCreatesEveryOutcomeAtZeroForDiffusionModelsOnly) {
  Fixture f;
  f.metrics->PrepareModel(Model("code-ar", false));
  f.metrics->PrepareModel(Model("code-dlm", true));
  int series = 0;
  for (const auto& fam : f.registry.Collect()) {
    if (fam.name != "prehoc_cachemgr_dlm_requests_total") continue;
    for (const auto& m : fam.metric) {
      ++series;
      EXPECT_EQ(m.counter.value, 0);
      for (const auto& lp : m.label) {
        if (lp.name == "model") {
          EXPECT_EQ(lp.value, "code-dlm");
        }
      }
    }
  }
  EXPECT_EQ(series, 6 * static_cast<int>(RelayOutcomes().size()));  // 6 cache policies
  EXPECT_EQ(MetricValue(f.registry, "prehoc_cachemgr_dlm_requests_total",
                        {{"model", "code-dlm"}, {"policy", "spa-auto"}, {"outcome", "error"}}),
            0);
}

TEST(DlmRouterTest, RefusesAutoregressiveModelsAndBadPlansSynchronously) {
  Fixture f;
  Register(&f.workers, "ar", Model("code-ar", false));
  Register(&f.workers, "dlm", Model("code-dlm", true));
  DiffusionRequest req;
  req.token_ids = {1};
  req.model = "code-ar";
  auto id = f.router->Diffuse(req, [](DiffusionEvent) { FAIL(); });
  EXPECT_EQ(id.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(id.status().message()), HasSubstr("autoregressive"));
  req.model = "nope";
  EXPECT_EQ(f.router->Diffuse(req, [](DiffusionEvent) { FAIL(); }).status().code(),
            absl::StatusCode::kUnavailable);
  req.model = "code-dlm";
  req.options.cache = "spa";
  req.rho = {0.5};
  id = f.router->Diffuse(req, [](DiffusionEvent) { FAIL(); });
  EXPECT_THAT(std::string(id.status().message()), StartsWith("rho: has 1 values"));
  req.rho.clear();
  req.options.cache = "spa-auto";  // the worker reported no drift profile
  EXPECT_EQ(f.router->Diffuse(req, [](DiffusionEvent) { FAIL(); }).status().code(),
            absl::StatusCode::kFailedPrecondition);
  req.options.cache = "dual";
  req.options.cache_overrides = {{"r_full", 3}};
  id = f.router->Diffuse(req, [](DiffusionEvent) { FAIL(); });
  EXPECT_THAT(std::string(id.status().message()), StartsWith("cache_params.r_full:"));
}

TEST(DlmRouterTest, CancelKeepsItsStatusAndDeadWorkersFailOnTick) {
  Fixture f;
  Register(&f.workers, "dlm", Model("code-dlm", true));
  DiffusionRequest req;
  req.token_ids = {1};
  absl::Status a_status, b_status;
  auto a = f.router->Diffuse(req, [&](DiffusionEvent ev) {
    if (ev.terminal()) a_status = ev.status;
  });
  auto b = f.router->Diffuse(req, [&](DiffusionEvent ev) {
    if (ev.terminal()) b_status = ev.status;
  });
  ASSERT_TRUE(a.ok() && b.ok());
  std::vector<DiffusionRequest> started;
  {
    absl::MutexLock l(&f.dlm_link->mu);
    started = f.dlm_link->started;
  }
  ASSERT_TRUE(f.router->CancelDiffusion(*a, absl::DeadlineExceededError("deadline")).ok());
  {
    absl::MutexLock l(&f.dlm_link->mu);
    EXPECT_EQ(f.dlm_link->cancelled, std::vector<std::string>{started[0].request_id});
  }
  DiffusionEvent cancelled;
  cancelled.status = absl::CancelledError("transport says cancelled");
  f.dlm_link->Emit(started[0].request_id, cancelled);
  EXPECT_EQ(a_status.code(), absl::StatusCode::kDeadlineExceeded);

  EXPECT_TRUE(f.router->Tick().empty());
  ASSERT_TRUE(f.workers.Remove("dlm").has_value());
  EXPECT_EQ(f.router->Tick(), std::vector<std::string>{*b});
  EXPECT_EQ(b_status.code(), absl::StatusCode::kUnavailable);
  // The worker's late terminal event is swallowed (exactly one terminal per stream).
  DiffusionEvent late;
  late.finished = true;
  f.dlm_link->Emit(started[1].request_id, late);
  EXPECT_EQ(b_status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(f.router->CancelDiffusion(*b, absl::CancelledError("x")).code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace prehoc
