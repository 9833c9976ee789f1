#include "worker/dlm/dlm_runner.h"

#include <algorithm>
#include <filesystem>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/dlm/dlm_test_util.h"
#include "worker/testing/eos_in_block_backend.h"
#include "worker/model_weights.h"
#include "worker/testing/faulty_dlm_backend.h"

namespace prehoc {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::StartsWith;
using dlm_test::Collector;

std::string ShippedDir() {
  return (fs::path(PREHOC_SOURCE_DIR) / "models" / "prehoc-code-dlm").string();
}

// The shipped model (with its singular proxies) is loaded once for every test: a runner per test.
std::shared_ptr<const dlm::DlmModel> SharedModel() {
  static const auto* const model = [] {
    dlm::DlmModelOptions o;
    o.model_dir = ShippedDir();
    o.num_threads = 2;
    auto m = dlm::DlmModel::Create(o);
    EXPECT_TRUE(m.ok()) << m.status();
    return new std::shared_ptr<const dlm::DlmModel>(std::move(*m));
  }();
  return *model;
}

struct Loaded {
  std::unique_ptr<DlmRunner> runner;
};

Loaded Load(DlmRunnerOptions options) {
  Loaded l;
  options.model_name = "dlm";
  auto r = DlmRunner::Create(SharedModel(), /*tokenizer=*/nullptr, std::move(options));
  EXPECT_TRUE(r.ok()) << r.status();
  l.runner = std::move(*r);
  return l;
}

DiffusionRequest ShortRequest() {
  DiffusionRequest r;
  r.text = "def add(a, b):\n";
  r.options.gen_length = 8;
  r.options.block_length = 4;
  r.options.steps = 8;
  return r;
}

TEST(DlmRunnerTest, StreamsBlocksThatConcatenateToTheDecoderOutput) {
  prometheus::Registry registry;
  dlm::DlmMetrics metrics(registry, "dlm", 6);
  DlmRunnerOptions o;
  o.metrics = &metrics;
  Loaded m = Load(o);
  auto tok = Tokenizer::LoadFromModelDir(ShippedDir(), 260);
  ASSERT_TRUE(tok.ok() && *tok != nullptr);
  for (const std::string cache : {"none", "spa"}) {
    DiffusionRequest req = ShortRequest();
    req.options.cache = cache;
    req.options.temperature = 0.7f;
    req.options.seed = 11;
    Collector c;
    ASSERT_TRUE(m.runner->Diffuse(req, c.Callback()).ok());
    std::vector<DiffusionEvent> ev = c.Wait();

    dlm::DiffuseRequest direct;
    direct.prompt = (*tok)->Encode(*req.text, true);
    direct.options = req.options;
    auto want = dlm::Diffuse(m.runner->model(), direct);
    ASSERT_TRUE(want.ok()) << want.status();

    ASSERT_GE(ev.size(), 2u);
    EXPECT_TRUE(ev.front().first);
    EXPECT_EQ(ev.front().served_by, "worker");
    std::vector<int32_t> got;
    int block_events = 0;
    for (const DiffusionEvent& e : ev) {
      if (!e.tokens.empty()) {
        EXPECT_EQ(e.block_start, static_cast<int>(got.size()));
        ++block_events;
      }
      got.insert(got.end(), e.tokens.begin(), e.tokens.end());
    }
    EXPECT_EQ(got, want->output) << cache;
    const DiffusionEvent& last = ev.back();
    ASSERT_TRUE(last.finished) << last.status;
    EXPECT_EQ(last.completion_tokens, static_cast<int>(want->output.size()));
    EXPECT_EQ(last.prompt_tokens, static_cast<int>(direct.prompt.size()));
    EXPECT_EQ(last.stats.cache, cache);
    EXPECT_EQ(last.stats.steps, 8);
    EXPECT_EQ(last.stats.rows_recomputed, want->stats.forward.q_rows);
    EXPECT_EQ(last.stats.plan_version, 0);
    if (want->output.size() == 8) EXPECT_EQ(block_events, 2) << cache;  // no end-of-text
  }
  double ok = -1;
  for (const auto& fam : registry.Collect()) {
    if (fam.name != "prehoc_dlm_requests_total") continue;
    for (const auto& metric : fam.metric) {
      bool spa = false, is_ok = false;
      for (const auto& lp : metric.label) {
        spa |= lp.name == "policy" && lp.value == "spa";
        is_ok |= lp.name == "outcome" && lp.value == "ok";
      }
      if (spa && is_ok) ok = metric.counter.value;
    }
  }
  EXPECT_EQ(ok, 1);
}

TEST(DlmRunnerTest, RefusesBadRequestsNamingTheField) {
  Loaded l = Load({});
  struct Case {
    std::function<void(DiffusionRequest*)> edit;
    absl::StatusCode code;
    std::string prefix;
  };
  const std::vector<Case> cases = {
      {[](DiffusionRequest* r) { r->options.gen_length = -1; }, absl::StatusCode::kInvalidArgument,
       "gen_length:"},
      {[](DiffusionRequest* r) { r->options.gen_length = 5000; },
       absl::StatusCode::kInvalidArgument, "gen_length: 5000 exceeds the limit"},
      {[](DiffusionRequest* r) { r->options.block_length = 3; },
       absl::StatusCode::kInvalidArgument, "block_length:"},
      {[](DiffusionRequest* r) { r->options.temperature = -1; },
       absl::StatusCode::kInvalidArgument, "sampling.temperature:"},
      {[](DiffusionRequest* r) { r->options.cache = "bogus"; }, absl::StatusCode::kInvalidArgument,
       "cache:"},
      {[](DiffusionRequest* r) {
         r->options.cache = "spa";
         r->options.cache_overrides["r_full"] = -1;
       },
       absl::StatusCode::kInvalidArgument, "cache_params.r_full:"},
      {[](DiffusionRequest* r) {
         r->options.cache = "spa";
         r->rho = {0.1, 0.2};
       },
       absl::StatusCode::kInvalidArgument, "rho: has 2 values, the model has 6 layers"},
      {[](DiffusionRequest* r) {
         r->options.cache = "dual";
         r->rho = {1, 1, 1, 1, 1, 1};
       },
       absl::StatusCode::kInvalidArgument, "rho: per-layer ratios apply to cache spa"},
      {[](DiffusionRequest* r) { r->options.cache = "spa-auto"; },
       absl::StatusCode::kFailedPrecondition, "cache: spa-auto needs"},
      {[](DiffusionRequest* r) {
         r->text.reset();
         r->token_ids = {1, 999};
       },
       absl::StatusCode::kInvalidArgument, "token_ids: token 999 at position 1"},
      {[](DiffusionRequest* r) {
         r->text.reset();
         r->token_ids.assign(2045, 65);
       },
       absl::StatusCode::kInvalidArgument, "gen_length: prompt 2045 + gen_length 8"},
      {[](DiffusionRequest* r) { r->text = ""; }, absl::StatusCode::kInvalidArgument, "text:"},
      {[](DiffusionRequest* r) { r->model = "other"; }, absl::StatusCode::kNotFound, "model:"},
  };
  for (const Case& c : cases) {
    DiffusionRequest r = ShortRequest();
    c.edit(&r);
    auto id = l.runner->Diffuse(r, [](DiffusionEvent) { FAIL() << "callback called"; });
    ASSERT_FALSE(id.ok()) << c.prefix;
    EXPECT_EQ(id.status().code(), c.code) << id.status();
    EXPECT_THAT(std::string(id.status().message()), StartsWith(c.prefix));
  }
  // Still serving.
  Collector c;
  ASSERT_TRUE(l.runner->Diffuse(ShortRequest(), c.Callback()).ok());
  EXPECT_TRUE(c.Wait().back().finished);
}

TEST(DlmRunnerTest, CancelBetweenStepsEndsTheStreamAfterTheFirstBlock) {
  DlmRunner* runner = nullptr;
  DlmRunnerOptions o;
  o.before_step = [&runner](const std::string& id, int step) {
    if (step == 6) ASSERT_TRUE(runner->CancelDiffusion(id, absl::CancelledError("stop")).ok());
  };
  Loaded l = Load(o);
  runner = l.runner.get();
  Collector c;
  auto id = runner->Diffuse(ShortRequest(), c.Callback());
  ASSERT_TRUE(id.ok());
  std::vector<DiffusionEvent> ev = c.Wait();
  ASSERT_GE(ev.size(), 1u);
  EXPECT_EQ(ev.back().status.code(), absl::StatusCode::kCancelled);
  EXPECT_FALSE(ev.back().finished);
  // Block 0 (steps 0-3) was streamed, block 1 never completed.
  int tokens = 0;
  for (const DiffusionEvent& e : ev) tokens += static_cast<int>(e.tokens.size());
  EXPECT_LE(tokens, 4);
  EXPECT_EQ(runner->CancelDiffusion(*id, absl::CancelledError("again")).code(),
            absl::StatusCode::kNotFound);
}

TEST(DlmRunnerTest, DeadlineIsCheckedBeforeEveryStep) {
  absl::Mutex mu;
  absl::Time now = absl::FromUnixSeconds(1000);
  DlmRunnerOptions o;
  o.clock = [&] {
    absl::MutexLock l(&mu);
    return now;
  };
  o.before_step = [&](const std::string&, int step) {
    if (step == 3) {
      absl::MutexLock l(&mu);
      now += absl::Seconds(10);
    }
  };
  Loaded l = Load(o);
  DiffusionRequest r = ShortRequest();
  r.deadline = absl::FromUnixSeconds(1005);
  Collector c;
  ASSERT_TRUE(l.runner->Diffuse(r, c.Callback()).ok());
  const DiffusionEvent last = c.Wait().back();
  EXPECT_EQ(last.status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(std::string(last.status.message()), HasSubstr("after 3 denoising steps"));
}

TEST(DlmRunnerTest, AdmissionLimitIsResourceExhaustedAndDrainRefuses) {
  absl::Notification entered, release;
  DlmRunnerOptions o;
  o.max_running = 1;
  o.max_queue = 0;
  o.before_step = [&](const std::string&, int step) {
    if (step == 0) {
      entered.Notify();
      release.WaitForNotification();
    }
  };
  Loaded l = Load(o);
  Collector first;
  ASSERT_TRUE(l.runner->Diffuse(ShortRequest(), first.Callback()).ok());
  entered.WaitForNotification();
  auto second = l.runner->Diffuse(ShortRequest(), [](DiffusionEvent) {});
  EXPECT_EQ(second.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(second.status().message()), HasSubstr("max_queue 0"));
  l.runner->StartDrain();
  auto third = l.runner->Diffuse(ShortRequest(), [](DiffusionEvent) {});
  EXPECT_EQ(third.status().code(), absl::StatusCode::kUnavailable);
  release.Notify();
  EXPECT_TRUE(first.Wait().back().finished);
  EXPECT_TRUE(l.runner->WaitIdle(absl::InfiniteFuture()));
}

// A failed forward is a device fault: the request of that step ends INTERNAL naming it, the
// queued one UNAVAILABLE, the backend is failed for good (new requests are refused UNAVAILABLE
// naming the cause) and on_backend_failure runs once. A request-level validation error of the
// backend does not fail it.
TEST(DlmRunnerTest, FailedForwardFailsTheBackendForGood) {
  auto faulty = std::make_shared<testing::FaultyDlmBackend>(SharedModel());
  absl::Notification entered, release, reported;
  absl::Mutex mu;
  std::vector<absl::Status> failures;
  DlmRunnerOptions o;
  o.model_name = "dlm";
  o.max_running = 1;
  o.max_queue = 1;
  o.before_step = [&](const std::string&, int step) {
    if (step == 1 && !entered.HasBeenNotified()) {
      entered.Notify();
      release.WaitForNotification();
    }
  };
  o.on_backend_failure = [&](const absl::Status& s) {
    {
      absl::MutexLock l(&mu);
      failures.push_back(s);
    }
    reported.Notify();
  };
  auto runner = DlmRunner::Create(faulty, /*tokenizer=*/nullptr, o);
  ASSERT_TRUE(runner.ok()) << runner.status();
  DiffusionRequest req = ShortRequest();
  req.text.reset();
  req.token_ids = dlm_test::PrintableTokens(12, 3);

  // A validation-class error (a runner bug, not the device) ends the step's request only.
  faulty->FailForwards(absl::InvalidArgumentError("spec: live rows out of range"));
  Collector bad;
  ASSERT_TRUE((*runner)->Diffuse(req, bad.Callback()).ok());
  EXPECT_EQ(bad.Wait().back().status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE((*runner)->backend_status().ok());
  faulty->FailForwards(absl::OkStatus());

  Collector first, queued;
  ASSERT_TRUE((*runner)->Diffuse(req, first.Callback()).ok());
  entered.WaitForNotification();  // step 0 ran; the executor waits before step 1
  ASSERT_TRUE((*runner)->Diffuse(req, queued.Callback()).ok());
  faulty->FailForwards(absl::InternalError("CUDA error: an illegal memory access"));
  release.Notify();

  const DiffusionEvent failed = first.Wait().back();
  EXPECT_EQ(failed.status.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(failed.status.message()), HasSubstr("illegal memory access"));
  const DiffusionEvent dropped = queued.Wait().back();
  EXPECT_EQ(dropped.status.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(dropped.status.message()), HasSubstr("backend failed"));
  reported.WaitForNotification();
  EXPECT_EQ((*runner)->backend_status().code(), absl::StatusCode::kInternal);

  faulty->FailForwards(absl::OkStatus());  // the runner does not trust the device again
  auto refused = (*runner)->Diffuse(req, [](DiffusionEvent) {});
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("illegal memory access"));
  EXPECT_TRUE((*runner)->WaitIdle(absl::InfiniteFuture()));
  absl::MutexLock l(&mu);
  EXPECT_EQ(failures.size(), 1u);
  EXPECT_EQ(faulty->failed_forwards(), 2);
}

// Concurrent requests of different policies, options and canvas lengths share one forward per
// step (continuous batching) and each gets exactly the tokens it gets decoded alone.
TEST(DlmRunnerTest, BatchedRequestsEqualUnbatchedOnes) {
  prometheus::Registry registry;
  dlm::DlmMetrics metrics(registry, "dlm", 6);
  absl::Notification entered, all_submitted;
  DlmRunnerOptions o;
  o.max_running = 4;
  o.metrics = &metrics;
  // The first request's first step waits until the others are queued, so they join at the next
  // step boundary: from then on the 4 requests step together.
  o.before_step = [&](const std::string&, int) {
    if (!entered.HasBeenNotified()) entered.Notify();  // executor thread only
    all_submitted.WaitForNotification();
  };
  Loaded l = Load(o);
  auto tok = Tokenizer::LoadFromModelDir(ShippedDir(), 260);
  ASSERT_TRUE(tok.ok() && *tok != nullptr);

  std::vector<DiffusionRequest> reqs(4, ShortRequest());
  reqs[0].options.cache = "none";
  reqs[1].options.cache = "spa";
  reqs[1].text = "import os\nimport sys\n\ndef main(argv):\n";  // a longer canvas
  reqs[2].options.cache = "dual";
  reqs[2].options.gen_length = 16;
  reqs[2].options.block_length = 8;
  reqs[2].options.steps = 16;
  reqs[3].options.cache = "dllm";
  reqs[3].options.temperature = 0.8f;  // the full-logits path
  reqs[3].options.seed = 5;
  reqs[3].text = "x = [";
  std::vector<std::unique_ptr<Collector>> got;
  for (const DiffusionRequest& r : reqs) {
    got.push_back(std::make_unique<Collector>());
    ASSERT_TRUE(l.runner->Diffuse(r, got.back()->Callback()).ok());
    if (got.size() == 1) entered.WaitForNotification();
  }
  all_submitted.Notify();
  for (size_t i = 0; i < reqs.size(); ++i) {
    std::vector<DiffusionEvent> ev = got[i]->Wait();
    ASSERT_TRUE(ev.back().finished) << i << ": " << ev.back().status;
    std::vector<int32_t> tokens;
    for (const DiffusionEvent& e : ev) tokens.insert(tokens.end(), e.tokens.begin(), e.tokens.end());

    dlm::DiffuseRequest alone;
    alone.prompt = (*tok)->Encode(*reqs[i].text, true);
    alone.options = reqs[i].options;
    auto want = dlm::Diffuse(l.runner->model(), alone);
    ASSERT_TRUE(want.ok()) << want.status();
    EXPECT_EQ(tokens, want->output) << "request " << i << " cache " << reqs[i].options.cache;
    EXPECT_EQ(ev.back().stats.steps, want->stats.steps) << i;
    EXPECT_EQ(ev.back().stats.rows_recomputed, want->stats.forward.q_rows) << i;
  }
  // Batch sizes per batched step: request 0's first step alone; then 7 steps of all 4 (until
  // request 0's 8 steps are done), 1 of 3, and request 2's last 8 (of 16) alone.
  const prometheus::ClientMetric* h = nullptr;
  std::vector<prometheus::MetricFamily> families = registry.Collect();
  for (const auto& fam : families) {
    if (fam.name == "prehoc_dlm_batch_size") h = &fam.metric.at(0);
  }
  ASSERT_NE(h, nullptr);
  EXPECT_EQ(h->histogram.sample_sum, 8 + 8 + 16 + 8);  // every request step once
  EXPECT_EQ(h->histogram.sample_count, 17u);
  const auto& buckets = h->histogram.bucket;
  ASSERT_GE(buckets.size(), 4u);
  ASSERT_EQ(buckets[0].upper_bound, 1);
  ASSERT_EQ(buckets[2].upper_bound, 3);
  ASSERT_EQ(buckets[3].upper_bound, 4);
  EXPECT_EQ(buckets[0].cumulative_count, 9u);
  EXPECT_EQ(buckets[2].cumulative_count - buckets[1].cumulative_count, 1u);
  EXPECT_EQ(buckets[3].cumulative_count - buckets[2].cumulative_count, 7u);
}

TEST(DlmRunnerTest, DeviceChoiceFallsBackOrFailsNamingTheReason) {
  std::shared_ptr<const dlm::DlmModel> cpu = SharedModel();
  auto bad = CreateDlmBackend("gpu", cpu);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), StartsWith("device: 'gpu' is not one of"));
  std::string why;
  auto c = CreateDlmBackend("cpu", cpu, 0, &why);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->get(), cpu.get());
  EXPECT_THAT(why, HasSubstr("device=cpu"));
  auto cuda = CreateDlmBackend("cuda", cpu, 0, &why);
  auto automatic = CreateDlmBackend("auto", cpu, 0, &why);
  ASSERT_TRUE(automatic.ok()) << automatic.status();
  if (cuda.ok()) {
    EXPECT_THAT((*cuda)->backend_name(), StartsWith("cuda ("));
    EXPECT_THAT((*automatic)->backend_name(), StartsWith("cuda ("));
  } else {
    // No usable device (or a build without CUDA): cuda is UNAVAILABLE with the reason, auto
    // falls back to the CPU model and says why.
    EXPECT_EQ(cuda.status().code(), absl::StatusCode::kUnavailable) << cuda.status();
    EXPECT_THAT(std::string(cuda.status().message()), StartsWith("device=cuda: "));
    EXPECT_EQ(automatic->get(), cpu.get());
    EXPECT_THAT(why, HasSubstr("device=auto: using the CPU model"));
    EXPECT_THAT(why, HasSubstr("because: "));
  }
}

