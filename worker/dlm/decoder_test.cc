#include "worker/dlm/decoder.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "worker/dlm/calibration.h"
#include "worker/testing/eos_in_block_backend.h"
#include "worker/engine.h"

namespace prehoc::dlm {
namespace {

namespace fs = std::filesystem;

constexpr int kMask = 39, kEos = 38, kBos = 37;

ModelConfig TinyConfig() {
  ModelConfig c;
  c.model_type = "llama";
  c.architecture = "LlamaForMaskedDiffusion";
  c.vocab_size = 40;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 256;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000;
  c.is_causal = false;
  c.mask_token_id = kMask;
  c.bos_token_id = kBos;
  c.eos_token_ids = {kEos};
  return c;
}

// Random weights scaled up so that attention and logits are far from uniform.
std::shared_ptr<ModelWeights> TinyWeights(uint64_t seed = 1) {
  std::shared_ptr<ModelWeights> w = ModelWeights::Random(TinyConfig(), seed);
  auto scale = [](std::vector<float>* v, float s) {
    for (float& x : *v) x *= s;
  };
  scale(&w->embed, 10);
  scale(&w->lm_head, 15);
  for (LayerWeights& l : w->layers) {
    for (auto* m : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) scale(m, 10);
  }
  return w;
}

std::unique_ptr<DlmModel> TinyModel(std::shared_ptr<const ModelWeights> w, int proxy_rank = 8) {
  DlmModelOptions o;
  o.weights = std::move(w);
  o.num_threads = 2;
  o.proxy_rank = proxy_rank;
  auto m = DlmModel::Create(o);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

std::string ShippedDir() { return (fs::path(PREHOC_SOURCE_DIR) / "models" / "prehoc-code-dlm").string(); }

const DlmModel& Shipped() {
  static const DlmModel* model = [] {
    DlmModelOptions o;
    o.model_dir = ShippedDir();
    o.num_threads = 2;
    auto m = DlmModel::Create(o);
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? m->release() : nullptr;
  }();
  return *model;
}

std::vector<int32_t> Prompt(int n, uint64_t seed) {
  std::vector<int32_t> p = {kBos};
  uint64_t x = seed * 2654435761u + 12345;
  while (static_cast<int>(p.size()) < n) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    p.push_back(static_cast<int32_t>((x >> 33) % 37));  // ids 0..36: no BOS/EOS/MASK
  }
  return p;
}

// Straightforward LLaDA low-confidence loop over Engine::ForwardFull (a full bidirectional
// forward of the whole canvas every step): the reference vanilla decoding must equal.
std::vector<int32_t> ReferenceDecode(Engine& engine, const std::vector<int32_t>& prompt,
                                     const std::vector<int32_t>& suffix, int gen, int block,
                                     int steps, int mask) {
  std::vector<int32_t> x = prompt;
  x.insert(x.end(), gen, mask);
  x.insert(x.end(), suffix.begin(), suffix.end());
  const int P = static_cast<int>(prompt.size()), V = engine.config().vocab_size;
  const int nb = gen / block, spb = steps / nb;
  for (int b = 0; b < nb; ++b) {
    const int bs = P + b * block;
    std::vector<int> transfer(spb, block / spb);
    for (int i = 0; i < block % spb; ++i) transfer[i]++;
    for (int i = 0; i < spb; ++i) {
      auto logits = engine.ForwardFull(x, /*causal=*/false);
      EXPECT_TRUE(logits.ok()) << logits.status();
      if (!logits.ok()) return {};
      std::vector<std::pair<double, int>> cand;  // (−confidence, position)
      std::vector<int> best(x.size());
      for (int r = bs; r < bs + block; ++r) {
        if (x[r] != mask) continue;
        const float* lg = logits->data() + static_cast<size_t>(r) * V;
        int a = 0;
        for (int v = 1; v < V; ++v) a = lg[v] > lg[a] ? v : a;
        double sum = 0;
        for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(lg[v]) - lg[a]);
        best[r] = a;
        cand.push_back({-1.0 / sum, r});
      }
      std::sort(cand.begin(), cand.end());
      for (int k = 0; k < transfer[i] && k < static_cast<int>(cand.size()); ++k) {
        x[cand[k].second] = best[cand[k].second];
      }
    }
  }
  return std::vector<int32_t>(x.begin() + P, x.begin() + P + gen);
}

DiffuseRequest Request(std::vector<int32_t> prompt, int gen, int block, int steps,
                       const std::string& cache = "none") {
  DiffuseRequest r;
  r.prompt = std::move(prompt);
  r.options.gen_length = gen;
  r.options.block_length = block;
  r.options.steps = steps;
  r.options.cache = cache;
  return r;
}

DiffuseResult Decode(const DlmModel& m, const DiffuseRequest& r, const DlmStepObserver& obs = nullptr) {
  auto res = Diffuse(m, r, std::span<const double>(), obs);
  EXPECT_TRUE(res.ok()) << res.status();
  return res.ok() ? *res : DiffuseResult{};
}

TEST(DlmDecoderTest, VanillaEqualsFullForwardReferenceOnShippedModel) {
  const DlmModel& m = Shipped();
  ASSERT_NE(m.tokenizer(), nullptr);
  EXPECT_EQ(m.mask_id(), 259);
  EngineOptions eo;
  eo.model_dir = ShippedDir();
  eo.num_threads = 2;
  eo.kv_cache_bytes = 8 << 20;
  auto engine = Engine::Create(eo);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const std::vector<int32_t> prompt =
      m.tokenizer()->Encode("def load(path):\n    with open(path) as f:\n        return ", true);
  const std::vector<int32_t> suffix = m.tokenizer()->Encode("\n\n", false);
  DiffuseRequest r = Request(prompt, 8, 4, 4);  // 2 blocks × 2 steps of 2 commits
  r.suffix = suffix;
  DiffuseResult got = Decode(m, r);
  EXPECT_EQ(got.response, ReferenceDecode(**engine, prompt, suffix, 8, 4, 4, 259));
  EXPECT_EQ(got.stats.steps, 4);
  EXPECT_EQ(got.stats.full_steps, 4);
  EXPECT_EQ(got.stats.decoded_tokens, 8);
  // The first step's logits match the engine's bidirectional forward.
  std::vector<int32_t> canvas = prompt;
  canvas.insert(canvas.end(), 8, 259);
  DlmState st(m.config(), static_cast<int>(canvas.size()), m.proxy_rank());
  std::vector<int32_t> all(canvas.size()), rows = {3, static_cast<int32_t>(canvas.size()) - 1};
  std::iota(all.begin(), all.end(), 0);
  ForwardSpec spec;
  spec.live = all;
  spec.logit_rows = rows;
  std::vector<float> logits;
  ASSERT_TRUE(m.Forward(&st, canvas, spec, &logits, nullptr).ok());
  auto ref = (*engine)->ForwardFull(canvas, false);
  ASSERT_TRUE(ref.ok());
  for (size_t j = 0; j < rows.size(); ++j) {
    for (int v = 0; v < 260; ++v) {
      EXPECT_NEAR(logits[j * 260 + v], (*ref)[rows[j] * 260 + v], 1e-4);
    }
  }
}

TEST(DlmDecoderTest, VanillaEqualsReferenceOnTinyModel) {
  auto w = TinyWeights(3);
  auto m = TinyModel(w);
  EngineOptions eo;
  eo.weights = w;
  eo.num_threads = 2;
  eo.kv_cache_bytes = 4 << 20;
  auto engine = Engine::Create(eo);
  ASSERT_TRUE(engine.ok());
  const auto prompt = Prompt(11, 5);
  EXPECT_EQ(Decode(*m, Request(prompt, 12, 4, 9)).response,
            ReferenceDecode(**engine, prompt, {}, 12, 4, 9, kMask));
  EXPECT_EQ(Decode(*m, Request(prompt, 12, 12, 12)).response,
            ReferenceDecode(**engine, prompt, {}, 12, 12, 12, kMask));
}

TEST(DlmDecoderTest, CachesRefreshedEveryStepEqualVanilla) {
  auto m = TinyModel(TinyWeights(4));
  const auto prompt = Prompt(13, 9);
  DiffuseRequest base = Request(prompt, 16, 8, 16);
  base.suffix = {1, 2, 3};
  const DiffuseResult vanilla = Decode(*m, base);
  struct Case {
    std::string cache;
    std::map<std::string, double> ov;
  };
  for (const Case& c : std::vector<Case>{{"prefix", {{"block_refresh", 1}}},
                                          {"dual", {{"block_refresh", 1}}},
                                          {"dllm", {{"prompt_refresh", 1}}},
                                          {"spa", {{"r_full", 1}}},
                                          {"spa", {{"r_full", 1}, {"kv_all_rows", 0}}}}) {
    DiffuseRequest r = base;
    r.options.cache = c.cache;
    r.options.cache_overrides = c.ov;
    DiffuseResult got = Decode(*m, r);
    EXPECT_EQ(got.response, vanilla.response) << c.cache;
    EXPECT_EQ(got.stats.full_steps, got.stats.steps) << c.cache;
  }
}

// After a full step, a partial step over an unchanged canvas must reproduce the full step's
// logits exactly: every cached K/V/δ/proxy is consistent with what recomputation would give.
TEST(DlmDecoderTest, PartialStepOnUnchangedCanvasIsExact) {
  auto m = TinyModel(TinyWeights(5));
  const int P = 10, L = 12, S = 2, N = P + L + S, NL = 3;
  std::vector<int32_t> canvas = Prompt(P, 2);
  canvas.insert(canvas.end(), L, kMask);
  canvas.push_back(4);
  canvas.push_back(5);
  canvas[P + 3] = 7;  // some response rows already decoded
  canvas[P + 8] = 9;
  std::vector<int32_t> all(N), gen(L), block(6), from_block(N - (P + 6));
  std::iota(all.begin(), all.end(), 0);
  std::iota(gen.begin(), gen.end(), P);
  std::iota(block.begin(), block.end(), P + 6);
  std::iota(from_block.begin(), from_block.end(), P + 6);
  std::vector<int32_t> out_rows = {P + 6, P + 7, P + 11};
  std::vector<int> update = {12, 3, 5};
  struct Case {
    const char* name;
    std::span<const int32_t> live;
    RowSelect select;
    int first;
    bool kv_all;
  };
  for (const Case& c : {Case{"dual", block, RowSelect::kAll, 1, true},
                        Case{"prefix", from_block, RowSelect::kAll, 1, true},
                        Case{"gen-refresh", gen, RowSelect::kAll, 1, true},
                        Case{"spa", gen, RowSelect::kSpa, 1, true},
                        Case{"spa-selected-kv", gen, RowSelect::kSpa, 1, false},
                        Case{"dllm", gen, RowSelect::kDllm, 0, true}}) {
    DlmState st(m->config(), N, m->proxy_rank());
    ForwardSpec full;
    full.live = all;
    full.logit_rows = out_rows;
    full.store_proxy = true;
    full.proxy_begin = P;
    full.proxy_end = P + L;
    std::vector<float> ref, got;
    ForwardStats stats;
    ASSERT_TRUE(m->Forward(&st, canvas, full, &ref, &stats).ok());
    ForwardSpec part;
    part.live = c.live;
    part.select = c.select;
    part.first_selective_layer = c.first;
    part.update_rows = update;
    part.kv_all_rows = c.kv_all;
    part.logit_rows = out_rows;
    ASSERT_TRUE(m->Forward(&st, canvas, part, &got, &stats).ok()) << c.name;
    ASSERT_EQ(got.size(), ref.size());
    for (size_t i = 0; i < ref.size(); ++i) ASSERT_EQ(got[i], ref[i]) << c.name << " " << i;
    if (c.select != RowSelect::kAll) {
      for (int l = c.first; l < NL; ++l) EXPECT_EQ(stats.q_rows[l], N + update[l]) << c.name << l;
    }
  }
}

TEST(DlmDecoderTest, RecomputeCountsFollowTheSchedule) {
  auto m = TinyModel(TinyWeights(6));
  const auto prompt = Prompt(9, 3);
  const int L = 16, N = 9 + L, steps = 16;
  {
    DiffuseRequest r = Request(prompt, L, 16, steps, "spa");
    r.options.cache_overrides = {{"r_full", 0}, {"r_gen", 0}};
    DiffuseResult res = Decode(*m, r);
    ASSERT_EQ(res.stats.full_steps, 1);
    ASSERT_EQ(res.stats.partial_steps, steps - 1);
    EXPECT_EQ(res.stats.forward.q_rows[0], N + (steps - 1) * L);  // layer 0 always full
    for (int l = 1; l < 3; ++l) {
      const int k = std::max(3, static_cast<int>(std::floor(L * res.schedule.rho[l] + 1e-9)));
      EXPECT_EQ(k, res.schedule.UpdateRows(l, L));
      EXPECT_EQ(res.stats.forward.q_rows[l], N + (steps - 1) * k) << l;
      EXPECT_EQ(res.stats.forward.kv_rows[l], N + (steps - 1) * L) << l;
    }
    r.options.cache_overrides["kv_all_rows"] = 0;
    DiffuseResult sel = Decode(*m, r);
    for (int l = 1; l < 3; ++l) {
      EXPECT_EQ(sel.stats.forward.kv_rows[l], sel.stats.forward.q_rows[l]) << l;
    }
  }
  {
    DiffuseRequest r = Request(prompt, L, 16, steps, "dllm");
    r.options.cache_overrides = {{"prompt_refresh", 0}, {"gen_refresh", 5}};
    DiffuseResult res = Decode(*m, r);
    EXPECT_EQ(res.stats.gen_refresh_steps, 3);  // steps 5, 10, 15
    for (int l = 0; l < 3; ++l) {
      EXPECT_EQ(res.stats.forward.q_rows[l], N + 3 * L + 12 * (L / 4)) << l;
    }
  }
  {
    DiffuseRequest r = Request(prompt, L, 8, steps, "dual");  // 2 blocks × 8 steps
    DiffuseResult res = Decode(*m, r);
    EXPECT_EQ(res.stats.full_steps, 2);
    for (int l = 0; l < 3; ++l) EXPECT_EQ(res.stats.forward.q_rows[l], 2 * N + 14 * 8);
    r.options.cache = "prefix";
    DiffuseResult pre = Decode(*m, r);
    // Block 0 feeds rows [9, 25) = 16, block 1 rows [17, 25) = 8.
    EXPECT_EQ(pre.stats.forward.q_rows[1], 2 * N + 7 * 16 + 7 * 8);
  }
}

TEST(DlmDecoderTest, LowConfidenceRemaskingSemantics) {
  auto m = TinyModel(TinyWeights(7));
  DiffuseRequest r = Request(Prompt(8, 1), 12, 6, 8);  // 2 blocks, 4 steps each: 2,2,1,1
  std::vector<DlmStepInfo> steps;
  DiffuseResult res = Decode(*m, r, [&](const DlmStepInfo& s) { steps.push_back(s); });
  ASSERT_EQ(steps.size(), 8u);
  const std::vector<int> want = {2, 2, 1, 1, 2, 2, 1, 1};
  std::vector<int> seen(12, 0);
  for (size_t i = 0; i < steps.size(); ++i) {
    const DlmStepInfo& s = steps[i];
    EXPECT_EQ(s.block, static_cast<int>(i) / 4);
    EXPECT_EQ(static_cast<int>(s.committed_rows.size()), want[i]) << i;
    float min_c = 2, max_n = -1;
    for (size_t j = 0; j < s.candidate_rows.size(); ++j) {
      const int row = s.candidate_rows[j];
      EXPECT_GE(row, s.block * 6);  // only the current block's masks are candidates
      EXPECT_LT(row, s.block * 6 + 6);
      EXPECT_EQ(seen[row], 0) << "committed row offered again";
      const bool committed =
          std::find(s.committed_rows.begin(), s.committed_rows.end(), row) != s.committed_rows.end();
      (committed ? min_c : max_n) = committed ? std::min(min_c, s.candidate_confidence[j])
                                              : std::max(max_n, s.candidate_confidence[j]);
    }
    EXPECT_GE(min_c, max_n) << "step " << i << " committed a less confident row";
    for (size_t j = 0; j < s.committed_rows.size(); ++j) {
      seen[s.committed_rows[j]] = 1;
      // Never re-masked: the final response holds the committed token.
      EXPECT_EQ(res.response[s.committed_rows[j]], s.committed_tokens[j]);
    }
  }
  EXPECT_EQ(std::accumulate(seen.begin(), seen.end(), 0), 12);
  EXPECT_EQ(res.finish_reason, "length");
}

TEST(DlmDecoderTest, RandomRemaskingAndTemperatureAreSeeded) {
  auto m = TinyModel(TinyWeights(8));
  DiffuseRequest r = Request(Prompt(8, 4), 12, 12, 6);
  r.options.remasking = "random";
  r.options.seed = 11;
  std::vector<DlmStepInfo> a, b;
  DiffuseResult ra = Decode(*m, r, [&](const DlmStepInfo& s) { a.push_back(s); });
  DiffuseResult rb = Decode(*m, r, [&](const DlmStepInfo& s) { b.push_back(s); });
  EXPECT_EQ(ra.response, rb.response);
  ASSERT_EQ(a.size(), 6u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].committed_rows, b[i].committed_rows);
  // Random confidences are uniform draws, not the model's: the commit order differs from
  // low-confidence remasking on this seed.
  DiffuseRequest lc = r;
  lc.options.remasking = "low_confidence";
  std::vector<DlmStepInfo> c;
  Decode(*m, lc, [&](const DlmStepInfo& s) { c.push_back(s); });
  bool differs = false;
  for (size_t i = 0; i < a.size(); ++i) differs |= a[i].committed_rows != c[i].committed_rows;
  EXPECT_TRUE(differs);

