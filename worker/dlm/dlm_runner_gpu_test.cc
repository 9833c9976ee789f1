// Inference.Diffuse's executor (DlmRunner) on the CUDA DLM backend vs the CPU model, on the shipped
// diffusion model. Label gpu: skips when no CUDA device is usable (CreateDlmBackend("cuda")
// returns UNAVAILABLE).
//
// Tolerance (docs/dlm.md): the CUDA forward runs bf16 weights/GEMM inputs/K,V/P, the CPU f32, so
// a bf16 near-tie can flip one greedy choice, and semi-autoregressive decoding cascades from it.
// Asserted: the first block streamed by the CUDA runner equals the CPU decoder's first block for
// vanilla and spa on this prompt (measured 32/32 over the whole response by
// cuda_forward_test.cc's DecoderMatchesCpu), and every request's step counts and rows
// recomputed per layer equal the CPU's; the token agreement of every response is reported.
#include <cstdio>
#include <filesystem>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/dlm/cuda_forward.h"
#include "worker/dlm/decoder.h"
#include "worker/dlm/dlm_runner.h"
#include "worker/dlm/dlm_test_util.h"

namespace prehoc {
namespace {

namespace fs = std::filesystem;
using dlm_test::Collector;
using dlm_test::PrintableTokens;

std::shared_ptr<const dlm::DlmModel> Cpu() {
  static const auto* const model = [] {
    dlm::DlmModelOptions o;
    o.model_dir = (fs::path(PREHOC_SOURCE_DIR) / "models" / "prehoc-code-dlm").string();
    o.num_threads = 2;
    auto m = dlm::DlmModel::Create(o);
    EXPECT_TRUE(m.ok()) << m.status();
    return new std::shared_ptr<const dlm::DlmModel>(m.ok() ? std::move(*m) : nullptr);
  }();
  return *model;
}

TEST(DlmRunnerGpuTest, DiffuseOnCudaCommitsTheCpuTokens) {
  ASSERT_NE(Cpu(), nullptr);
  std::string why;
  auto gpu = CreateDlmBackend("cuda", Cpu(), 0, &why);
  if (!gpu.ok()) {
    EXPECT_EQ(gpu.status().code(), absl::StatusCode::kUnavailable) << gpu.status();
    GTEST_SKIP() << "no CUDA device: " << gpu.status().message();
  }
  std::printf("[dlm runner gpu] %s\n", why.c_str());
  absl::Notification entered, all_submitted;
  DlmRunnerOptions o;
  o.model_name = "dlm";
  o.max_running = 8;
  o.before_step = [&](const std::string&, int) {
    if (!entered.HasBeenNotified()) entered.Notify();  // executor thread only
    all_submitted.WaitForNotification();
  };
  auto runner = DlmRunner::Create(*gpu, nullptr, o);
  ASSERT_TRUE(runner.ok()) << runner.status();
  ASSERT_THAT((*runner)->model().backend_name(), testing::StartsWith("cuda ("));

  // Every policy at once (so the CUDA runner batches them: one forward per step kind), plus a
  // vanilla request with a shorter prompt (canvases of different lengths in one batch).
  const std::vector<std::string> policies = {"none", "spa", "prefix", "dual", "dllm", "none"};
  std::vector<DiffusionRequest> reqs;
  for (size_t i = 0; i < policies.size(); ++i) {
    DiffusionRequest r;
    r.token_ids = PrintableTokens(i + 1 == policies.size() ? 20 : 48, 11);
    r.options.gen_length = 32;
    r.options.block_length = 16;
    r.options.steps = 32;
    r.options.cache = policies[i];
    reqs.push_back(r);
  }
  std::vector<std::unique_ptr<Collector>> got;
  for (const DiffusionRequest& r : reqs) {
    got.push_back(std::make_unique<Collector>());
    ASSERT_TRUE((*runner)->Diffuse(r, got.back()->Callback()).ok());
    if (got.size() == 1) entered.WaitForNotification();
  }
  all_submitted.Notify();
  for (size_t i = 0; i < reqs.size(); ++i) {
    std::vector<DiffusionEvent> ev = got[i]->Wait();
    ASSERT_TRUE(ev.back().finished) << i << ": " << ev.back().status;
    std::vector<int32_t> tokens, first_block;
    for (const DiffusionEvent& e : ev) {
      if (e.block == 0 && !e.finished) first_block = e.tokens;
      tokens.insert(tokens.end(), e.tokens.begin(), e.tokens.end());
    }
    dlm::DiffuseRequest alone;
    alone.prompt = reqs[i].token_ids;
    alone.options = reqs[i].options;
    auto want = dlm::Diffuse(*Cpu(), alone);
    ASSERT_TRUE(want.ok()) << want.status();
    const std::string& policy = policies[i];
    EXPECT_EQ(ev.back().stats.steps, want->stats.steps) << policy;
    EXPECT_EQ(ev.back().stats.rows_recomputed, want->stats.forward.q_rows) << policy;
    int eq = 0;
    const size_t n = std::min(tokens.size(), want->output.size());
    for (size_t k = 0; k < n; ++k) eq += tokens[k] == want->output[k];
    std::printf("[dlm runner gpu] request %zu %-6s prompt %zu: %d / %zu tokens equal to the "
                "CPU's (gpu %zu tokens, %.3f s batched; cpu %.3f s alone)\n",
                i, policy.c_str(), reqs[i].token_ids.size(), eq, want->output.size(),
                tokens.size(), ev.back().stats.decode_seconds, want->stats.seconds);
    if (i <= 1) {  // none and spa on the 48-token prompt
      const std::vector<int32_t> cpu_first(
          want->output.begin(), want->output.begin() + std::min<size_t>(16, want->output.size()));
      EXPECT_EQ(first_block, cpu_first) << policy;
    }
  }
}

}  // namespace
}  // namespace prehoc
