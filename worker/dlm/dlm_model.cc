#include "worker/dlm/dlm_model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "worker/backends/cpu/cpu_ops.h"
#include "worker/dlm/llada_checkpoint.h"
#include "worker/rope.h"

namespace prehoc::dlm {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

float Cosine(const float* a, const float* b, int n) {
  const float ab = cpu::Dot(a, b, n);
  const float aa = cpu::Dot(a, a, n);
  const float bb = cpu::Dot(b, b, n);
  return ab / std::max(std::sqrt(aa) * std::sqrt(bb), 1e-8f);
}

// Indices (into `score`) of the k smallest scores, ties broken by the lower index; returned in
// increasing index order.
std::vector<int> SmallestK(const std::vector<float>& score, int k) {
  std::vector<int> idx(score.size());
  std::iota(idx.begin(), idx.end(), 0);
  k = std::clamp(k, 0, static_cast<int>(idx.size()));
  auto less = [&](int a, int b) { return score[a] < score[b] || (score[a] == score[b] && a < b); };
  std::nth_element(idx.begin(), idx.begin() + k, idx.end(), less);
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
  return idx;
}

// Copies the rows `sel` of src ([*, width]) into dst ([sel.size(), width]).
void Gather(const float* src, int width, const std::vector<int>& sel, std::vector<float>* dst) {
  dst->resize(sel.size() * static_cast<size_t>(width));
  for (size_t i = 0; i < sel.size(); ++i) {
    std::copy_n(src + static_cast<size_t>(sel[i]) * width, width, dst->data() + i * width);
  }
}

}  // namespace

DlmState::DlmState(const ModelConfig& c, int rows, int proxy_rank)
    : rows_(rows),
      hidden_(c.hidden_size),
      kv_width_(c.num_key_value_heads * c.head_dim),
      proxy_rank_(std::max(proxy_rank, 0)) {
  const int L = c.num_hidden_layers;
  k_.assign(L, std::vector<float>(static_cast<size_t>(rows) * kv_width_));
  v_.assign(L, std::vector<float>(static_cast<size_t>(rows) * kv_width_));
  delta_.assign(L, std::vector<float>(static_cast<size_t>(rows) * hidden_));
  proxy_.assign(L, std::vector<float>(static_cast<size_t>(rows) * proxy_rank_));
  proxy_valid_.assign(L, 0);
  delta_valid_.assign(L, 0);
}

int64_t DlmState::bytes() const {
  int64_t n = 0;
  for (size_t l = 0; l < k_.size(); ++l) {
    n += static_cast<int64_t>(k_[l].size() + v_[l].size() + delta_[l].size() + proxy_[l].size());
  }
  return n * static_cast<int64_t>(sizeof(float));
}

void ForwardStats::Resize(int layers) {
  q_rows.resize(layers, 0);
  kv_rows.resize(layers, 0);
  live_rows.resize(layers, 0);
  drift_sum.resize(layers, 0.0);
  drift_count.resize(layers, 0);
  out_drift_sum.resize(layers, 0.0);
  out_drift_count.resize(layers, 0);
}

void ForwardStats::AddCounts(const ForwardStats& o) {
  Resize(static_cast<int>(std::max(q_rows.size(), o.q_rows.size())));
  for (size_t l = 0; l < o.q_rows.size(); ++l) {
    q_rows[l] += o.q_rows[l];
    kv_rows[l] += o.kv_rows[l];
    live_rows[l] += o.live_rows[l];
    drift_sum[l] += o.drift_sum[l];
    drift_count[l] += o.drift_count[l];
    out_drift_sum[l] += o.out_drift_sum[l];
    out_drift_count[l] += o.out_drift_count[l];
  }
  lm_rows += o.lm_rows;
  forwards += o.forwards;
}

void ForwardStats::AddTimes(const ForwardStats& o) {
  seconds_layer0 += o.seconds_layer0;
  seconds_kv += o.seconds_kv;
  seconds_select += o.seconds_select;
  seconds_rows += o.seconds_rows;
  seconds_lm += o.seconds_lm;
  seconds_attn += o.seconds_attn;
}

void ForwardStats::Add(const ForwardStats& o) {
  AddCounts(o);
  AddTimes(o);
}