  // Temperature: Gumbel-max sampling, reproducible per seed, different across seeds.
  DiffuseRequest t = Request(Prompt(8, 4), 12, 12, 12);
  t.options.temperature = 3.0f;
  t.options.seed = 1;
  const auto s1 = Decode(*m, t).response;
  EXPECT_EQ(Decode(*m, t).response, s1);
  t.options.seed = 2;
  EXPECT_NE(Decode(*m, t).response, s1);
  t.options.temperature = 0;
  const auto greedy = Decode(*m, t).response;
  t.options.seed = 99;
  EXPECT_EQ(Decode(*m, t).response, greedy);  // the seed is irrelevant at T = 0
}

TEST(DlmDecoderTest, ParallelThreshold) {
  auto m = TinyModel(TinyWeights(9));
  DiffuseRequest r = Request(Prompt(8, 6), 16, 8, 16);
  r.options.parallel_threshold = 0.5;
  std::vector<DlmStepInfo> steps;
  DiffuseResult res = Decode(*m, r, [&](const DlmStepInfo& s) { steps.push_back(s); });
  EXPECT_EQ(res.stats.decoded_tokens, 16);
  for (const DlmStepInfo& s : steps) {
    ASSERT_GE(s.committed_rows.size(), 1u);
    float top = -1;
    for (float c : s.candidate_confidence) top = std::max(top, c);
    for (size_t j = 0; j < s.candidate_rows.size(); ++j) {
      const bool committed = std::find(s.committed_rows.begin(), s.committed_rows.end(),
                                       s.candidate_rows[j]) != s.committed_rows.end();
      const float cj = s.candidate_confidence[j];
      if (cj != top) {
        EXPECT_EQ(committed, cj >= 0.5f) << "row " << s.candidate_rows[j];
      }
    }
  }
  // τ → 0 commits the whole block in one step; τ = 1 commits one row per step.
  r.options.parallel_threshold = 1e-9;
  EXPECT_EQ(Decode(*m, r).stats.steps, 2);
  r.options.parallel_threshold = 1.0;
  EXPECT_EQ(Decode(*m, r).stats.steps, 16);
}

