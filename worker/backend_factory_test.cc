// Backend choice (--device), the CUDA backend's plan checks (no device needed), and the
// Scheduler refusing a plan its backend cannot run.
#include "worker/backend_factory.h"

#include <filesystem>
#include <memory>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/backends/cuda/cuda_model.h"
#include "worker/scheduler.h"

namespace prehoc {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string Fixture() {
  return (fs::path(PREHOC_SOURCE_DIR) / "tests/fixtures/hf/llama_gqa_f32").string();
}

BackendOptions Options(const std::string& device) {
  BackendOptions o;
  o.device = device;
  o.engine.model_dir = Fixture();
  o.engine.num_threads = 1;
  o.engine.kv_cache_bytes = 4 << 20;
  return o;
}

TEST(BackendFactory, RejectsUnknownDevice) {
  auto b = CreateBackend(Options("gpu"));
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(b.status().message()), HasSubstr("device: 'gpu'"));
}

TEST(BackendFactory, CpuAndAutoAndCuda) {
  std::string why;
  auto cpu = CreateBackend(Options("cpu"), &why);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_STREQ((*cpu)->kind(), "cpu");
  EXPECT_THAT(why, HasSubstr("device=cpu"));

  auto aut = CreateBackend(Options("auto"), &why);
  ASSERT_TRUE(aut.ok()) << aut.status();
  auto cuda = CreateBackend(Options("cuda"));
  if (std::string((*aut)->kind()) == "cpu") {
    // No usable device here: auto says why it fell back, cuda is a precise error.
    EXPECT_THAT(why, HasSubstr("device=auto: using the CPU engine"));
    ASSERT_FALSE(cuda.ok());
    EXPECT_EQ(cuda.status().code(), absl::StatusCode::kUnavailable) << cuda.status();
    EXPECT_THAT(std::string(cuda.status().message()), HasSubstr("device=cuda: CUDA backend unavailable"));
  } else {
    EXPECT_STREQ((*aut)->kind(), "cuda");
    EXPECT_THAT(why, HasSubstr("using CUDA on"));
    ASSERT_TRUE(cuda.ok()) << cuda.status();
    EXPECT_STREQ((*cuda)->kind(), "cuda");
  }
  // Same metadata from either backend.
  EXPECT_EQ((*aut)->config().num_hidden_layers, (*cpu)->config().num_hidden_layers);
  EXPECT_EQ((*aut)->max_context(), (*cpu)->max_context());
  EXPECT_EQ((*aut)->used_pages(), 0);
}

ModelConfig ArConfig() {
  ModelConfig c;
  c.hidden_size = 384;
  c.intermediate_size = 1024;
  c.vocab_size = 260;
  c.num_hidden_layers = 6;
  c.num_attention_heads = 6;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.max_position_embeddings = 8192;
  return c;
}

SelectionPlan Plan(const ModelConfig& c, const std::string& policy, const std::string& overrides = "",
                   double target_delta = 0) {
  SparsityOptions o;
  o.policy = policy;
  o.target_delta = target_delta;
  auto ov = ParseOverrides(overrides);
  EXPECT_TRUE(ov.ok()) << ov.status();
  auto p = MakeSelectionPlan(c, o, *ov);
  EXPECT_TRUE(p.ok()) << p.status();
  return *p;
}