absl::Status DlmModel::Supports(const ModelConfig& c, int mask_token_id) {
  if (c.is_causal) {
    return absl::InvalidArgumentError(
        "model: is_causal is true; diffusion decoding needs a bidirectional (masked-diffusion) "
        "model (config.json \"is_causal\": false or a LLaDA checkpoint)");
  }
  if (c.sliding_window > 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("model: sliding_window ", c.sliding_window, " is not supported for diffusion decoding"));
  }
  if (mask_token_id < 0 || mask_token_id >= c.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "mask_token_id: ", mask_token_id, " is not in [0, ", c.vocab_size,
        "); the config declares none (set mask_token_id in config.json or pass one)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<DlmModel>> DlmModel::Create(const DlmModelOptions& options) {
  if (options.num_threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_threads: must be >= 0, got ", options.num_threads));
  }
  if (options.proxy_rank < -1) {
    return absl::InvalidArgumentError(
        absl::StrCat("proxy_rank: must be >= -1, got ", options.proxy_rank));
  }
  auto m = std::unique_ptr<DlmModel>(new DlmModel());
  m->weights_ = options.weights;
  if (m->weights_ == nullptr) {
    if (options.model_dir.empty()) {
      return absl::InvalidArgumentError("model_dir: empty and no weights were given");
    }
    ASSIGN_OR_RETURN(bool llada, IsLladaCheckpoint(options.model_dir));
    if (llada) {
      ASSIGN_OR_RETURN(std::unique_ptr<ModelWeights> w, LoadLladaWeights(options.model_dir));
      m->weights_ = std::move(w);
    } else {
      ASSIGN_OR_RETURN(std::unique_ptr<ModelWeights> w, ModelWeights::Load(options.model_dir));
      m->weights_ = std::move(w);
    }
  }
  const ModelConfig& c = m->weights_->config;
  m->mask_id_ = options.mask_token_id >= 0 ? options.mask_token_id : c.mask_token_id;
  RETURN_IF_ERROR(Supports(c, m->mask_id_));
  if (!options.model_dir.empty() && options.weights == nullptr) {
    ASSIGN_OR_RETURN(m->tokenizer_, Tokenizer::LoadFromModelDir(options.model_dir, c.vocab_size));
  }
  m->eos_ids_ = c.eos_token_ids;
  if (m->eos_ids_.empty() && m->tokenizer_ != nullptr && m->tokenizer_->eos_id() >= 0) {
    m->eos_ids_ = {m->tokenizer_->eos_id()};
  }
  m->pool_ = std::make_unique<ThreadPool>(options.num_threads);
  m->inv_freq_ = RopeInvFrequencies(c);

  const int kv_width = c.num_key_value_heads * c.head_dim;
  const int max_rank = std::min(kv_width, c.hidden_size);
  int rank = options.proxy_rank;
  if (rank == 0) rank = std::min(std::max(16, kv_width / 32), max_rank);
  if (rank > max_rank) {
    return absl::InvalidArgumentError(absl::StrCat("proxy_rank: ", rank, " exceeds min(kv width ",
                                                   kv_width, ", hidden ", c.hidden_size, ")"));
  }
  m->proxy_rank_ = std::max(rank, 0);
  if (m->proxy_rank_ > 0) {
    const auto t0 = Clock::now();
    m->proxies_.reserve(c.num_hidden_layers);
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      ASSIGN_OR_RETURN(SingularProxy p,
                       ComputeSingularProxy(m->weights_->layers[l].wv.data(), kv_width,
                                            c.hidden_size, m->proxy_rank_, m->pool_.get(),
                                            options.svd));
      m->proxies_.push_back(std::move(p));
    }
    m->proxy_seconds_ = Since(t0);
  }
  LOG(INFO) << "dlm model ready: layers=" << c.num_hidden_layers << " hidden=" << c.hidden_size
            << " mask=" << m->mask_id_ << " proxy_rank=" << m->proxy_rank_
            << " proxy_build_s=" << m->proxy_seconds_ << " threads=" << m->pool_->num_threads();
  return m;
}

absl::StatusOr<std::unique_ptr<DlmCache>> DlmModel::NewCache(int rows) const {
  if (rows <= 0) return absl::InvalidArgumentError(absl::StrCat("rows: must be > 0, got ", rows));
  return std::make_unique<DlmState>(config(), rows, proxy_rank_);
}