TEST(DlmDecoderTest, StopsAfterEndOfText) {
  // Zero final norm → all logits 0 → argmax is id 0; declare id 0 the end-of-text token, alone
  // or as the second id (every declared id stops the decode and ends the output, not only the
  // first: e.g. LLaDA's <|eot_id|> beside <|endoftext|>).
  for (const std::vector<int>& ids : {std::vector<int>{0}, std::vector<int>{kEos, 0}}) {
    auto w = TinyWeights(10);
    w->config.eos_token_ids = ids;
    std::fill(w->final_norm.begin(), w->final_norm.end(), 0.0f);
    auto m = TinyModel(w);
    ASSERT_NE(m, nullptr);
    ASSERT_EQ(std::vector<int>(m->eos_ids().begin(), m->eos_ids().end()), ids);
    DiffuseRequest r = Request(Prompt(6, 1), 12, 4, 12);
    r.options.stop_at_eos = true;
    DiffuseResult res = Decode(*m, r);
    EXPECT_EQ(res.finish_reason, "eos") << ids.size();
    EXPECT_EQ(res.stats.blocks, 1);
    EXPECT_EQ(res.stats.steps, 4);
    EXPECT_TRUE(res.output.empty());
    for (int i = 0; i < 4; ++i) EXPECT_EQ(res.response[i], 0);
    for (int i = 4; i < 12; ++i) EXPECT_EQ(res.response[i], kMask);  // never decoded
    r.options.stop_at_eos = false;
    DiffuseResult all = Decode(*m, r);
    EXPECT_EQ(all.finish_reason, "length");
    EXPECT_EQ(all.stats.blocks, 3);
    EXPECT_EQ(all.stats.decoded_tokens, 12);
    EXPECT_TRUE(all.output.empty()) << ids.size();  // cut at the first end-of-text
  }
}

