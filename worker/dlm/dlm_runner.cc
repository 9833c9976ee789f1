#include "worker/dlm/dlm_runner.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/model_config.h"
#include "common/status.h"
#include "worker/dlm/calibration.h"
#include "worker/dlm/cuda_forward.h"
#include "worker/scheduler.h"  // TakeCompleteUtf8

namespace prehoc {

struct DlmRunner::Job {
  std::string id;
  dlm::DiffuseRequest request;
  DlmSchedule schedule;
  int64_t plan_version = 0;  // the cache manager's plan; 0 = made here
  DiffusionCallback callback;
  absl::Time arrival;
  absl::Time deadline;
  absl::Mutex mu;
  absl::Status cancel ABSL_GUARDED_BY(mu);  // non-OK once cancelled
};

namespace {

constexpr int kDefaultGenLength = 64;

absl::Status Bad(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

// The decoder names DiffuseOptions fields; the API names the proto fields.
absl::Status ApiFieldNames(const absl::Status& s) {
  if (s.ok()) return s;
  std::string m(s.message());
  if (m.rfind("temperature:", 0) == 0) m = "sampling." + m;
  return absl::Status(s.code(), m);
}

}  // namespace

absl::StatusOr<std::unique_ptr<DlmRunner>> DlmRunner::Create(
    std::shared_ptr<const dlm::DlmBackend> model, std::unique_ptr<Tokenizer> tokenizer,
    DlmRunnerOptions options) {
  if (model == nullptr) return absl::InvalidArgumentError("model: is null");
  if (options.max_running < 1) {
    return Bad("max_running", absl::StrCat("must be >= 1, got ", options.max_running));
  }
  if (options.max_queue < 0) {
    return Bad("max_queue", absl::StrCat("must be >= 0, got ", options.max_queue));
  }
  if (options.max_gen_length < 1) {
    return Bad("max_gen_length", absl::StrCat("must be >= 1, got ", options.max_gen_length));
  }
  const int layers = model->config().num_hidden_layers;
  if (!options.drift.empty() && static_cast<int>(options.drift.size()) != layers) {
    return Bad("drift", absl::StrCat("has ", options.drift.size(), " values, the model has ",
                                     layers, " layers"));
  }
  auto r = std::unique_ptr<DlmRunner>(new DlmRunner(std::move(options)));
  r->model_ = std::move(model);
  if (r->options_.metrics == nullptr && r->options_.registry != nullptr) {
    r->own_metrics_ =
        std::make_unique<dlm::DlmMetrics>(*r->options_.registry, r->options_.model_name, layers);
    r->options_.metrics = r->own_metrics_.get();
  }
  r->own_tokenizer_ = std::move(tokenizer);
  r->tokenizer_ = r->own_tokenizer_.get();
  if (r->tokenizer_ == nullptr) {
    if (const auto* cpu = dynamic_cast<const dlm::DlmModel*>(r->model_.get())) {
      r->tokenizer_ = cpu->tokenizer();
    }
  }
  {
    absl::MutexLock l(&r->mu_);
    r->worker_id_ = r->options_.worker_id;
  }
  r->executor_ = std::thread([p = r.get()] { p->ExecutorLoop(); });
  return r;
}

DlmRunner::~DlmRunner() {
  CancelAll(absl::UnavailableError("worker shutting down"));
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
  }
  executor_.join();
}

int DlmRunner::num_layers() const { return model_->config().num_hidden_layers; }

void DlmRunner::SetWorkerId(const std::string& id) {
  absl::MutexLock l(&mu_);
  worker_id_ = id;
}

int DlmRunner::Active() const {
  absl::MutexLock l(&mu_);
  return running_ + static_cast<int>(queue_.size());
}

absl::Status DlmRunner::backend_status() const {
  absl::MutexLock l(&mu_);
  return backend_failure_;
}

absl::StatusOr<std::string> DlmRunner::Diffuse(DiffusionRequest request,
                                               DiffusionCallback callback) {
  const ModelConfig& c = model_->config();
  if (!request.model.empty() && request.model != options_.model_name) {
    return absl::NotFoundError(absl::StrCat("model: unknown model '", request.model,
                                            "' (this worker serves '", options_.model_name, "')"));
  }
  dlm::DiffuseOptions& o = request.options;
  if (o.gen_length == 0) o.gen_length = kDefaultGenLength;
  if (o.remasking.empty()) o.remasking = "low_confidence";
  if (o.cache.empty()) o.cache = "none";
  if (o.gen_length > options_.max_gen_length) {
    return Bad("gen_length", absl::StrCat(o.gen_length, " exceeds the limit of ",
                                          options_.max_gen_length, " (max_gen_length)"));
  }
  RETURN_IF_ERROR(ApiFieldNames(o.Validate()));

  auto job = std::make_shared<Job>();
  std::vector<int32_t>& prompt = job->request.prompt;
  if (request.text.has_value()) {
    if (tokenizer_ == nullptr) {
      return Bad("text", "the model has no tokenizer (prehoc_tokenizer.json); pass token_ids");
    }
    if (request.text->empty()) return Bad("text", "is empty");
    prompt = tokenizer_->Encode(*request.text, /*add_bos=*/true);
  } else {
    if (request.token_ids.empty()) return Bad("token_ids", "is empty");
    prompt = request.token_ids;
    for (size_t i = 0; i < prompt.size(); ++i) {
      const int32_t t = prompt[i];
      if (t < 0 || t >= c.vocab_size) {
        return Bad("token_ids", absl::StrCat("token ", t, " at position ", i,
                                             " is outside [0, ", c.vocab_size, ")"));
      }
      if (t == model_->mask_id()) {
        return Bad("token_ids", absl::StrCat("token at position ", i, " is the mask id ", t));
      }
    }
  }
  const int64_t canvas = static_cast<int64_t>(prompt.size()) + o.gen_length;
  if (canvas > c.max_position_embeddings) {
    return Bad("gen_length", absl::StrCat("prompt ", prompt.size(), " + gen_length ", o.gen_length,
                                          " = ", canvas, " tokens exceeds the model's context of ",
                                          c.max_position_embeddings));
  }
  if (o.stop_at_eos && model_->eos_ids().empty()) {
    return Bad("stop_at_eos", "the model declares no end-of-text id");
  }
  ASSIGN_OR_RETURN(job->schedule, ResolveDlmSchedule(request, c.num_hidden_layers, options_.drift));
  const bool spa = job->schedule.policy == DlmCachePolicy::kSpa ||
                   job->schedule.policy == DlmCachePolicy::kSpaAuto;
  if (spa && model_->proxy_rank() <= 0) {
    return absl::FailedPreconditionError(
        "cache: spa needs the model's singular proxies, which this worker did not build");
  }
  job->request.options = o;
  job->plan_version = request.plan.has_value() ? request.plan->version : 0;
  job->callback = std::move(callback);
  job->arrival = Now();
  job->deadline = request.deadline;

  absl::MutexLock l(&mu_);
  if (!backend_failure_.ok()) {
    return absl::UnavailableError(absl::StrCat("backend failed: ", backend_failure_.ToString(),
                                               "; this worker serves no more requests"));
  }
  if (draining_ || stop_) return absl::UnavailableError("worker is draining");
  if (request.request_id.empty()) {
    do {
      job->id = absl::StrCat("dlm-", next_id_++);
    } while (jobs_.contains(job->id));
  } else {
    if (jobs_.contains(request.request_id)) {
      return absl::AlreadyExistsError(
          absl::StrCat("request_id: '", request.request_id, "' is already running"));
    }
    job->id = request.request_id;
  }
  const int waiting = static_cast<int>(queue_.size());
  if (running_ >= options_.max_running && waiting >= options_.max_queue) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "Diffuse queue is full: ", running_, " requests decoding (max_running ",
        options_.max_running, ") and ", waiting, " waiting (max_queue ", options_.max_queue,
        ")"));
  }
  jobs_[job->id] = job;
  queue_.push_back(job);
  return job->id;
}