TEST(CudaSupportsPlan, PoliciesAndFields) {
  const ModelConfig c = ArConfig();
  EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, Plan(c, "dense")).ok());
  EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, Plan(c, "prhs")).ok());
  EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, Plan(c, "prhs-budget-matched")).ok());
  EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, Plan(c, "prhs", "tau=0.9,sink=4")).ok());
  // Oracle top-k (kExact rows), StreamingLLM (kWindow rows), Quest (kPages rows), H2O (kHeavy
  // rows) and HShare (kApprox rows) run in the selection kernels.
  EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, Plan(c, "oracle")).ok());
  EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, Plan(c, "streaming")).ok());
  EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, Plan(c, "quest")).ok());
  EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, Plan(c, "h2o")).ok());
  EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, Plan(c, "h2o", "local=64")).ok());
  EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, Plan(c, "hshare")).ok());
  EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, Plan(c, "hshare", "refresh_interval=3")).ok());
  for (const char* p : {"quest", "h2o", "hshare"}) {
    absl::Status s = CudaModel::SupportsPlan(c, 8, Plan(c, p));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << p;
    EXPECT_THAT(std::string(s.message()), HasSubstr("page_size 16")) << p;
  }
  // Every policy runs; CPU-only plan fields are refused whatever the policy.
  EXPECT_EQ(CudaModel::SupportsPlan(c, 16, Plan(c, "hshare", "gqa_max=1")).code(),
            absl::StatusCode::kInvalidArgument);
  // δ targets: the controller's per-kv-head k scales run as per-row k.
  SelectionPlan controlled = Plan(c, "prhs", "", 0.05);
  EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, controlled).ok());
  controlled.layers[1].head_k_scale = {0.5, 4.0};
  controlled.layers[2].k_scale = 2.0;
  EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, controlled).ok());
  controlled.layers[3].head_k_scale = {1.0, -1.0};
  absl::Status s = CudaModel::SupportsPlan(c, 16, controlled);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("layer 3"));
  s = CudaModel::SupportsPlan(c, 16, Plan(c, "prhs", "dilate_r=65"));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("dilate_r"));
  // PSAW runs on the device (prefill band, decode candidates' bound).
  EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, Plan(c, "prhs", "psaw_phi=0.9")).ok());
  EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, Plan(c, "prhs", "psaw_phi=0.1,psaw_start=0")).ok());
  // ETF runs on the device too (the frozen prefix's K/V copied layer to layer in prefill), with
  // PSAW, from any start layer MakeSelectionPlan takes (its layer etf_start freezes nothing);
  // what is refused is a fraction outside [0, 1] or one at layer 0 (no earlier K/V to share).
  for (const char* o : {"etf_start=2", "etf_start=0,etf_psi=0.2", "etf_start=0,psaw_start=0"}) {
    const SelectionPlan etf = Plan(c, "prhs", o);
    EXPECT_EQ(etf.layers[0].etf_freeze_fraction, 0.0) << o;
    EXPECT_GT(etf.layers.back().etf_freeze_fraction, 0.0) << o;
    EXPECT_TRUE(CudaModel::SupportsPlan(c, 16, etf).ok()) << o << ": "
                                                          << CudaModel::SupportsPlan(c, 16, etf);
  }
  SelectionPlan etf = Plan(c, "prhs", "etf_start=0");
  etf.layers[0].etf_freeze_fraction = 0.25;
  s = CudaModel::SupportsPlan(c, 16, etf);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("ETF freezing at layer 0"));
  etf.layers[0].etf_freeze_fraction = 0;
  etf.layers[3].etf_freeze_fraction = 1.5;
  s = CudaModel::SupportsPlan(c, 16, etf);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("ETF freeze fraction outside [0, 1] (layer 3)"));
  s = CudaModel::SupportsPlan(c, 16, Plan(c, "prhs", "gqa_max=1"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("gqa_max"));
  for (const char* o : {"gate_unrotated=1", "follow=1"}) {
    s = CudaModel::SupportsPlan(c, 16, Plan(c, "prhs", o));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << o;
    EXPECT_THAT(std::string(s.message()), HasSubstr(o));
  }
  // The CPU-only share-step options (incremental scan, δ gates) are refused by name.
  for (const auto& [o, name] : std::vector<std::pair<const char*, const char*>>{
           {"scan_slices=4", "scan_slices"},
           {"scan_slices=4,gate_delta=0.05", "gate_delta"},
           {"gate_exact_delta=0.05", "gate_exact_delta"},
           {"gate_lse=0.5", "gate_lse"},
           {"keep_trail=1", "keep_trail=1"},
           {"scan_slices=4,gate_error=0.05", "gate_error"},
           {"gate_exact_error=0.05", "gate_exact_error"}}) {
    s = CudaModel::SupportsPlan(c, 16, Plan(c, "prhs", o));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << o;
    EXPECT_THAT(std::string(s.message()), HasSubstr(name)) << o;
  }
  s = CudaModel::SupportsPlan(c, 8, Plan(c, "prhs"));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("page_size 16"));
  ModelConfig odd = c;
  odd.head_dim = 32;
  EXPECT_TRUE(CudaModel::SupportsPlan(odd, 16, Plan(odd, "dense")).ok());
  EXPECT_THAT(std::string(CudaModel::SupportsPlan(odd, 16, Plan(odd, "prhs")).message()),
              HasSubstr("head_dim 64 or 128"));
  EXPECT_THAT(std::string(CudaModel::SupportsPlan(odd, 16, Plan(odd, "oracle")).message()),
              HasSubstr("head_dim 64 or 128"));
}

// A CPU engine that reports the CUDA backend's plan support: the Scheduler must refuse what the
// backend cannot run at Generate, with the backend's code and message.
class CudaPlanRulesBackend : public ModelBackend {
 public:
  explicit CudaPlanRulesBackend(std::unique_ptr<Engine> e) : e_(std::move(e)) {}
  const char* kind() const override { return "test"; }
  std::string description() const override { return "test"; }
  const ModelConfig& config() const override { return e_->config(); }
  const Tokenizer* tokenizer() const override { return e_->tokenizer(); }
  int max_context() const override { return e_->max_context(); }
  int page_size() const override { return e_->page_size(); }
  int32_t num_pages() const override { return e_->num_pages(); }
  int32_t used_pages() const override { return e_->used_pages(); }
  absl::Status SupportsPlan(const SelectionPlan& plan) const override {
    return CudaModel::SupportsPlan(e_->config(), e_->page_size(), plan);
  }
  SeqId CreateSequence() override { return e_->CreateSequence(); }
  absl::Status FreeSequence(SeqId s) override { return e_->FreeSequence(s); }
  absl::StatusOr<int> SequenceLength(SeqId s) const override { return e_->SequenceLength(s); }
  int num_sequences() const override { return e_->num_sequences(); }
  absl::StatusOr<std::vector<std::vector<float>>> Step(std::span<const StepItem> items,
                                                       bool causal) override {
    return e_->Step(items, causal);
  }

 private:
  std::unique_ptr<Engine> e_;
};

TEST(SchedulerBackend, RefusesPlansTheBackendCannotRun) {
  auto e = Engine::Create(Options("cpu").engine);
  ASSERT_TRUE(e.ok()) << e.status();
  auto sched = Scheduler::Create(std::make_unique<CudaPlanRulesBackend>(std::move(*e)), {});
  ASSERT_TRUE(sched.ok()) << sched.status();
  InferenceRequest r;
  r.token_ids = {1, 2, 3};
  r.max_tokens = 2;
  r.sparsity.policy = "hshare";
  r.sparsity.overrides = "gqa_max=1";
  auto got = (*sched)->Generate(r, [](InferenceEvent) { ADD_FAILURE() << "callback called"; });
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("gqa_max=1"));
  r.sparsity.policy = "prhs";
  r.sparsity.overrides = "scan_slices=4";
  got = (*sched)->Generate(r, [](InferenceEvent) { ADD_FAILURE() << "callback called"; });
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(got.status().message()), HasSubstr("sparsity.overrides: scan_slices"));
}

}  // namespace
}  // namespace prehoc