// The second declared end-of-text id forced into block 1 (EosInBlockBackend, eos_index 1) stops
// the decode after that block with the output of block 0, as the first id does.
TEST(DlmDecoderTest, StopsOnTheSecondEndOfTextId) {
  auto w = TinyWeights(6);
  constexpr int kEos2 = 36;
  w->config.eos_token_ids = {kEos, kEos2};
  auto m = TinyModel(w);
  ASSERT_NE(m, nullptr);
  const int P = 7, gen = 16, block = 4, steps = 16;
  DiffuseRequest r = Request(Prompt(P, 2), gen, block, steps);
  const DiffuseResult full = Decode(*m, r);
  // Precondition: neither id in block 0 of the plain decode.
  for (int i = 0; i < block; ++i) {
    ASSERT_NE(full.response[i], kEos);
    ASSERT_NE(full.response[i], kEos2);
  }
  for (int index : {0, 1}) {
    const int id = index == 0 ? kEos : kEos2;
    EosInBlockBackend eos(*m, P + block, P + 2 * block, index);
    DiffuseRequest rs = r;
    rs.options.stop_at_eos = true;
    auto got = Diffuse(eos, rs);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->finish_reason, "eos") << id;
    EXPECT_EQ(got->stats.blocks, 2) << id;
    EXPECT_EQ(got->stats.steps, 2 * steps / (gen / block)) << id;
    for (int i = 0; i < gen; ++i) {
      const int want = i < block ? full.response[i] : i < 2 * block ? id : kMask;
      EXPECT_EQ(got->response[i], want) << id << " row " << i;
    }
    std::vector<int32_t> want_out(full.response.begin(), full.response.begin() + block);
    want_out.erase(std::find(want_out.begin(), want_out.end(), kMask), want_out.end());
    EXPECT_EQ(got->output, want_out) << id;
  }
  // An index the model does not declare is refused by the wrapper.
  EosInBlockBackend bad(*m, P, P + block, 2);
  EXPECT_EQ(Diffuse(bad, r).status().code(), absl::StatusCode::kFailedPrecondition);
}