absl::Status DlmRunner::CancelDiffusion(std::string_view request_id, absl::Status status) {
  if (status.ok()) status = absl::CancelledError("cancelled");
  std::shared_ptr<Job> queued;
  {
    absl::MutexLock l(&mu_);
    auto it = jobs_.find(std::string(request_id));
    if (it == jobs_.end()) {
      return absl::NotFoundError(
          absl::StrCat("request_id: no running Diffuse has id '", std::string(request_id), "'"));
    }
    std::shared_ptr<Job> job = it->second;
    auto q = std::find(queue_.begin(), queue_.end(), job);
    if (q != queue_.end()) {
      queue_.erase(q);
      queued = job;
    } else {
      absl::MutexLock jl(&job->mu);
      if (job->cancel.ok()) job->cancel = status;
      return absl::OkStatus();  // the executor ends it before its next step
    }
  }
  DiffusionEvent ev;
  ev.status = status;
  Finish(queued, std::move(ev), /*was_running=*/false);
  return absl::OkStatus();
}

void DlmRunner::StartDrain() {
  absl::MutexLock l(&mu_);
  draining_ = true;
}

bool DlmRunner::WaitIdle(absl::Time deadline) {
  absl::MutexLock l(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return jobs_.empty() && running_ == 0; };
  return mu_.AwaitWithDeadline(absl::Condition(&idle), deadline);
}