absl::Status DlmModel::ForwardBatch(std::span<const DlmBatchItem> items,
                                    ForwardStats* batch_stats) const {
  RETURN_IF_ERROR(CheckBatchItems(items));
  for (const DlmBatchItem& it : items) {
    if (dynamic_cast<DlmState*>(it.cache) == nullptr) {
      return absl::InvalidArgumentError("items: a cache not made by this CPU model");
    }
  }
  std::vector<float> scratch;
  for (const DlmBatchItem& it : items) {
    auto* state = static_cast<DlmState*>(it.cache);
    std::vector<float>* logits = it.logits != nullptr ? it.logits : &scratch;
    ForwardStats st;
    RETURN_IF_ERROR(Forward(state, it.canvas, *it.spec, logits, &st));
    if (it.stats != nullptr) it.stats->AddCounts(st);
    if (batch_stats != nullptr) batch_stats->AddTimes(st);
    if (it.top1 != nullptr) {
      const int V = config().vocab_size;
      const size_t nl = it.spec->logit_rows.size();
      it.top1->resize(nl);
      it.top1_prob->resize(nl);
      for (size_t j = 0; j < nl; ++j) {
        Top1FromLogits(logits->data() + j * V, V, &(*it.top1)[j], &(*it.top1_prob)[j]);
      }
    }
  }
  return absl::OkStatus();
}