// The benchmarks' synthetic answer length (eos_in_block_backend.h): end-of-text forced into
// block N − 1 makes stop_at_eos end the decode after exactly N blocks, with the step kinds of the
// schedule's first N · steps_per_block steps and the earlier blocks decoded as without it.
TEST(DlmDecoderTest, EosInBlockStopsAfterThatBlock) {
  auto m = TinyModel(TinyWeights(6));
  ASSERT_NE(m, nullptr);
  const int P = 7, gen = 16, block = 4, steps = 16, spb = steps / (gen / block);
  for (const std::string cache : {"none", "spa", "dllm", "dual"}) {
    DiffuseRequest r = Request(Prompt(P, 2), gen, block, steps, cache);
    // Refreshes inside the first blocks, so that the step kinds differ from step to step.
    if (cache == "spa") r.options.cache_overrides = {{"r_full", 5}, {"r_gen", 3}};
    if (cache == "dllm") r.options.cache_overrides = {{"prompt_refresh", 5}, {"gen_refresh", 3}};
    auto sched = MakeDlmSchedule(m->config(), cache, r.options.cache_overrides);
    ASSERT_TRUE(sched.ok()) << sched.status();
    auto full = DiffuseWithSchedule(*m, r, *sched);
    ASSERT_TRUE(full.ok()) << full.status();
    for (int n : {1, 3, 4}) {
      // Precondition of the comparison: no end-of-text of its own before block n − 1.
      ASSERT_EQ(std::count(full->response.begin(), full->response.begin() + (n - 1) * block, kEos),
                0);
      EosInBlockBackend eos(*m, P + (n - 1) * block, P + n * block);
      DiffuseRequest rs = r;
      rs.options.stop_at_eos = true;
      auto res = DiffuseWithSchedule(eos, rs, *sched);
      ASSERT_TRUE(res.ok()) << res.status();
      EXPECT_EQ(res->finish_reason, "eos") << cache << " n=" << n;
      EXPECT_EQ(res->stats.blocks, n) << cache;
      EXPECT_EQ(res->stats.steps, n * spb) << cache;
      int kinds[3] = {0, 0, 0};
      for (int s = 0; s < n * spb; ++s) kinds[static_cast<int>(sched->StepKind(s, s % spb))]++;
      EXPECT_EQ(res->stats.full_steps, kinds[static_cast<int>(DlmStepKind::kFull)]) << cache;
      EXPECT_EQ(res->stats.gen_refresh_steps, kinds[static_cast<int>(DlmStepKind::kGenRefresh)])
          << cache;
      EXPECT_EQ(res->stats.partial_steps, kinds[static_cast<int>(DlmStepKind::kPartial)]) << cache;
      for (int i = 0; i < gen; ++i) {
        const int want = i < (n - 1) * block ? full->response[i] : i < n * block ? kEos : kMask;
        EXPECT_EQ(res->response[i], want) << cache << " n=" << n << " row " << i;
      }
      // output: the response before the first end-of-text, cut at the first MASK (this random
      // model also proposes the mask id, which ends the output as never-decoded rows do).
      std::vector<int32_t> want_out(full->response.begin(),
                                    full->response.begin() + (n - 1) * block);
      want_out.erase(std::find(want_out.begin(), want_out.end(), kMask), want_out.end());
      EXPECT_EQ(res->output, want_out) << cache << " n=" << n;
    }
    // Without stop_at_eos the wrapper only changes the answers: every block is decoded.
    EosInBlockBackend eos(*m, P, P + block);
    auto res = DiffuseWithSchedule(eos, r, *sched);
    ASSERT_TRUE(res.ok()) << res.status();
    EXPECT_EQ(res->finish_reason, "length");
    EXPECT_EQ(res->stats.steps, steps);
  }
}