void DlmRunner::CancelAll(const absl::Status& status) {
  std::vector<std::string> ids;
  {
    absl::MutexLock l(&mu_);
    for (const auto& [id, job] : jobs_) ids.push_back(id);
  }
  for (const std::string& id : ids) CancelDiffusion(id, status).IgnoreError();
}

// A running request's decoding and streaming state (executor thread only).
struct DlmRunner::Running {
  std::shared_ptr<Job> job;
  std::unique_ptr<dlm::DlmRequestRun> run;
  std::string served_by;
  std::chrono::steady_clock::time_point start;  // decoding began (after Init)
  dlm::ForwardStats times;                      // phase times of the forwards it took part in
  int bl = 0, nb = 0;
  std::vector<int> eos_ids;  // the model's end-of-text ids
  std::vector<int32_t> response;
  std::vector<int> remaining;  // masks left per block
  int next_block = 0;          // first block not streamed yet
  bool first_sent = false, eos_seen = false;
  int streamed = 0;            // tokens streamed (a prefix of the output)
  std::string pending_text;
  double first_block_s = 0;

  void Emit(DiffusionEvent ev) {
    ev.request_id = job->id;
    if (!first_sent) {
      ev.first = true;
      ev.served_by = served_by;
      first_sent = true;
    }
    job->callback(std::move(ev));
  }
};

void DlmRunner::ExecutorLoop() {
  std::vector<std::unique_ptr<Running>> running;
  while (true) {
    std::vector<std::shared_ptr<Job>> admitted;
    {
      absl::MutexLock l(&mu_);
      if (running.empty()) {
        auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !queue_.empty(); };
        mu_.Await(absl::Condition(&ready));
        if (queue_.empty()) return;  // stop_
      }
      while (!queue_.empty() && running_ < options_.max_running) {
        admitted.push_back(queue_.front());
        queue_.pop_front();
        running_++;
      }
    }
    for (const std::shared_ptr<Job>& job : admitted) {
      std::unique_ptr<Running> r = Start(job);
      if (r != nullptr) running.push_back(std::move(r));
    }
    Step(&running);
  }
}

void DlmRunner::Finish(const std::shared_ptr<Job>& job, DiffusionEvent ev, bool was_running) {
  ev.request_id = job->id;
  {
    absl::MutexLock l(&mu_);
    jobs_.erase(job->id);  // before the terminal callback: the id may be reused at once
    if (was_running) running_--;
  }
  if (options_.metrics != nullptr && !ev.status.ok()) {
    options_.metrics->RecordOutcome(job->schedule.policy, ev.status);
  }
  job->callback(std::move(ev));
}

