#include "worker/engine.h"

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "worker/backends/cpu/cpu_ops.h"
#include "worker/rope.h"

namespace prehoc {

int64_t KvPageBytes(const ModelConfig& config, int page_size) {
  return int64_t{2} * config.num_hidden_layers * config.num_key_value_heads * page_size *
         config.head_dim * static_cast<int64_t>(sizeof(float));
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  if (options.page_size <= 0 || options.page_size > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size must be in [1, 1024], got ", options.page_size));
  }
  if (options.num_threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_threads must be >= 0, got ", options.num_threads));
  }
  std::shared_ptr<const ModelWeights> weights = options.weights;
  if (weights == nullptr) {
    if (options.model_dir.empty()) {
      return absl::InvalidArgumentError("model_dir is empty and no weights were given");
    }
    ASSIGN_OR_RETURN(std::unique_ptr<ModelWeights> loaded, ModelWeights::Load(options.model_dir));
    weights = std::move(loaded);
  }
  std::unique_ptr<Tokenizer> tokenizer;
  if (!options.model_dir.empty()) {
    ASSIGN_OR_RETURN(tokenizer,
                     Tokenizer::LoadFromModelDir(options.model_dir, weights->config.vocab_size));
  }
  const int64_t page_bytes = KvPageBytes(weights->config, options.page_size);
  const int64_t num_pages = options.kv_cache_bytes / page_bytes;
  if (num_pages < 1 || num_pages > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv_cache_bytes=", options.kv_cache_bytes, " gives ", num_pages, " pages of ", page_bytes,
        " bytes; need between 1 and 2^30 pages"));
  }
  if (options.max_context < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_context must be >= 0, got ", options.max_context));
  }
  auto engine = std::unique_ptr<Engine>(new Engine(std::move(weights), std::move(tokenizer),
                                                   options, static_cast<int32_t>(num_pages)));
  LOG(INFO) << "engine ready: model=" << engine->config().model_type
            << " layers=" << engine->config().num_hidden_layers
            << " params=" << engine->weights().num_parameters()
            << " kv_pages=" << num_pages << " page_size=" << options.page_size
            << " kv_bytes=" << engine->kv_cache().bytes() << " threads=" << engine->num_threads();
  return engine;
}

Engine::Engine(std::shared_ptr<const ModelWeights> weights, std::unique_ptr<Tokenizer> tokenizer,
               const EngineOptions& options, int32_t num_pages)
    : weights_(std::move(weights)),
      tokenizer_(std::move(tokenizer)),
      pool_(options.num_threads),
      max_context_(options.max_context > 0 ? options.max_context
                                           : weights_->config.max_position_embeddings),
      allocator_(num_pages),
      cache_(KvCacheShape{weights_->config.num_hidden_layers, weights_->config.num_key_value_heads,
                          weights_->config.head_dim, options.page_size, num_pages}),
      inv_freq_(RopeInvFrequencies(weights_->config)) {}

std::string Engine::description() const {
  return absl::StrCat("CPU, ", pool_.num_threads(), " threads");
}

Engine::SeqId Engine::CreateSequence() {
  const SeqId id = next_seq_++;
  seqs_.emplace(id, Sequence{});
  return id;
}