TEST(DlmDecoderTest, BadInputsNameTheField) {
  auto m = TinyModel(TinyWeights(11));
  auto expect_bad = [&](DiffuseRequest r, const std::string& field) {
    auto res = Diffuse(*m, r);
    ASSERT_FALSE(res.ok()) << field;
    EXPECT_EQ(res.status().code(), absl::StatusCode::kInvalidArgument) << res.status();
    EXPECT_EQ(res.status().message().rfind(field + ":", 0), 0u) << res.status();
  };
  const DiffuseRequest ok = Request(Prompt(5, 1), 8, 4, 8);
  auto with = [&](auto edit) {
    DiffuseRequest r = ok;
    edit(r);
    return r;
  };
  expect_bad(with([](DiffuseRequest& r) { r.options.gen_length = 0; }), "gen_length");
  expect_bad(with([](DiffuseRequest& r) { r.options.gen_length = -4; }), "gen_length");
  expect_bad(with([](DiffuseRequest& r) { r.options.block_length = 3; }), "block_length");
  expect_bad(with([](DiffuseRequest& r) { r.options.block_length = -1; }), "block_length");
  expect_bad(with([](DiffuseRequest& r) { r.options.steps = -1; }), "steps");
  expect_bad(with([](DiffuseRequest& r) { r.options.steps = 3; }), "steps");   // 2 blocks
  expect_bad(with([](DiffuseRequest& r) { r.options.steps = 10; }), "steps");  // 5 > block 4
  expect_bad(with([](DiffuseRequest& r) { r.options.remasking = "top"; }), "remasking");
  expect_bad(with([](DiffuseRequest& r) { r.options.temperature = -1; }), "temperature");
  expect_bad(with([](DiffuseRequest& r) { r.options.parallel_threshold = 1.5; }),
             "parallel_threshold");
  expect_bad(with([](DiffuseRequest& r) { r.options.cache = "fast"; }), "cache");
  expect_bad(with([](DiffuseRequest& r) {
               r.options.cache = "spa";
               r.options.cache_overrides = {{"r_ful", 2}};
             }),
             "cache_overrides.r_ful");
  expect_bad(with([](DiffuseRequest& r) { r.prompt.clear(); }), "prompt");
  expect_bad(with([](DiffuseRequest& r) { r.prompt[2] = kMask; }), "prompt");
  expect_bad(with([](DiffuseRequest& r) { r.prompt[1] = 40; }), "prompt");
  expect_bad(with([](DiffuseRequest& r) { r.suffix = {-1}; }), "suffix");
  expect_bad(with([](DiffuseRequest& r) {
               r.options.gen_length = 256;
               r.options.block_length = 0;
               r.options.steps = 0;
             }),
             "gen_length");  // 5 + 256 > context 256
  // spa on a model built without proxies.
  auto bare = TinyModel(TinyWeights(11), -1);
  DiffuseRequest r = ok;
  r.options.cache = "spa";
  auto res = Diffuse(*bare, r);
  ASSERT_FALSE(res.ok());
  EXPECT_EQ(res.status().code(), absl::StatusCode::kFailedPrecondition);
  // A causal model is refused at load.
  ModelConfig causal = TinyConfig();
  causal.is_causal = true;
  DlmModelOptions o;
  o.weights = ModelWeights::Random(causal, 1);
  auto cm = DlmModel::Create(o);
  ASSERT_FALSE(cm.ok());
  EXPECT_NE(cm.status().message().find("is_causal"), std::string::npos);
}