absl::Status DlmModel::Forward(DlmState* state, std::span<const int32_t> canvas,
                               const ForwardSpec& spec, std::vector<float>* logits,
                               ForwardStats* stats) const {
  const ModelConfig& c = config();
  const int NL = c.num_hidden_layers;
  const int D = c.hidden_size, H = c.num_attention_heads, KVH = c.num_key_value_heads;
  const int hd = c.head_dim, F = c.intermediate_size, V = c.vocab_size;
  const int KVW = KVH * hd, QW = H * hd, group = H / KVH;
  const int rows = state->rows();
  std::vector<int> logit_local;
  RETURN_IF_ERROR(ValidateForward(c, proxy_rank_, rows, canvas, spec,
                                  [state](int l) { return state->proxy_valid(l); },
                                  &logit_local));
  const std::span<const int32_t> live = spec.live;
  const int n = static_cast<int>(live.size());
  const bool selective = spec.select != RowSelect::kAll;
  ForwardStats local;
  local.Resize(NL);
  ForwardStats& st = stats != nullptr ? *stats : local;
  st.Resize(NL);
  st.forwards++;

  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int R = proxy_rank_;

  std::vector<float> x(static_cast<size_t>(n) * D), h(static_cast<size_t>(n) * D);
  std::vector<float> hsel, xsel, kbuf, vbuf, qbuf, attn, o, h2, gate, up, proxy_new, vfull;
  std::vector<float> cosv;
  std::vector<int> all(n);
  std::iota(all.begin(), all.end(), 0);
  std::vector<const float*> kptr(static_cast<size_t>(KVH) * rows), vptr(static_cast<size_t>(KVH) * rows);

  auto t_layer0 = Clock::now();
  for (int i = 0; i < n; ++i) {
    std::copy_n(weights_->embed.data() + static_cast<int64_t>(canvas[live[i]]) * D, D,
                x.data() + static_cast<size_t>(i) * D);
  }

  for (int layer = 0; layer < NL; ++layer) {
    const LayerWeights& L = weights_->layers[layer];
    auto t0 = Clock::now();
    cpu::RmsNorm(x.data(), n, D, L.attn_norm.data(), eps, h.data());

    // ---- Row selection.
    const bool sel_layer = selective && layer >= spec.first_selective_layer;
    std::vector<int> qrows = all;       // local indices recomputed
    const std::vector<int>* krows = &all;  // local indices whose K is recomputed
    const std::vector<int>* vrows = &all;  // local indices whose V is recomputed
    std::vector<int> selected;
    bool v_done = false;
    if (sel_layer && spec.select == RowSelect::kSpa) {
      const SingularProxy& P = proxies_[layer];
      proxy_new.resize(static_cast<size_t>(n) * R);
      cpu::MatMulNT(h.data(), n, D, P.proj.data(), R, nullptr, proxy_new.data(), pool_.get());
      cosv.resize(n);
      for (int i = 0; i < n; ++i) {
        float* cached = state->Proxy(layer, live[i]);
        cosv[i] = Cosine(proxy_new.data() + static_cast<size_t>(i) * R, cached, R);
        std::copy_n(proxy_new.data() + static_cast<size_t>(i) * R, R, cached);
      }
      selected = SmallestK(cosv, spec.update_rows[layer]);
      qrows = selected;
      if (!spec.kv_all_rows) krows = vrows = &selected;
    } else if (sel_layer && spec.select == RowSelect::kDllm) {
      vfull.resize(static_cast<size_t>(n) * KVW);
      cpu::MatMulNT(h.data(), n, D, L.wv.data(), KVW, L.bv.empty() ? nullptr : L.bv.data(),
                    vfull.data(), pool_.get());
      cosv.resize(n);
      for (int i = 0; i < n; ++i) {
        float* cached = state->V(layer, live[i]);
        cosv[i] = Cosine(vfull.data() + static_cast<size_t>(i) * KVW, cached, KVW);
        std::copy_n(vfull.data() + static_cast<size_t>(i) * KVW, KVW, cached);
      }
      selected = SmallestK(cosv, spec.update_rows[layer]);
      qrows = selected;
      krows = &selected;
      v_done = true;
    }
    if (!sel_layer && spec.store_proxy && layer >= 1) {
      const SingularProxy& P = proxies_[layer];
      std::vector<int> prow;
      for (int i = 0; i < n; ++i) {
        if (live[i] >= spec.proxy_begin && live[i] < spec.proxy_end) prow.push_back(i);
      }
      Gather(h.data(), D, prow, &hsel);
      proxy_new.resize(prow.size() * static_cast<size_t>(R));
      if (!prow.empty()) {
        cpu::MatMulNT(hsel.data(), static_cast<int64_t>(prow.size()), D, P.proj.data(), R, nullptr,
                      proxy_new.data(), pool_.get());
      }
      const bool had = state->proxy_valid(layer);
      for (size_t j = 0; j < prow.size(); ++j) {
        float* cached = state->Proxy(layer, live[prow[j]]);
        if (had) {
          st.drift_sum[layer] += 1.0 - Cosine(proxy_new.data() + j * R, cached, R);
          st.drift_count[layer]++;
        }
        std::copy_n(proxy_new.data() + j * R, R, cached);
      }
      state->set_proxy_valid(layer);
    }
    const double t_select = layer >= 1 ? Since(t0) : 0.0;
    auto t1 = Clock::now();

    // ---- K, V of the recomputed rows → state (K rotated at the row's canvas position).
    auto project = [&](const std::vector<int>& sel, const std::vector<float>& w,
                       const std::vector<float>& bias, bool rope, bool is_k) {
      if (sel.empty()) return;
      const float* src = h.data();
      if (&sel != &all) {
        Gather(h.data(), D, sel, &hsel);
        src = hsel.data();
      }
      std::vector<float>& buf = is_k ? kbuf : vbuf;
      buf.resize(sel.size() * static_cast<size_t>(KVW));
      cpu::MatMulNT(src, static_cast<int64_t>(sel.size()), D, w.data(), KVW,
                    bias.empty() ? nullptr : bias.data(), buf.data(), pool_.get());
      for (size_t j = 0; j < sel.size(); ++j) {
        const int row = live[sel[j]];
        float* dst = is_k ? state->K(layer, row) : state->V(layer, row);
        float* s = buf.data() + j * KVW;
        if (rope) ApplyRope(s, KVH, hd, row, inv_freq_);
        std::copy_n(s, KVW, dst);
      }
    };
    project(*krows, L.wk, L.bk, /*rope=*/true, /*is_k=*/true);
    if (!v_done) project(*vrows, L.wv, L.bv, /*rope=*/false, /*is_k=*/false);
    st.kv_rows[layer] += static_cast<int64_t>(krows->size());
    st.live_rows[layer] += n;
    const double t_kv = Since(t1);
    auto t2 = Clock::now();

    // ---- Q, attention over every canvas row, o_proj, MLP for the recomputed rows → δ.
    const int nq = static_cast<int>(qrows.size());
    st.q_rows[layer] += nq;
    if (nq > 0) {
      const bool dense = nq == n;
      const float* hq = h.data();
      if (!dense) {
        Gather(h.data(), D, qrows, &hsel);
        hq = hsel.data();
      }
      qbuf.resize(static_cast<size_t>(nq) * QW);
      cpu::MatMulNT(hq, nq, D, L.wq.data(), QW, L.bq.empty() ? nullptr : L.bq.data(), qbuf.data(),
                    pool_.get());
      for (int j = 0; j < nq; ++j) {
        ApplyRope(qbuf.data() + static_cast<size_t>(j) * QW, H, hd, live[qrows[j]], inv_freq_);
      }
      for (int kh = 0; kh < KVH; ++kh) {
        for (int t = 0; t < rows; ++t) {
          kptr[static_cast<size_t>(kh) * rows + t] = state->K(layer, t) + kh * hd;
          vptr[static_cast<size_t>(kh) * rows + t] = state->V(layer, t) + kh * hd;
        }
      }
      attn.resize(static_cast<size_t>(nq) * QW);
      const auto t_attn = Clock::now();
      pool_->ParallelFor(static_cast<int64_t>(nq) * H, 4, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(rows);
        for (int64_t job = begin; job < end; ++job) {
          const int j = static_cast<int>(job / H), head = static_cast<int>(job % H);
          const int kh = head / group;
          cpu::AttendOne(qbuf.data() + (static_cast<size_t>(j) * H + head) * hd,
                         kptr.data() + static_cast<size_t>(kh) * rows,
                         vptr.data() + static_cast<size_t>(kh) * rows, rows, hd, scale,
                         scores.data(), attn.data() + (static_cast<size_t>(j) * H + head) * hd);
        }
      });
      if (layer >= 1) st.seconds_attn += Since(t_attn);
      o.resize(static_cast<size_t>(nq) * D);
      cpu::MatMulNT(attn.data(), nq, QW, L.wo.data(), D, L.bo.empty() ? nullptr : L.bo.data(),
                    o.data(), pool_.get());
      // xm = x + a (rows of Q), MLP on RMSNorm(xm).
      xsel.resize(static_cast<size_t>(nq) * D);
      for (int j = 0; j < nq; ++j) {
        const float* xr = x.data() + static_cast<size_t>(qrows[j]) * D;
        const float* orow = o.data() + static_cast<size_t>(j) * D;
        float* dst = xsel.data() + static_cast<size_t>(j) * D;
        for (int d = 0; d < D; ++d) dst[d] = xr[d] + orow[d];
      }
      h2.resize(static_cast<size_t>(nq) * D);
      cpu::RmsNorm(xsel.data(), nq, D, L.mlp_norm.data(), eps, h2.data());
      gate.resize(static_cast<size_t>(nq) * F);
      up.resize(static_cast<size_t>(nq) * F);
      cpu::MatMulNT(h2.data(), nq, D, L.w_gate.data(), F, nullptr, gate.data(), pool_.get());
      cpu::MatMulNT(h2.data(), nq, D, L.w_up.data(), F, nullptr, up.data(), pool_.get());
      cpu::SiluMul(gate.data(), up.data(), static_cast<int64_t>(nq) * F, gate.data());
      cpu::MatMulNT(gate.data(), nq, F, L.w_down.data(), D, nullptr, h2.data(), pool_.get());
      const bool measure = spec.store_proxy && !sel_layer && state->delta_valid(layer);
      for (int j = 0; j < nq; ++j) {
        const int row = live[qrows[j]];
        float* delta = state->Delta(layer, row);
        const float* a = o.data() + static_cast<size_t>(j) * D;
        const float* f = h2.data() + static_cast<size_t>(j) * D;
        if (measure && row >= spec.proxy_begin && row < spec.proxy_end) {
          const float* xr = x.data() + static_cast<size_t>(qrows[j]) * D;
          double diff = 0, norm = 0;
          for (int d = 0; d < D; ++d) {
            const double nd = static_cast<double>(a[d]) + f[d];
            diff += (nd - delta[d]) * (nd - delta[d]);
            norm += (xr[d] + nd) * (xr[d] + nd);
          }
          st.out_drift_sum[layer] += std::sqrt(diff) / std::max(std::sqrt(norm), 1e-12);
          st.out_drift_count[layer]++;
        }
        for (int d = 0; d < D; ++d) delta[d] = a[d] + f[d];
      }
      if (spec.store_proxy && !sel_layer) state->set_delta_valid(layer);
    }
    // ---- Residual for every live row (fresh δ for Q rows, cached δ for the others).
    for (int i = 0; i < n; ++i) {
      cpu::AddInPlace(x.data() + static_cast<size_t>(i) * D, state->Delta(layer, live[i]), D);
    }
    if (layer == 0) {
      st.seconds_layer0 += Since(t_layer0);
    } else {
      st.seconds_select += t_select;
      st.seconds_kv += t_kv;
      st.seconds_rows += Since(t2);
    }
  }

  // ---- Final norm + LM head on the requested rows.
  auto t3 = Clock::now();
  const int nl = static_cast<int>(logit_local.size());
  logits->assign(static_cast<size_t>(nl) * V, 0.0f);
  if (nl > 0) {
    std::vector<float> normed(static_cast<size_t>(nl) * D);
    for (int j = 0; j < nl; ++j) {
      cpu::RmsNorm(x.data() + static_cast<size_t>(logit_local[j]) * D, 1, D,
                   weights_->final_norm.data(), eps, normed.data() + static_cast<size_t>(j) * D);
    }
    cpu::MatMulNT(normed.data(), nl, D, weights_->lm_head_data(), V, nullptr, logits->data(),
                  pool_.get());
  }
  st.lm_rows += nl;
  st.seconds_lm += Since(t3);
  return absl::OkStatus();
}

}  // namespace prehoc::dlm