absl::Status Engine::FreeSequence(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  RETURN_IF_ERROR(allocator_.Free(it->second.page_table));
  seqs_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<int> Engine::SequenceLength(SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  return it->second.length;
}

absl::StatusOr<std::vector<int32_t>> Engine::PageTable(SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  return it->second.page_table;
}

absl::StatusOr<std::vector<std::vector<float>>> Engine::Step(std::span<const StepItem> items,
                                                             bool causal) {
  const ModelConfig& c = config();
  const int page_size = cache_.shape().page_size;
  // ---- Validate everything before touching state (a sequence's page table always holds
  // PagesFor(length) pages).
  ASSIGN_OR_RETURN(const StepDemand demand,
                   ValidateStepItems(items, c.vocab_size, max_context_, page_size,
                                     [this](int64_t seq) -> std::optional<int> {
                                       auto s = seqs_.find(seq);
                                       if (s == seqs_.end()) return std::nullopt;
                                       return s->second.length;
                                     }));
  const int64_t total_tokens = demand.tokens;
  // ---- Allocate pages (all or nothing).
  ASSIGN_OR_RETURN(std::vector<int32_t> fresh,
                   allocator_.Allocate(static_cast<int32_t>(demand.new_pages)));
  size_t next_fresh = 0;
  for (const StepItem& it : items) {
    Sequence& s = seqs_[it.seq];
    const int32_t want = PagesFor(s.length + static_cast<int64_t>(it.tokens.size()), page_size);
    while (static_cast<int32_t>(s.page_table.size()) < want) s.page_table.push_back(fresh[next_fresh++]);
  }

  // ---- Row bookkeeping.
  const int64_t N = total_tokens;
  const int D = c.hidden_size, H = c.num_attention_heads, KVH = c.num_key_value_heads;
  const int hd = c.head_dim, F = c.intermediate_size, V = c.vocab_size;
  const int group = H / KVH;
  std::vector<int> row_item(N), row_pos(N);
  std::vector<int> start_len(items.size());
  {
    int64_t r = 0;
    for (size_t b = 0; b < items.size(); ++b) {
      start_len[b] = seqs_[items[b].seq].length;
      for (size_t i = 0; i < items[b].tokens.size(); ++i, ++r) {
        row_item[r] = static_cast<int>(b);
        row_pos[r] = start_len[b] + static_cast<int>(i);
      }
    }
  }
  std::vector<float> x(N * D), h(N * D), q(N * H * hd), k(N * KVH * hd), v(N * KVH * hd),
      attn(N * H * hd), o(N * D), gate(N * F), up(N * F);
  {
    int64_t r = 0;
    for (const StepItem& it : items) {
      for (int32_t t : it.tokens) {
        std::copy_n(weights_->embed.data() + static_cast<int64_t>(t) * D, D, x.data() + r * D);
        ++r;
      }
    }
  }
  std::vector<std::vector<int32_t>> lists;                      // selection scratch
  std::vector<std::vector<std::vector<int32_t>>> item_lists(items.size());  // kept for Observe
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  // ETF: rows [0, frozen[layer]) are frozen at `layer` (single whole-prompt prefill only).
  std::vector<int64_t> frozen(c.num_hidden_layers, 0);
  if (causal && items.size() == 1 && start_len[0] == 0 && N > 1 &&
      items[0].prefill_plan != nullptr) {
    Sequence& s = seqs_[items[0].seq];
    frozen = EtfFrozenRows(*items[0].prefill_plan, c.num_hidden_layers, N, page_size);
    if (*std::max_element(frozen.begin(), frozen.end()) > 0) {
      s.alias.assign(c.num_hidden_layers, std::vector<int16_t>(s.page_table.size(), -1));
      for (int l = 1; l < c.num_hidden_layers; ++l) {
        for (int64_t p = 0; p < frozen[l] / page_size; ++p) {
          const int16_t src = s.alias[l - 1][p];
          s.alias[l][p] = src >= 0 ? src : static_cast<int16_t>(l - 1);
        }
      }
    }
  }

  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    const LayerWeights& L = weights_->layers[layer];
    // Rows [r0, N) are computed at this layer (r0 > 0 only under ETF).
    const int64_t r0 = frozen[layer];
    const int64_t NR = N - r0;
    cpu::RmsNorm(x.data() + r0 * D, NR, D, L.attn_norm.data(), eps, h.data() + r0 * D);
    cpu::MatMulNT(h.data() + r0 * D, NR, D, L.wq.data(), H * hd,
                  L.bq.empty() ? nullptr : L.bq.data(), q.data() + r0 * H * hd, &pool_);
    cpu::MatMulNT(h.data() + r0 * D, NR, D, L.wk.data(), KVH * hd,
                  L.bk.empty() ? nullptr : L.bk.data(), k.data() + r0 * KVH * hd, &pool_);
    cpu::MatMulNT(h.data() + r0 * D, NR, D, L.wv.data(), KVH * hd,
                  L.bv.empty() ? nullptr : L.bv.data(), v.data() + r0 * KVH * hd, &pool_);
    for (int64_t r = r0; r < N; ++r) {
      ApplyRope(q.data() + r * H * hd, H, hd, row_pos[r], inv_freq_);
      ApplyRope(k.data() + r * KVH * hd, KVH, hd, row_pos[r], inv_freq_);
      const Sequence& s = seqs_[items[row_item[r]].seq];
      const int32_t page = s.page_table[row_pos[r] / page_size];
      const int slot = row_pos[r] % page_size;
      for (int kh = 0; kh < KVH; ++kh) {
        std::copy_n(k.data() + (r * KVH + kh) * hd, hd, cache_.K(layer, page, kh) + slot * hd);
        std::copy_n(v.data() + (r * KVH + kh) * hd, hd, cache_.V(layer, page, kh) + slot * hd);
      }
    }
    // Key/value pointers per (item, kv head) over the item's whole new length.
    std::vector<std::vector<const float*>> kptr(items.size() * KVH), vptr(items.size() * KVH);
    for (size_t b = 0; b < items.size(); ++b) {
      const Sequence& s = seqs_[items[b].seq];
      const int len = start_len[b] + static_cast<int>(items[b].tokens.size());
      for (int kh = 0; kh < KVH; ++kh) {
        auto& kp = kptr[b * KVH + kh];
        auto& vp = vptr[b * KVH + kh];
        kp.resize(len);
        vp.resize(len);
        KvView view(&cache_, s.page_table, layer, len, s.Alias(layer));
        for (int t = 0; t < len; ++t) {
          kp[t] = view.key(kh, t);
          vp[t] = view.value(kh, t);
        }
      }
    }
    // Decode items with a selector attend to the selected tokens only.
    std::vector<char> selected(items.size(), 0);
    std::vector<std::vector<std::vector<float>>> observed(items.size());
    for (size_t b = 0; b < items.size(); ++b) {
      SequenceSelector* sel = items[b].selector;
      if (sel == nullptr || sel->is_dense() || items[b].tokens.size() != 1) continue;
      const Sequence& s = seqs_[items[b].seq];
      const int len = start_len[b] + 1;
      const int64_t r = std::find(row_item.begin(), row_item.end(), static_cast<int>(b)) - row_item.begin();
      KvView view(&cache_, s.page_table, layer, len, s.Alias(layer));
      sel->SelectAndMeasure(layer, q.data() + r * H * hd, view, &lists);
      for (int kh = 0; kh < KVH; ++kh) {
        auto& kp = kptr[b * KVH + kh];
        auto& vp = vptr[b * KVH + kh];
        const auto& idx = lists[kh];
        kp.resize(idx.size());
        vp.resize(idx.size());
        for (size_t j = 0; j < idx.size(); ++j) {
          kp[j] = view.key(kh, idx[j]);
          vp[j] = view.value(kh, idx[j]);
        }
      }
      selected[b] = 1;
      if (sel->wants_observe()) {
        item_lists[b] = lists;
        observed[b].resize(H);
      }
    }
    // PSAW band for prefill rows: per item, the layer's drop fraction and sink (0 = no band).
    std::vector<double> band(items.size(), 0.0);
    std::vector<int> band_sink(items.size(), 0);
    for (size_t b = 0; b < items.size(); ++b) {
      const SelectionPlan* plan = items[b].prefill_plan;
      if (plan != nullptr && causal && items[b].tokens.size() > 1 &&
          layer < static_cast<int>(plan->layers.size())) {
        band[b] = plan->layers[layer].psaw_drop_fraction;
        band_sink[b] = plan->layers[layer].sink;
      }
    }
    pool_.ParallelFor(NR * H, 4, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      std::vector<const float*> bk, bv;
      for (int64_t job = begin; job < end; ++job) {
        const int64_t r = r0 + job / H;
        const int head = static_cast<int>(job % H);
        const int b = row_item[r];
        const int kh = head / group;
        const auto& kp = kptr[b * KVH + kh];
        const auto& vp = vptr[b * KVH + kh];
        const float* const* keys = kp.data();
        const float* const* values = vp.data();
        int64_t n_keys =
            (causal && !selected[b]) ? row_pos[r] + 1 : static_cast<int64_t>(kp.size());
        const int64_t lo = static_cast<int64_t>(band[b] * static_cast<double>(row_pos[r] + 1));
        if (band[b] > 0 && lo > band_sink[b]) {
          // Trapezoid band: sinks + [lo, p]; the skipped keys are never read.
          bk.assign(kp.begin(), kp.begin() + band_sink[b]);
          bv.assign(vp.begin(), vp.begin() + band_sink[b]);
          bk.insert(bk.end(), kp.begin() + lo, kp.begin() + n_keys);
          bv.insert(bv.end(), vp.begin() + lo, vp.begin() + n_keys);
          keys = bk.data();
          values = bv.data();
          n_keys = static_cast<int64_t>(bk.size());
        }
        scores.resize(n_keys);
        cpu::AttendOne(q.data() + (r * H + head) * hd, keys, values, n_keys, hd, scale,
                       scores.data(), attn.data() + (r * H + head) * hd);
        if (!observed[b].empty()) observed[b][head] = scores;
      }
    });
    for (size_t b = 0; b < items.size(); ++b) {
      for (int head = 0; head < static_cast<int>(observed[b].size()); ++head) {
        items[b].selector->Observe(layer, head, item_lists[b][head / group], observed[b][head]);
      }
    }
    float* xr = x.data() + r0 * D;
    float* hr = h.data() + r0 * D;
    float* orow = o.data() + r0 * D;
    cpu::MatMulNT(attn.data() + r0 * H * hd, NR, H * hd, L.wo.data(), D,
                  L.bo.empty() ? nullptr : L.bo.data(), orow, &pool_);
    cpu::AddInPlace(xr, orow, NR * D);
    cpu::RmsNorm(xr, NR, D, L.mlp_norm.data(), eps, hr);
    cpu::MatMulNT(hr, NR, D, L.w_gate.data(), F, nullptr, gate.data(), &pool_);
    cpu::MatMulNT(hr, NR, D, L.w_up.data(), F, nullptr, up.data(), &pool_);
    cpu::SiluMul(gate.data(), up.data(), NR * F, gate.data());
    cpu::MatMulNT(gate.data(), NR, F, L.w_down.data(), D, nullptr, orow, &pool_);
    cpu::AddInPlace(xr, orow, NR * D);
  }

  for (size_t b = 0; b < items.size(); ++b) {
    seqs_[items[b].seq].length = start_len[b] + static_cast<int>(items[b].tokens.size());
  }

  // ---- Final norm + LM head on the rows whose logits were asked for.
  std::vector<std::vector<float>> logits(items.size());
  int64_t r0 = 0;
  for (size_t b = 0; b < items.size(); ++b) {
    const int64_t n = static_cast<int64_t>(items[b].tokens.size());
    const int64_t first = items[b].all_logits ? r0 : r0 + n - 1;
    const int64_t rows = r0 + n - first;
    std::vector<float> normed(rows * D);
    cpu::RmsNorm(x.data() + first * D, rows, D, weights_->final_norm.data(), eps, normed.data());
    logits[b].resize(rows * V);
    cpu::MatMulNT(normed.data(), rows, D, weights_->lm_head_data(), V, nullptr, logits[b].data(),
                  &pool_);
    r0 += n;
  }
  return logits;
}