TEST(DlmDecoderTest, SpaAutoCalibratesAndDecodes) {
  auto m = TinyModel(TinyWeights(12));
  CalibrationOptions co;
  co.gen_length = 8;
  co.block_length = 8;
  co.steps = 8;
  auto both = MeasureDrift(*m, {Prompt(8, 1), Prompt(8, 2)}, co);
  ASSERT_TRUE(both.ok()) << both.status();
  for (int l = 1; l < 3; ++l) {
    EXPECT_GT(both->proxy[l], 0.0) << l;
    EXPECT_LT(both->proxy[l], 2.0) << l;
  }
  auto drift = MeasureDriftProfile(*m, {Prompt(8, 1), Prompt(8, 2)}, co);
  ASSERT_TRUE(drift.ok()) << drift.status();
  EXPECT_EQ(*drift, both->output);  // deterministic
  ASSERT_EQ(drift->size(), 3u);
  EXPECT_EQ((*drift)[0], 0.0);
  for (int l = 1; l < 3; ++l) {
    EXPECT_GT((*drift)[l], 0.0) << l;
    EXPECT_LT((*drift)[l], 2.0) << l;
  }
  DiffuseRequest r = Request(Prompt(8, 3), 16, 8, 16, "spa-auto");
  auto res = Diffuse(*m, r, *drift);
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(res->schedule.policy, DlmCachePolicy::kSpaAuto);
  EXPECT_EQ(res->schedule.drift, *drift);
  EXPECT_EQ(res->stats.decoded_tokens, 16);
  auto none = Diffuse(*m, r);  // spa-auto without a profile
  EXPECT_FALSE(none.ok());
}