std::unique_ptr<DlmRunner::Running> DlmRunner::Start(const std::shared_ptr<Job>& job) {
  auto r = std::make_unique<Running>();
  r->job = job;
  {
    absl::MutexLock l(&mu_);
    r->served_by = worker_id_;
  }
  const dlm::DiffuseOptions& o = job->request.options;
  r->bl = o.effective_block_length();
  r->nb = o.gen_length / r->bl;
  r->eos_ids.assign(model_->eos_ids().begin(), model_->eos_ids().end());
  r->response.assign(o.gen_length, -1);
  r->remaining.assign(r->nb, r->bl);
  Running* raw = r.get();
  r->run = std::make_unique<dlm::DlmRequestRun>(
      *model_, job->request, job->schedule,
      [this, raw](const dlm::DlmStepInfo& info) { OnStep(raw, info); });
  if (absl::Status s = r->run->Init(); !s.ok()) {
    DiffusionEvent ev;
    ev.status = ApiFieldNames(s);
    Finish(job, std::move(ev), /*was_running=*/true);
    return nullptr;
  }
  r->start = std::chrono::steady_clock::now();
  return r;
}

absl::Status DlmRunner::Interrupt(const Running& r) const {
  const int steps_run = r.run->steps_done();
  if (options_.before_step) options_.before_step(r.job->id, steps_run);
  {
    absl::MutexLock l(&r.job->mu);
    if (!r.job->cancel.ok()) return r.job->cancel;
  }
  if (Now() >= r.job->deadline) {
    return absl::DeadlineExceededError(
        absl::StrCat("deadline exceeded after ", steps_run, " denoising steps"));
  }
  return absl::OkStatus();
}

void DlmRunner::Step(std::vector<std::unique_ptr<Running>>* running) {
  std::vector<std::unique_ptr<Running>> stepping;
  std::vector<dlm::DlmBatchItem> items;
  for (std::unique_ptr<Running>& r : *running) {
    if (!r->run->Prepare()) {
      Complete(r.get());
      continue;
    }
    if (absl::Status s = Interrupt(*r); !s.ok()) {
      DiffusionEvent ev;
      ev.status = std::move(s);
      Finish(r->job, std::move(ev), /*was_running=*/true);
      continue;
    }
    items.push_back(r->run->item());
    stepping.push_back(std::move(r));
  }
  running->clear();
  if (items.empty()) return;
  dlm::ForwardStats times;
  const absl::Status s = model_->ForwardBatch(items, &times);
  if (options_.metrics != nullptr) options_.metrics->RecordBatch(static_cast<int>(items.size()));
  if (!s.ok()) {
    // Every request of the batch fails. A device fault (anything but ForwardBatch's own
    // validation errors, which each request's Init already ruled out) leaves the backend's
    // state untrusted: it is marked failed for good — the queued requests end UNAVAILABLE,
    // Diffuse refuses new ones.
    LOG(ERROR) << "diffusion forward failed: " << s;
    const bool device_fault = s.code() != absl::StatusCode::kInvalidArgument &&
                              s.code() != absl::StatusCode::kFailedPrecondition;
    std::vector<std::shared_ptr<Job>> queued;
    bool newly_failed = false;
    if (device_fault) {
      absl::MutexLock l(&mu_);
      if (backend_failure_.ok()) {
        backend_failure_ = s;
        newly_failed = true;
      }
      queued.assign(queue_.begin(), queue_.end());
      queue_.clear();
    }
    for (std::unique_ptr<Running>& r : stepping) {
      DiffusionEvent ev;
      ev.status = device_fault ? absl::InternalError(absl::StrCat("diffusion forward failed: ",
                                                                  s.message()))
                               : ApiFieldNames(s);
      Finish(r->job, std::move(ev), /*was_running=*/true);
    }
    for (const std::shared_ptr<Job>& job : queued) {
      DiffusionEvent ev;
      ev.status = absl::UnavailableError(absl::StrCat("backend failed: ", s.ToString()));
      Finish(job, std::move(ev), /*was_running=*/false);
    }
    if (newly_failed && options_.on_backend_failure) options_.on_backend_failure(s);
    return;
  }
  for (std::unique_ptr<Running>& r : stepping) {
    r->times.AddTimes(times);
    r->run->Commit();
  }
  *running = std::move(stepping);
}