absl::StatusOr<int64_t> Engine::AliasedPages(SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  int64_t n = 0;
  for (const auto& layer : it->second.alias) {
    for (int16_t a : layer) n += a >= 0;
  }
  return n;
}

absl::StatusOr<Engine::SeqId> Engine::ForkSequence(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  const Sequence& src = it->second;
  ASSIGN_OR_RETURN(std::vector<int32_t> pages,
                   allocator_.Allocate(static_cast<int32_t>(src.page_table.size())));
  const KvCacheShape& sh = cache_.shape();
  const size_t block = static_cast<size_t>(sh.page_size) * sh.head_dim;
  for (int l = 0; l < sh.num_layers; ++l) {
    for (size_t p = 0; p < pages.size(); ++p) {
      for (int kh = 0; kh < sh.num_kv_heads; ++kh) {
        std::copy_n(cache_.K(l, src.page_table[p], kh), block, cache_.K(l, pages[p], kh));
        std::copy_n(cache_.V(l, src.page_table[p], kh), block, cache_.V(l, pages[p], kh));
      }
    }
  }
  const SeqId id = next_seq_++;
  seqs_.emplace(id, Sequence{src.length, std::move(pages), src.alias});
  return id;
}

absl::StatusOr<std::vector<float>> Engine::ForwardFull(std::span<const int32_t> tokens,
                                                       bool causal) {
  const SeqId seq = CreateSequence();
  StepItem item{seq, tokens, /*all_logits=*/true};
  auto result = Step(std::span<const StepItem>(&item, 1), causal);
  absl::Status freed = FreeSequence(seq);
  if (!result.ok()) return result.status();
  RETURN_IF_ERROR(freed);
  return std::move((*result)[0]);
}

}  // namespace prehoc