TEST(DlmDecoderTest, EveryPolicyDecodesTheShippedModel) {
  const DlmModel& m = Shipped();
  const auto prompt = m.tokenizer()->Encode("def main(argv):\n    ", true);
  DiffuseRequest r = Request(prompt, 8, 8, 8);
  std::vector<DlmStepInfo> vs;
  const DiffuseResult vanilla = Decode(m, r, [&](const DlmStepInfo& s) { vs.push_back(s); });
  for (const char* cache : {"prefix", "dual", "dllm", "spa"}) {
    r.options.cache = cache;
    std::vector<DlmStepInfo> ss;
    DiffuseResult res = Decode(m, r, [&](const DlmStepInfo& s) { ss.push_back(s); });
    EXPECT_EQ(res.stats.decoded_tokens, 8) << cache;
    EXPECT_EQ(res.stats.full_steps, 1) << cache;
    // dllm / spa refresh the response at step 7 (K_r = R_gen = 7).
    EXPECT_EQ(res.stats.partial_steps, std::string(cache) == "dllm" || std::string(cache) == "spa" ? 6 : 7)
        << cache;
    // Step 0 is a full forward for every policy: the same first commit as exact decoding.
    ASSERT_EQ(ss.size(), 8u);
    EXPECT_EQ(ss[0].committed_rows, vs[0].committed_rows) << cache;
    EXPECT_EQ(ss[0].committed_tokens, vs[0].committed_tokens) << cache;
    EXPECT_EQ(ss[0].candidate_confidence, vs[0].candidate_confidence) << cache;
  }
}

// A batch decoded in lockstep (DiffuseBatchWithSchedule) gives each request exactly what decoding
// it alone gives: different prompt lengths, a suffix, parallel decoding (requests finish at
// different steps) and random remasking, for a full-step policy and a selective one.
TEST(DlmDecoderTest, BatchEqualsSingleRequests) {
  auto m = TinyModel(TinyWeights(3));
  ASSERT_NE(m, nullptr);
  for (const std::string cache : {"none", "spa", "dual"}) {
    std::vector<DiffuseRequest> reqs = {Request(Prompt(9, 1), 16, 8, 8, cache),
                                        Request(Prompt(14, 2), 16, 8, 8, cache),
                                        Request(Prompt(5, 3), 16, 8, 8, cache)};
    reqs[1].suffix = {5, 6};
    reqs[2].options.parallel_threshold = 0.3;
    reqs[0].options.remasking = "random";
    reqs[0].options.seed = 7;
    auto sched = MakeDlmSchedule(m->config(), cache, {});
    ASSERT_TRUE(sched.ok()) << sched.status();
    auto batch = DiffuseBatchWithSchedule(*m, reqs, *sched);
    ASSERT_TRUE(batch.ok()) << batch.status();
    ASSERT_EQ(batch->size(), reqs.size());
    for (size_t i = 0; i < reqs.size(); ++i) {
      auto single = DiffuseWithSchedule(*m, reqs[i], *sched);
      ASSERT_TRUE(single.ok()) << single.status();
      EXPECT_EQ((*batch)[i].response, single->response) << cache << " request " << i;
      EXPECT_EQ((*batch)[i].stats.steps, single->stats.steps) << cache << " request " << i;
      EXPECT_EQ((*batch)[i].stats.forward.q_rows, single->stats.forward.q_rows) << cache;
    }
  }
  auto sched = MakeDlmSchedule(m->config(), "none", {});
  ASSERT_TRUE(sched.ok());
  auto empty = DiffuseBatchWithSchedule(*m, std::span<const DiffuseRequest>(), *sched);
  ASSERT_FALSE(empty.ok());
  EXPECT_TRUE(absl::StartsWith(empty.status().message(), "requests")) << empty.status();
}

}  // namespace
}  // namespace prehoc::dlm