void DlmRunner::OnStep(Running* r, const dlm::DlmStepInfo& info) {
  const int bl = r->bl;
  for (size_t i = 0; i < info.committed_rows.size(); ++i) {
    const int row = info.committed_rows[i];
    r->response[row] = info.committed_tokens[i];
    r->remaining[row / bl]--;
  }
  while (r->next_block < r->nb && r->remaining[r->next_block] == 0) {
    const int b = r->next_block++;
    if (r->first_block_s == 0) {
      r->first_block_s = absl::ToDoubleSeconds(Now() - r->job->arrival);
    }
    DiffusionEvent ev;
    ev.block = b;
    ev.block_start = b * bl;
    ev.step = info.step + 1;
    for (int row = b * bl; row < (b + 1) * bl && !r->eos_seen; ++row) {
      if (dlm::IsEos(r->eos_ids, r->response[row])) {
        r->eos_seen = true;
      } else {
        ev.tokens.push_back(r->response[row]);
      }
    }
    if (ev.tokens.empty() && r->first_sent) continue;  // nothing after the end of text
    r->streamed += static_cast<int>(ev.tokens.size());
    if (tokenizer_ != nullptr) {
      r->pending_text += tokenizer_->Decode(ev.tokens);
      ev.text = TakeCompleteUtf8(&r->pending_text);
    }
    r->Emit(std::move(ev));
  }
}

void DlmRunner::Complete(Running* run) {
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - run->start).count();
  const std::shared_ptr<Job> job = run->job;
  const dlm::DiffuseResult r = run->run->Finish(seconds, run->times);
  DiffusionEvent ev;
  // The streamed blocks are the output up to the first end-of-text; anything the decoder
  // reports beyond them (cannot happen with whole blocks) goes out with the final message.
  ev.tokens.assign(r.output.begin() + std::min<size_t>(run->streamed, r.output.size()),
                   r.output.end());
  ev.block = run->next_block;
  ev.block_start = run->streamed;
  if (tokenizer_ != nullptr) {
    run->pending_text += tokenizer_->Decode(ev.tokens);
    ev.text = TakeCompleteUtf8(&run->pending_text, /*flush=*/true);
  }
  ev.step = r.stats.steps;
  ev.finished = true;
  ev.finish_reason = r.finish_reason;
  ev.prompt_tokens = static_cast<int>(job->request.prompt.size());
  ev.completion_tokens = static_cast<int>(r.output.size());
  DiffusionStats& s = ev.stats;
  s.cache = r.schedule.policy_name;
  s.steps = r.stats.steps;
  s.full_steps = r.stats.full_steps;
  s.gen_refresh_steps = r.stats.gen_refresh_steps;
  s.partial_steps = r.stats.partial_steps;
  s.blocks = r.stats.blocks;
  s.canvas_rows = r.stats.canvas_rows;
  s.rows_recomputed = r.stats.forward.q_rows;
  s.kv_rows_recomputed = r.stats.forward.kv_rows;
  s.decode_seconds = r.stats.seconds;
  s.tokens_per_second = r.stats.tokens_per_second();
  s.time_to_first_block_s = run->first_block_s;
  s.plan_version = job->plan_version;
  if (r.schedule.policy == DlmCachePolicy::kSpa || r.schedule.policy == DlmCachePolicy::kSpaAuto) {
    s.rho = r.schedule.rho;
  }
  if (options_.metrics != nullptr) {
    options_.metrics->Record(r);
    options_.metrics->RecordOutcome(r.schedule.policy, absl::OkStatus());
  }
  if (!run->first_sent) {
    ev.first = true;
    ev.served_by = run->served_by;
  }
  Finish(job, std::move(ev), /*was_running=*/true);
}