TEST(DlmRunnerTest, AutoregressiveModelHasNoRunner) {
  std::shared_ptr<const ModelWeights> w;
  auto r = MaybeCreateDlmRunner((fs::path(PREHOC_SOURCE_DIR) / "models" / "prehoc-code-ar").string(),
                                1, false, {}, &w);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, nullptr);
  EXPECT_EQ(w, nullptr);
}

// A second declared end-of-text id (e.g. <|eot_id|> after <|endoftext|>) ends the stream like the
// first: the request finishes "eos" after the block holding it, that block streams nothing, and
// the streamed tokens are the decoder's output.
TEST(DlmRunnerTest, SecondEndOfTextIdEndsTheStream) {
  auto w = ModelWeights::Load(ShippedDir());
  ASSERT_TRUE(w.ok()) << w.status();
  (*w)->config.eos_token_ids = {257, 258};
  dlm::DlmModelOptions mo;
  mo.weights = std::shared_ptr<const ModelWeights>(std::move(*w));
  mo.num_threads = 2;
  auto m = dlm::DlmModel::Create(mo);
  ASSERT_TRUE(m.ok()) << m.status();
  std::shared_ptr<const dlm::DlmModel> model = std::move(*m);
  const std::vector<int32_t> prompt = dlm_test::PrintableTokens(9, 3);
  const int P = static_cast<int>(prompt.size());
  // 258 (the second id) answers every row of block 1 of 3.
  std::shared_ptr<const dlm::DlmBackend> backend(
      new dlm::EosInBlockBackend(*model, P + 4, P + 8, /*eos_index=*/1),
      [model](const dlm::DlmBackend* b) { delete b; });
  DlmRunnerOptions o;
  o.model_name = "dlm";
  auto runner = DlmRunner::Create(backend, /*tokenizer=*/nullptr, o);
  ASSERT_TRUE(runner.ok()) << runner.status();

  DiffusionRequest req;
  req.token_ids = prompt;
  req.options.gen_length = 12;
  req.options.block_length = 4;
  req.options.steps = 12;
  req.options.stop_at_eos = true;
  dlm::DiffuseRequest direct;
  direct.prompt = prompt;
  direct.options = req.options;
  auto want = dlm::Diffuse(*backend, direct);
  ASSERT_TRUE(want.ok()) << want.status();
  EXPECT_EQ(want->finish_reason, "eos");
  EXPECT_EQ(want->stats.blocks, 2);
  for (int i = 4; i < 8; ++i) EXPECT_EQ(want->response[i], 258);
  ASSERT_EQ(std::count(want->response.begin(), want->response.begin() + 4, 257), 0);
  ASSERT_EQ(std::count(want->response.begin(), want->response.begin() + 4, 258), 0);
  EXPECT_EQ(want->output, std::vector<int32_t>(want->response.begin(), want->response.begin() + 4));

  Collector c;
  ASSERT_TRUE((*runner)->Diffuse(req, c.Callback()).ok());
  std::vector<DiffusionEvent> ev = c.Wait();
  std::vector<int32_t> got;
  for (const DiffusionEvent& e : ev) got.insert(got.end(), e.tokens.begin(), e.tokens.end());
  EXPECT_EQ(got, want->output);
  const DiffusionEvent& last = ev.back();
  ASSERT_TRUE(last.finished) << last.status;
  EXPECT_EQ(last.finish_reason, "eos");
  EXPECT_EQ(last.completion_tokens, 4);
  EXPECT_EQ(last.stats.steps, 8);
}

}  // namespace
}  // namespace prehoc