void DescribeDiffusion(const DlmRunner* runner, std::vector<ModelDescription>* models) {
  if (runner == nullptr) return;
  for (ModelDescription& m : *models) {
    m.bidirectional = true;
    m.dlm_cache_policies = {"none", "prefix", "dual", "dllm", "spa"};
    if (!runner->drift().empty()) m.dlm_cache_policies.push_back("spa-auto");
    m.dlm_drift = runner->drift();
    if (m.num_layers == 0) m.num_layers = runner->num_layers();
  }
}

absl::StatusOr<std::unique_ptr<DlmRunner>> MaybeCreateDlmRunner(
    const std::string& model_dir, int num_threads, bool calibrate, DlmRunnerOptions options,
    std::shared_ptr<const ModelWeights>* shared_weights) {
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  if (config.is_causal) return std::unique_ptr<DlmRunner>();
  ASSIGN_OR_RETURN(std::unique_ptr<ModelWeights> loaded, ModelWeights::Load(model_dir));
  std::shared_ptr<const ModelWeights> weights = std::move(loaded);
  dlm::DlmModelOptions mo;
  mo.weights = weights;
  mo.num_threads = num_threads;
  ASSIGN_OR_RETURN(std::unique_ptr<dlm::DlmModel> model, dlm::DlmModel::Create(mo));
  ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer,
                   Tokenizer::LoadFromModelDir(model_dir, config.vocab_size));
  if (calibrate) {
    const absl::Time t0 = absl::Now();
    ASSIGN_OR_RETURN(options.drift, dlm::MeasureDriftProfile(*model, {}));
    LOG(INFO) << "dlm calibration (spa-auto drift profile) took "
              << absl::FormatDuration(absl::Now() - t0);
  }
  ASSIGN_OR_RETURN(std::shared_ptr<const dlm::DlmBackend> backend,
                   CreateDlmBackend(options.device, std::move(model), options.cuda_device));
  if (options.wrap_backend) backend = options.wrap_backend(std::move(backend));
  ASSIGN_OR_RETURN(std::unique_ptr<DlmRunner> runner,
                   DlmRunner::Create(std::move(backend), std::move(tokenizer), std::move(options)));
  *shared_weights = std::move(weights);
  return runner;
}

absl::StatusOr<std::shared_ptr<const dlm::DlmBackend>> CreateDlmBackend(
    const std::string& device, std::shared_ptr<const dlm::DlmModel> cpu, int cuda_device,
    std::string* why) {
  if (device != "auto" && device != "cpu" && device != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("device: '", device, "' is not one of auto, cpu, cuda"));
  }
  if (cpu == nullptr) return absl::InvalidArgumentError("model: is null");
  std::string reason;
  if (device != "cpu") {
    dlm::CudaDlmOptions co;
    co.model = cpu.get();
    co.device = cuda_device;
    absl::StatusOr<std::unique_ptr<dlm::CudaDlmModel>> cuda = dlm::CudaDlmModel::Create(co);
    if (cuda.ok()) {
      reason = absl::StrCat("dlm device=", device, ": using ", (*cuda)->backend_name());
      LOG(INFO) << reason;
      if (why != nullptr) *why = reason;
      return std::shared_ptr<const dlm::DlmBackend>(std::move(*cuda));
    }
    if (device == "cuda") {
      return absl::Status(cuda.status().code(),
                          absl::StrCat("device=cuda: ", cuda.status().message()));
    }
    reason = absl::StrCat("dlm device=auto: using the CPU model (", cpu->num_threads(),
                          " threads) because: ", cuda.status().message());
  } else {
    reason = absl::StrCat("dlm device=cpu: using the CPU model (", cpu->num_threads(), " threads)");
  }
  LOG(INFO) << reason;
  if (why != nullptr) *why = reason;
  return std::shared_ptr<const dlm::DlmBackend>(std::move(cpu));
}

}  // namespace prehoc
