#include "worker/dlm/cuda_forward.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/logging.h"
#include "common/status.h"
#include "worker/kernels/dlm_ops.h"
#include "worker/kernels/model_ops.h"
#include "worker/kernels/skinny_gemm.h"
#include "worker/rope.h"

namespace prehoc::dlm {
namespace {

namespace k = ::prehoc::kernels;

absl::Status CudaErr(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    return absl::ResourceExhaustedError(absl::StrCat(what, ": out of device memory (", free_b,
                                                     " bytes free of ", total_b, ")"));
  }
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}
#define DLM_CUDA(expr) RETURN_IF_ERROR(CudaErr((expr), #expr))

absl::Status CublasErr(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cublasGetStatusName(s)));
}
#define DLM_CUBLAS(expr) RETURN_IF_ERROR(CublasErr((expr), #expr))

// A device allocation that grows on demand (contents not preserved).
struct Grow {
  void* ptr = nullptr;
  size_t bytes = 0;
  ~Grow() {
    if (ptr != nullptr) cudaFree(ptr);
  }
  absl::Status Reserve(size_t need, const char* what) {
    if (need <= bytes) return absl::OkStatus();
    if (ptr != nullptr) cudaFree(ptr);
    ptr = nullptr;
    bytes = 0;
    RETURN_IF_ERROR(CudaErr(cudaMalloc(&ptr, need), what));
    bytes = need;
    return absl::OkStatus();
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

// Byte offsets of sub-arrays in one host/device staging block (256-byte aligned).
struct Layout {
  size_t bytes = 0;
  size_t Add(size_t n) {
    const size_t off = (bytes + 255) / 256 * 256;
    bytes = off + n;
    return off;
  }
};

std::vector<uint16_t> ToBf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = FloatToBf16(v[i]);
  return out;
}

}  // namespace

class CudaDlmCache : public DlmCache {
 public:
  CudaDlmCache(int rows, int layers) : rows_(rows), proxy_valid_(layers, 0) {}
  ~CudaDlmCache() override {
    if (mem_ != nullptr) cudaFree(mem_);
  }
  int rows() const override { return rows_; }
  bool proxy_valid(int layer) const override { return proxy_valid_[layer]; }
  void set_proxy_valid(int layer) { proxy_valid_[layer] = 1; }

  int rows_;
  std::vector<char> proxy_valid_;
  void* mem_ = nullptr;
  k::DlmCacheView view;  // device pointers into mem_
};

struct CudaDlmModel::Impl {
  ModelConfig c;
  int device = 0;
  int R = 0;  // proxy rank
  bool profile = false;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  // Small-M GEMM tuning (CudaDlmOptions::gemm_tune): per (m, n, k, accumulate) the fastest of
  // cublasGemmEx's default and cuBLASLt's heuristic candidates (split-K among them), timed once.
  bool gemm_tune = false;
  cublasLtHandle_t lt = nullptr;
  void* lt_ws = nullptr;
  static constexpr size_t kLtWorkspace = 32u << 20;
  static constexpr int kTuneMaxM = 1024;
  static constexpr size_t kTuneMaxOut = 128u << 20;  // bytes of the timing output
  struct Tuned {
    bool use_lt = false;
    cublasLtMatmulAlgo_t algo{};
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
    double default_us = 0, best_us = 0;
  };
  std::map<std::tuple<int, int, int, bool>, Tuned> tuned;
  Grow tune_out;
  // CudaDlmOptions::profile_kernels.
  bool profile_kernels = false;
  std::vector<cudaEvent_t> tick_events;
  std::vector<const char*> tick_names;
  std::vector<std::pair<std::string, double>> kernel_ms;  // class → ms, first-seen order
  int64_t kernel_forwards = 0;
  cudaEvent_t tune_ev[2] = {nullptr, nullptr};
  // CudaDlmOptions::skinny_gemm (sm_90 only).
  bool skinny = false;
  int num_sms = 0;
  bool fused = true;  // CudaDlmOptions::fused_row_ops
  bool fused_attn = true;  // CudaDlmOptions::fused_attention
  int fused_attn_max_rows = 0;  // CudaDlmOptions::fused_attention_max_rows
  // CudaDlmOptions::cuda_graphs: executable graphs by step key, and how often each key was seen
  // (captured at the second sighting).
  bool graphs = false;
  static constexpr size_t kMaxGraphs = 64;
  std::map<std::vector<int64_t>, cudaGraphExec_t> graph_exec;
  std::map<std::vector<int64_t>, int> graph_seen;
  int64_t graph_replays = 0, graph_captures = 0, graph_eager = 0;
  void* cublas_ws = nullptr;
  static constexpr size_t kCublasWorkspace = 32u << 20;

  struct Layer {
    uint16_t *wqkv = nullptr, *wo = nullptr, *w_gu = nullptr, *w_down = nullptr, *proxy = nullptr;
    float *bq = nullptr, *bk = nullptr, *bv = nullptr, *bo = nullptr;
    float *attn_norm = nullptr, *mlp_norm = nullptr;
  };
  std::vector<void*> allocations;
  std::vector<Layer> layers;
  uint16_t *embed = nullptr, *lm_head = nullptr;
  float *final_norm = nullptr, *inv_freq = nullptr;
  int64_t weight_bytes = 0;

  // Workspaces.
  Grow x, h, hs, small, cosv, sel, inv, kv, qf, qb, ob, a, h2, gu, act, s, p, logits, top1, prob;
  Grow attn_work;  // fused attention: the key splits' partial results
  Grow meta;
  std::vector<char> host_meta;
  char* pinned = nullptr;
  size_t pinned_bytes = 0;
  std::vector<cudaEvent_t> events;

  ~Impl() {
    if (stream != nullptr) cudaStreamSynchronize(stream);
    DropGraphs();
    for (auto& [key, t] : tuned) {
      if (t.op != nullptr) cublasLtMatmulDescDestroy(t.op);
      for (cublasLtMatrixLayout_t l : {t.la, t.lb, t.lc}) {
        if (l != nullptr) cublasLtMatrixLayoutDestroy(l);
      }
    }
    for (cudaEvent_t e : tick_events) cudaEventDestroy(e);
    for (cudaEvent_t e : tune_ev) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    if (lt != nullptr) cublasLtDestroy(lt);
    for (cudaEvent_t e : events) cudaEventDestroy(e);
    if (pinned != nullptr) cudaFreeHost(pinned);
    for (void* ptr : allocations) cudaFree(ptr);
    if (cublas != nullptr) cublasDestroy(cublas);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  int D() const { return c.hidden_size; }
  int Hq() const { return c.num_attention_heads; }
  int Hkv() const { return c.num_key_value_heads; }
  int hd() const { return c.head_dim; }
  int KVW() const { return Hkv() * hd(); }
  int QW() const { return Hq() * hd(); }
  int F() const { return c.intermediate_size; }

  template <typename T>
  absl::StatusOr<T*> Alloc(size_t elems, bool is_weight) {
    void* ptr = nullptr;
    DLM_CUDA(cudaMalloc(&ptr, elems * sizeof(T)));
    allocations.push_back(ptr);
    if (is_weight) weight_bytes += static_cast<int64_t>(elems * sizeof(T));
    return static_cast<T*>(ptr);
  }
  absl::StatusOr<uint16_t*> UploadBf16(const std::vector<float>& host) {
    ASSIGN_OR_RETURN(uint16_t * d, Alloc<uint16_t>(host.size(), true));
    std::vector<uint16_t> b = ToBf16(host);
    DLM_CUDA(cudaMemcpy(d, b.data(), b.size() * 2, cudaMemcpyHostToDevice));
    return d;
  }
  absl::StatusOr<float*> UploadF32(const std::vector<float>& host) {
    if (host.empty()) return static_cast<float*>(nullptr);
    ASSIGN_OR_RETURN(float* d, Alloc<float>(host.size(), false));
    DLM_CUDA(cudaMemcpy(d, host.data(), host.size() * 4, cudaMemcpyHostToDevice));
    return d;
  }
  absl::StatusOr<uint16_t*> RandomBf16(size_t n, float amp, uint64_t seed) {
    ASSIGN_OR_RETURN(uint16_t * d, Alloc<uint16_t>(n, true));
    DLM_CUDA(k::FillUniformBf16(d, n, amp, seed, stream));
    return d;
  }
  absl::StatusOr<float*> Ones(size_t n) {
    ASSIGN_OR_RETURN(float* d, Alloc<float>(n, false));
    DLM_CUDA(k::FillF32(d, n, 1.0f, stream));
    return d;
  }

  void DropGraphs() {
    for (auto& [key, e] : graph_exec) cudaGraphExecDestroy(e);
    graph_exec.clear();
  }

  // Y[m][n] (f32, row-major) = X[m][kk] (bf16) · W[n][kk]ᵀ (bf16) + beta · Y.
  absl::Status Gemm(const uint16_t* X, int m, int kk, const uint16_t* W, int n, float* Y,
                    float beta = 0.0f) {
    if (m == 0) return absl::OkStatus();
    if (skinny && !gemm_tune) {
      k::SkinnyGemmParams sp;
      sp.d_x = X;
      sp.m = m;
      sp.k = kk;
      sp.ldx = kk;
      sp.d_w = W;
      sp.n = n;
      sp.ldw = kk;
      sp.d_y = Y;
      sp.ldy = n;
      sp.beta = beta;
      sp.splits = k::SkinnyGemmSplits(n, kk, num_sms);
      if (k::SkinnyGemmSupported(sp)) {
        DLM_CUDA(k::SkinnyGemmBf16(sp, stream));
        return absl::OkStatus();
      }
    }
    if (gemm_tune && m <= kTuneMaxM && static_cast<size_t>(m) * n * 4 <= kTuneMaxOut) {
      const auto key = std::make_tuple(m, n, kk, beta != 0.0f);
      auto it = tuned.find(key);
      if (it == tuned.end()) {
        it = tuned.emplace(key, Tuned()).first;
        RETURN_IF_ERROR(Tune(X, m, kk, W, n, beta, &it->second));
      }
      if (it->second.use_lt) return LtGemm(it->second, &it->second.algo, X, W, Y, beta);
    }
    return DefaultGemm(X, m, kk, W, n, Y, beta);
  }
  absl::Status DefaultGemm(const uint16_t* X, int m, int kk, const uint16_t* W, int n, float* Y,
                           float beta) {
    const float alpha = 1.0f;
    DLM_CUBLAS(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, kk, &alpha, W, CUDA_R_16BF,
                            kk, X, CUDA_R_16BF, kk, &beta, Y, CUDA_R_32F, n, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
    return absl::OkStatus();
  }
  absl::Status LtGemm(const Tuned& t, const cublasLtMatmulAlgo_t* algo, const uint16_t* X,
                      const uint16_t* W, float* Y, float beta) {
    const float alpha = 1.0f;
    DLM_CUBLAS(cublasLtMatmul(lt, t.op, &alpha, W, t.la, X, t.lb, &beta, Y, t.lc, Y, t.lc, algo,
                              lt_ws, kLtWorkspace, stream));
    return absl::OkStatus();
  }
  // Times cublasGemmEx's default and up to 8 cuBLASLt heuristic algorithms on this shape (into a
  // scratch output: 2 warm-up + 5 timed calls each) and keeps the fastest in *t; an Lt algorithm
  // must beat the default by 3 % to be used.
  absl::Status Tune(const uint16_t* X, int m, int kk, const uint16_t* W, int n, float beta,
                    Tuned* t) {
    RETURN_IF_ERROR(tune_out.Reserve(static_cast<size_t>(m) * n * 4, "gemm tuning output"));
    float* Yt = tune_out.as<float>();
    if (tune_ev[0] == nullptr) {
      DLM_CUDA(cudaEventCreate(&tune_ev[0]));
      DLM_CUDA(cudaEventCreate(&tune_ev[1]));
    }
    auto time_us = [&](auto&& call) -> absl::StatusOr<double> {
      for (int i = 0; i < 2; ++i) RETURN_IF_ERROR(call());
      DLM_CUDA(cudaEventRecord(tune_ev[0], stream));
      for (int i = 0; i < 5; ++i) RETURN_IF_ERROR(call());
      DLM_CUDA(cudaEventRecord(tune_ev[1], stream));
      DLM_CUDA(cudaEventSynchronize(tune_ev[1]));
      float ms = 0;
      DLM_CUDA(cudaEventElapsedTime(&ms, tune_ev[0], tune_ev[1]));
      return ms * 1e3 / 5;
    };
    DLM_CUDA(cudaMemsetAsync(Yt, 0, static_cast<size_t>(m) * n * 4, stream));
    ASSIGN_OR_RETURN(t->default_us,
                     time_us([&] { return DefaultGemm(X, m, kk, W, n, Yt, beta); }));
    t->best_us = t->default_us;
    DLM_CUBLAS(cublasLtMatmulDescCreate(&t->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    DLM_CUBLAS(cublasLtMatmulDescSetAttribute(t->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    DLM_CUBLAS(cublasLtMatmulDescSetAttribute(t->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    DLM_CUBLAS(cublasLtMatrixLayoutCreate(&t->la, CUDA_R_16BF, kk, n, kk));
    DLM_CUBLAS(cublasLtMatrixLayoutCreate(&t->lb, CUDA_R_16BF, kk, m, kk));
    DLM_CUBLAS(cublasLtMatrixLayoutCreate(&t->lc, CUDA_R_32F, n, m, n));
    cublasLtMatmulPreference_t pref = nullptr;
    DLM_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
    const size_t ws = kLtWorkspace;
    cublasLtMatmulHeuristicResult_t res[8];
    int found = 0;
    cublasStatus_t hs = cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    if (hs == CUBLAS_STATUS_SUCCESS) {
      hs = cublasLtMatmulAlgoGetHeuristic(lt, t->op, t->la, t->lb, t->lc, t->lc, pref, 8, res,
                                          &found);
    }
    cublasLtMatmulPreferenceDestroy(pref);
    if (hs != CUBLAS_STATUS_SUCCESS) found = 0;  // no Lt candidate: keep the default
    for (int i = 0; i < found; ++i) {
      if (res[i].state != CUBLAS_STATUS_SUCCESS || res[i].workspaceSize > ws) continue;
      absl::StatusOr<double> us =
          time_us([&] { return LtGemm(*t, &res[i].algo, X, W, Yt, beta); });
      if (!us.ok()) {  // an algorithm the device refuses at run time: skip it
        cudaGetLastError();
        continue;
      }
      if (*us < t->best_us && *us < 0.97 * t->default_us) {
        t->best_us = *us;
        t->algo = res[i].algo;
        t->use_lt = true;
      }
    }
    return absl::OkStatus();
  }
  // Tuned shapes so far: count, how many use cuBLASLt, Σ default µs, Σ chosen µs.
  std::string TuningSummary() const {
    int lt_count = 0;
    double d = 0, b = 0;
    for (const auto& [key, t] : tuned) {
      lt_count += t.use_lt;
      d += t.default_us;
      b += t.best_us;
    }
    return absl::StrCat(tuned.size(), " shapes tuned, ", lt_count, " use cuBLASLt; sum of one "
                        "call each: default ", static_cast<int64_t>(d), " us, chosen ",
                        static_cast<int64_t>(b), " us");
  }

  absl::Status Forward(std::span<const DlmBatchItem> items, ForwardStats* batch_stats);
};

namespace {

// What every item of one homogeneous forward shares.
bool SameKind(const ForwardSpec& a, const ForwardSpec& b) {
  return a.select == b.select && a.first_selective_layer == b.first_selective_layer &&
         a.kv_all_rows == b.kv_all_rows && a.store_proxy == b.store_proxy;
}

}  // namespace

absl::Status CudaDlmModel::Impl::Forward(std::span<const DlmBatchItem> items,
                                         ForwardStats* batch_stats) {
  const int B = static_cast<int>(items.size());
  const int NL = c.num_hidden_layers, V = c.vocab_size;
  const int Dm = D(), KV = KVW(), Q = QW(), G = Hq() / Hkv();
  const ForwardSpec& spec0 = *items[0].spec;
  const bool selective = spec0.select != RowSelect::kAll;
  const bool spa = spec0.select == RowSelect::kSpa;
  const float eps = static_cast<float>(c.rms_norm_eps);

  // ---- Host metadata.
  std::vector<int> off(B + 1, 0), nlog(B), loff(B + 1, 0);
  std::vector<std::vector<int>> logit_local(B);
  for (int b = 0; b < B; ++b) {
    const DlmBatchItem& it = items[b];
    auto* cache = static_cast<CudaDlmCache*>(it.cache);
    RETURN_IF_ERROR(ValidateForward(c, R, cache->rows(), it.canvas, *it.spec,
                                    [cache](int l) { return cache->proxy_valid(l); },
                                    &logit_local[b]));
    const int nb = static_cast<int>(it.spec->live.size());
    if (selective && nb > k::kDlmSelectMaxRows) {
      return absl::InvalidArgumentError(absl::StrCat("live: ", nb, " rows in a selective step; the "
                                                     "CUDA backend selects among at most ",
                                                     k::kDlmSelectMaxRows));
    }
    off[b + 1] = off[b] + nb;
    nlog[b] = static_cast<int>(logit_local[b].size());
    loff[b + 1] = loff[b] + nlog[b];
  }
  const int n = off[B], nl = loff[B];
  // Rows recomputed per layer and request (known on the host: the selection only picks which).
  std::vector<std::vector<int>> mq(NL, std::vector<int>(B));
  std::vector<int> mtot(NL, 0);
  for (int l = 0; l < NL; ++l) {
    const bool sel_layer = selective && l >= spec0.first_selective_layer;
    for (int b = 0; b < B; ++b) {
      const int nb = off[b + 1] - off[b];
      mq[l][b] = sel_layer ? std::clamp(items[b].spec->update_rows[l], 0, nb) : nb;
      mtot[l] += mq[l][b];
    }
  }
  // Attention groups per layer: requests with the same (canvas rows, |Q|), in request order.
  struct Group {
    int N = 0, m = 0, count = 0;  // count = requests · Hq
    int splits = 0;               // > 0: fused attention with this many key splits
    std::vector<int> reqs;
    size_t ptr_off = 0;           // index of its first pointer in the pointer block
    size_t s_off = 0;             // element offset of its scores
  };
  std::vector<std::vector<Group>> groups(NL);
  std::vector<std::vector<int>> qoff(NL, std::vector<int>(B + 1, 0));
  size_t s_max = 0, n_ptrs = 0, work_max = 0;
  const bool attn_fusable = fused_attn && (hd() == 64 || hd() == 128);
  for (int l = 0; l < NL; ++l) {
    for (int b = 0; b < B; ++b) qoff[l][b + 1] = qoff[l][b] + mq[l][b];
    std::map<std::pair<int, int>, std::vector<int>> by_shape;
    for (int b = 0; b < B; ++b) {
      if (mq[l][b] > 0) by_shape[{items[b].cache->rows(), mq[l][b]}].push_back(b);
    }
    size_t s_used = 0;
    for (auto& [shape, reqs] : by_shape) {
      Group g;
      g.N = shape.first;
      g.m = shape.second;
      g.count = static_cast<int>(reqs.size()) * Hq();
      g.reqs = std::move(reqs);
      g.ptr_off = n_ptrs;
      g.s_off = s_used;
      n_ptrs += 6 * static_cast<size_t>(g.count);
      if (attn_fusable && (fused_attn_max_rows <= 0 || g.m <= fused_attn_max_rows)) {
        g.splits = k::DlmAttentionSplits(g.count, g.m, g.N, num_sms);
        work_max = std::max(work_max, k::DlmAttentionWorkFloats(g.count, g.m, hd(), g.splits));
      } else {
        s_used += static_cast<size_t>(g.count) * g.m * g.N;
      }
      groups[l].push_back(std::move(g));
    }
    s_max = std::max(s_max, s_used);
  }

  // ---- Workspaces (grown on demand).
  const int mmax = *std::max_element(mtot.begin(), mtot.end());
  const size_t nn = std::max(n, 1), mm = std::max(mmax, 1);
  RETURN_IF_ERROR(x.Reserve(nn * Dm * 4, "x"));
  RETURN_IF_ERROR(h.Reserve(nn * Dm * 2, "h"));
  RETURN_IF_ERROR(hs.Reserve(mm * Dm * 2, "hs"));
  RETURN_IF_ERROR(small.Reserve(nn * std::max(R, KV) * 4, "proxy/value"));
  RETURN_IF_ERROR(cosv.Reserve(nn * 4, "cos"));
  RETURN_IF_ERROR(sel.Reserve(nn * 4, "sel"));
  RETURN_IF_ERROR(inv.Reserve(nn * 4, "inv"));
  RETURN_IF_ERROR(kv.Reserve(nn * (Q + 2 * KV) * 4, "qkv"));
  RETURN_IF_ERROR(qf.Reserve(mm * Q * 4, "q"));
  RETURN_IF_ERROR(qb.Reserve(mm * Q * 2, "q bf16"));
  RETURN_IF_ERROR(ob.Reserve(mm * Q * 2, "attention out"));
  RETURN_IF_ERROR(a.Reserve(mm * Dm * 4, "a"));
  RETURN_IF_ERROR(h2.Reserve(mm * Dm * 2, "h2"));
  RETURN_IF_ERROR(gu.Reserve(mm * 2 * F() * 4, "gate/up"));
  RETURN_IF_ERROR(act.Reserve(mm * F() * 2, "act"));
  RETURN_IF_ERROR(s.Reserve(std::max<size_t>(s_max, 1) * 4, "scores"));
  RETURN_IF_ERROR(p.Reserve(std::max<size_t>(s_max, 1) * 2, "probabilities"));
  RETURN_IF_ERROR(attn_work.Reserve(std::max<size_t>(work_max, 1) * 4, "attention partials"));
  RETURN_IF_ERROR(logits.Reserve(std::max<size_t>(nl, 1) * V * 4, "logits"));
  RETURN_IF_ERROR(top1.Reserve(std::max<size_t>(nl, 1) * 4, "top1"));
  RETURN_IF_ERROR(prob.Reserve(std::max<size_t>(nl, 1) * 4, "prob"));

  // Per group, six pointer arrays of `count` entries for the batched attention GEMMs:
  // K, Q, S (scores) | V, P, O, entry j = (request reqs[j / Hq], query head j % Hq).
  std::vector<const void*> ptrs(n_ptrs);
  for (int l = 0; l < NL; ++l) {
    for (const Group& g : groups[l]) {
      int j = 0;
      for (int b : g.reqs) {
        const k::DlmCacheView& v = static_cast<CudaDlmCache*>(items[b].cache)->view;
        for (int hq = 0; hq < Hq(); ++hq, ++j) {
          const size_t kvo = (static_cast<size_t>(l) * Hkv() + hq / G) * g.N * hd();
          const size_t sidx = g.s_off + static_cast<size_t>(j) * g.m * g.N;
          const size_t qo = static_cast<size_t>(qoff[l][b]) * Q + hq * hd();
          const void** P6 = ptrs.data() + g.ptr_off;
          P6[j] = v.k + kvo;
          P6[g.count + j] = qb.as<uint16_t>() + qo;
          P6[2 * g.count + j] = s.as<float>() + sidx;
          P6[3 * g.count + j] = v.v + kvo;
          P6[4 * g.count + j] = p.as<uint16_t>() + sidx;
          P6[5 * g.count + j] = ob.as<uint16_t>() + qo;
        }
      }
    }
  }

  Layout lay;
  const size_t o_tok = lay.Add(nn * 4), o_row = lay.Add(nn * 4), o_req = lay.Add(nn * 4);
  const size_t o_views = lay.Add(B * sizeof(k::DlmCacheView));
  const size_t o_seg_begin = lay.Add(B * 4), o_seg_len = lay.Add(B * 4);
  const size_t o_k = lay.Add(static_cast<size_t>(NL) * B * 4);
  const size_t o_koff = lay.Add(static_cast<size_t>(NL) * B * 4);
  const size_t o_ptrs = lay.Add(std::max<size_t>(ptrs.size(), 1) * sizeof(void*));
  // Last: everything before it is at an offset independent of the logit rows (a captured graph
  // of the layers does not depend on them; see cuda_graphs).
  const size_t o_logit = lay.Add(std::max(nl, 1) * 4);
  host_meta.assign(lay.bytes, 0);
  auto hp = [&](size_t o) { return host_meta.data() + o; };
  {
    auto* tok = reinterpret_cast<int32_t*>(hp(o_tok));
    auto* row = reinterpret_cast<int32_t*>(hp(o_row));
    auto* req = reinterpret_cast<int32_t*>(hp(o_req));
    auto* views = reinterpret_cast<k::DlmCacheView*>(hp(o_views));
    auto* sb = reinterpret_cast<int32_t*>(hp(o_seg_begin));
    auto* sl = reinterpret_cast<int32_t*>(hp(o_seg_len));
    auto* kk = reinterpret_cast<int32_t*>(hp(o_k));
    auto* ko = reinterpret_cast<int32_t*>(hp(o_koff));
    auto* lr = reinterpret_cast<int32_t*>(hp(o_logit));
    for (int b = 0; b < B; ++b) {
      const ForwardSpec& sp = *items[b].spec;
      for (int i = 0; i < off[b + 1] - off[b]; ++i) {
        const int r = sp.live[i];
        tok[off[b] + i] = items[b].canvas[r];
        row[off[b] + i] = r;
        req[off[b] + i] = b;
      }
      views[b] = static_cast<CudaDlmCache*>(items[b].cache)->view;
      views[b].proxy_lo = sp.proxy_begin;
      views[b].proxy_hi = sp.proxy_end;
      sb[b] = off[b];
      sl[b] = off[b + 1] - off[b];
      for (int j = 0; j < nlog[b]; ++j) lr[loff[b] + j] = off[b] + logit_local[b][j];
    }
    for (int l = 0; l < NL; ++l) {
      int run = 0;
      for (int b = 0; b < B; ++b) {
        kk[l * B + b] = mq[l][b];
        ko[l * B + b] = run;
        run += mq[l][b];
      }
    }
    std::memcpy(hp(o_ptrs), ptrs.data(), ptrs.size() * sizeof(void*));
  }
  if (pinned_bytes < lay.bytes) {
    if (pinned != nullptr) cudaFreeHost(pinned);
    pinned = nullptr;
    pinned_bytes = 0;
    DLM_CUDA(cudaMallocHost(reinterpret_cast<void**>(&pinned), lay.bytes));
    pinned_bytes = lay.bytes;
  }
  std::memcpy(pinned, host_meta.data(), lay.bytes);
  RETURN_IF_ERROR(meta.Reserve(lay.bytes, "metadata"));
  DLM_CUDA(cudaMemcpyAsync(meta.ptr, pinned, lay.bytes, cudaMemcpyHostToDevice, stream));
  auto dp = [&](size_t o) { return static_cast<char*>(meta.ptr) + o; };
  const auto* d_tok = reinterpret_cast<const int32_t*>(dp(o_tok));
  const auto* d_row = reinterpret_cast<const int32_t*>(dp(o_row));
  const auto* d_req = reinterpret_cast<const int32_t*>(dp(o_req));
  const auto* d_views = reinterpret_cast<const k::DlmCacheView*>(dp(o_views));
  const auto* d_sb = reinterpret_cast<const int32_t*>(dp(o_seg_begin));
  const auto* d_sl = reinterpret_cast<const int32_t*>(dp(o_seg_len));
  const auto* d_k = reinterpret_cast<const int32_t*>(dp(o_k));
  const auto* d_koff = reinterpret_cast<const int32_t*>(dp(o_koff));
  const auto* d_logit = reinterpret_cast<const int32_t*>(dp(o_logit));
  const auto* d_ptrs = reinterpret_cast<const void* const*>(dp(o_ptrs));

  // ---- Phase events: [0] start; per layer l, ev(l, k): k = 0 after the selection, 1 after K/V,
  // 2 / 3 around the attention, 4 at the end of the layer; ev(NL, 0) after the LM head.
  auto ev = [](int l, int kk) { return 1 + 5 * l + kk; };
  const int n_events = ev(NL, 0) + 1;
  while (profile && static_cast<int>(events.size()) < n_events) {
    cudaEvent_t e;
    DLM_CUDA(cudaEventCreate(&e));
    events.push_back(e);
  }
  auto mark = [&](int idx) -> absl::Status {
    if (profile) DLM_CUDA(cudaEventRecord(events[idx], stream));
    return absl::OkStatus();
  };
  // profile_kernels: an event after every launch; the time between consecutive events (the
  // launch gap included) is charged to the kernel class named by the later one.
  int n_ticks = 0;
  auto tick = [&](const char* name) -> absl::Status {
    if (!profile_kernels) return absl::OkStatus();
    if (n_ticks == static_cast<int>(tick_events.size())) {
      cudaEvent_t e;
      DLM_CUDA(cudaEventCreate(&e));
      tick_events.push_back(e);
      tick_names.push_back(nullptr);
    }
    DLM_CUDA(cudaEventRecord(tick_events[n_ticks], stream));
    tick_names[n_ticks++] = name;
    return absl::OkStatus();
  };
  const bool want_top1 = items[0].top1 != nullptr;
  // Every launch of the step from the embedding to the last layer (captured into a graph or run
  // eagerly).
  auto enqueue = [&]() -> absl::Status {
    RETURN_IF_ERROR(mark(0));
    RETURN_IF_ERROR(tick("start"));

    DLM_CUDA(k::EmbeddingGather(embed, d_tok, n, Dm, V, x.as<float>(), stream));
    RETURN_IF_ERROR(tick("embedding"));
    for (int l = 0; l < NL; ++l) {
      const Layer& Lw = layers[l];
      const bool sel_layer = selective && l >= spec0.first_selective_layer;
      if (l == 0 || !fused) {  // fused: the previous layer's residual kernel wrote h
        DLM_CUDA(k::RmsNormToBf16(x.as<float>(), nullptr, n, Dm, Lw.attn_norm, eps,
                                  h.as<uint16_t>(), stream));
        RETURN_IF_ERROR(tick("attn_norm"));
      }
      // Selection.
      const int32_t* d_sel = nullptr;  // null: every live row
      const int32_t* d_inv = nullptr;
      const int m = mtot[l];
      if (sel_layer) {
        k::DlmCosineParams cp;
        cp.n = n;
        cp.layer = l;
        cp.head_dim = hd();
        cp.d_src = small.as<float>();
        cp.d_live_row = d_row;
        cp.d_live_req = d_req;
        cp.d_caches = d_views;
        cp.d_cos_out = cosv.as<float>();
        if (spa) {
          RETURN_IF_ERROR(Gemm(h.as<uint16_t>(), n, Dm, Lw.proxy, R, small.as<float>()));
          RETURN_IF_ERROR(tick("select_gemm"));
          cp.width = R;
          cp.target = k::DlmCosineTarget::kProxy;
        } else {
          RETURN_IF_ERROR(Gemm(h.as<uint16_t>(), n, Dm, Lw.wqkv + static_cast<size_t>(Q + KV) * Dm,
                               KV, small.as<float>()));
          RETURN_IF_ERROR(tick("select_gemm"));
          cp.width = KV;
          cp.d_bias = Lw.bv;
          cp.target = k::DlmCosineTarget::kValue;
        }
        DLM_CUDA(k::DlmCosineStore(cp, stream));
        RETURN_IF_ERROR(tick("select_cosine"));
        DLM_CUDA(k::DlmSelectSmallest(cosv.as<float>(), d_sb, d_sl, d_k + l * B, d_koff + l * B, B,
                                      sel.as<int32_t>(), inv.as<int32_t>(), stream));
        RETURN_IF_ERROR(tick("select_topk"));
        d_sel = sel.as<int32_t>();
        d_inv = inv.as<int32_t>();
      } else if (spec0.store_proxy && l >= 1) {
        RETURN_IF_ERROR(Gemm(h.as<uint16_t>(), n, Dm, Lw.proxy, R, small.as<float>()));
        RETURN_IF_ERROR(tick("proxy_store_gemm"));
        k::DlmCosineParams cp;
        cp.n = n;
        cp.layer = l;
        cp.width = R;
        cp.target = k::DlmCosineTarget::kProxy;
        cp.d_src = small.as<float>();
        cp.d_live_row = d_row;
        cp.d_live_req = d_req;
        cp.d_caches = d_views;
        DLM_CUDA(k::DlmCosineStore(cp, stream));
        RETURN_IF_ERROR(tick("proxy_store_cosine"));
      }
      if (l >= 1) RETURN_IF_ERROR(mark(ev(l, 0)));

      // K / V of the recomputed rows → caches. hq_rows: the selected rows' normalised input.
      const uint16_t* h_q = h.as<uint16_t>();
      if (d_sel != nullptr) {
        DLM_CUDA(k::RmsNormToBf16(x.as<float>(), d_sel, m, Dm, Lw.attn_norm, eps,
                                  hs.as<uint16_t>(), stream));
        RETURN_IF_ERROR(tick("attn_norm_selected"));
        h_q = hs.as<uint16_t>();
      }
      k::DlmKvScatterParams kp;
      kp.kv_heads = Hkv();
      kp.head_dim = hd();
      kp.layer = l;
      kp.d_bias_k = Lw.bk;
      kp.d_bias_v = Lw.bv;
      kp.d_live_row = d_row;
      kp.d_live_req = d_req;
      kp.d_caches = d_views;
      kp.d_inv_freq = inv_freq;
      kp.d_src = kv.as<float>();
      const uint16_t* wk = Lw.wqkv + static_cast<size_t>(Q) * Dm;
      // fused_row_ops: when K/V are recomputed for exactly the Q rows, one GEMM over the
      // contiguous Q|K|V (dllm: Q|K) rows of wqkv gives both (fused, ld = its width).
      const bool kv_of_q_rows = d_sel == nullptr || !(spa && spec0.kv_all_rows);
      const int qkv_w = Q + (d_sel != nullptr && !spa ? KV : 2 * KV);
      const bool fuse_qkv = fused && kv_of_q_rows && m > 0;
      if (fuse_qkv) {
        RETURN_IF_ERROR(Gemm(h_q, m, Dm, Lw.wqkv, qkv_w, kv.as<float>()));
        RETURN_IF_ERROR(tick("qkv_gemm"));
        kp.m = m;
        kp.d_sel = d_sel;
        kp.src_ld = qkv_w;
        kp.k_col = Q;
        kp.v_col = d_sel != nullptr && !spa ? -1 : Q + KV;
      } else if (d_sel == nullptr || (spa && spec0.kv_all_rows)) {
        // Every live row: K and V in one GEMM (the K and V rows of wqkv are contiguous).
        RETURN_IF_ERROR(Gemm(h.as<uint16_t>(), n, Dm, wk, 2 * KV, kv.as<float>()));
        RETURN_IF_ERROR(tick("kv_gemm"));
        kp.m = n;
        kp.src_ld = 2 * KV;
        kp.k_col = 0;
        kp.v_col = KV;
      } else if (spa) {
        RETURN_IF_ERROR(Gemm(h_q, m, Dm, wk, 2 * KV, kv.as<float>()));
        RETURN_IF_ERROR(tick("kv_gemm"));
        kp.m = m;
        kp.d_sel = d_sel;
        kp.src_ld = 2 * KV;
        kp.k_col = 0;
        kp.v_col = KV;
      } else {  // dllm: V of every live row was stored by the selection; K for the selected rows
        RETURN_IF_ERROR(Gemm(h_q, m, Dm, wk, KV, kv.as<float>()));
        RETURN_IF_ERROR(tick("kv_gemm"));
        kp.m = m;
        kp.d_sel = d_sel;
        kp.src_ld = KV;
        kp.k_col = 0;
        kp.v_col = -1;
      }
      if (fuse_qkv) {  // Q RoPE + K/V scatter of the same rows: one launch
        DLM_CUDA(k::DlmQkvRopeScatter(kp, Hq(), Lw.bq, qb.as<uint16_t>(), stream));
        RETURN_IF_ERROR(tick("qkv_rope_scatter"));
      } else {
        DLM_CUDA(k::DlmKvScatter(kp, stream));
        RETURN_IF_ERROR(tick("kv_rope_scatter"));
      }
      if (l >= 1) RETURN_IF_ERROR(mark(ev(l, 1)));

      // Q, attention over every canvas row, O, MLP for the recomputed rows.
      if (m > 0) {
        if (!fuse_qkv) {
          RETURN_IF_ERROR(Gemm(h_q, m, Dm, Lw.wqkv, Q, qf.as<float>()));
          RETURN_IF_ERROR(tick("q_gemm"));
          DLM_CUDA(k::DlmRopeQ(qf.as<float>(), 0, Lw.bq, d_sel, d_row, m, Hq(), hd(), inv_freq,
                               qb.as<uint16_t>(), stream));
          RETURN_IF_ERROR(tick("q_rope"));
        }
        RETURN_IF_ERROR(mark(ev(l, 2)));
        const float scale = 1.0f / std::sqrt(static_cast<float>(hd()));
        const float one = 1.0f, zero = 0.0f;
        for (const Group& g : groups[l]) {
          const void* const* P6 = d_ptrs + g.ptr_off;
          if (g.splits > 0) {
            k::DlmAttentionParams ap;
            ap.count = g.count;
            ap.m = g.m;
            ap.n_keys = g.N;
            ap.head_dim = hd();
            ap.ldq = Q;
            ap.splits = g.splits;
            ap.scale = scale;
            ap.d_k = P6;
            ap.d_q = P6 + g.count;
            ap.d_v = P6 + 3 * g.count;
            ap.d_o = const_cast<void* const*>(P6 + 5 * g.count);
            ap.d_work = attn_work.as<float>();
            DLM_CUDA(k::DlmFusedAttention(ap, stream));
            RETURN_IF_ERROR(tick("attn_fused"));
            continue;
          }
          // S (row-major [m][N] per head) = scale · Q Kᵀ:
          // column-major N × m = Kᵀ(N×hd) · Q(hd×m).
          DLM_CUBLAS(cublasGemmBatchedEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, g.N, g.m, hd(), &scale,
                                         P6, CUDA_R_16BF, hd(), P6 + g.count, CUDA_R_16BF, Q,
                                         &zero, const_cast<void* const*>(P6 + 2 * g.count),
                                         CUDA_R_32F, g.N, g.count, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT));
          RETURN_IF_ERROR(tick("attn_qk"));
          DLM_CUDA(k::DlmSoftmaxRowsToBf16(s.as<float>() + g.s_off,
                                           static_cast<int64_t>(g.count) * g.m, g.N,
                                           p.as<uint16_t>() + g.s_off, stream));
          RETURN_IF_ERROR(tick("attn_softmax"));
          // O (row-major [m][hd] per head, ld Q) = P V: column-major hd × m = V(hd×N) · P(N×m).
          DLM_CUBLAS(cublasGemmBatchedEx(cublas, CUBLAS_OP_N, CUBLAS_OP_N, hd(), g.m, g.N, &one,
                                         P6 + 3 * g.count, CUDA_R_16BF, hd(), P6 + 4 * g.count,
                                         CUDA_R_16BF, g.N, &zero,
                                         const_cast<void* const*>(P6 + 5 * g.count), CUDA_R_16BF,
                                         Q, g.count, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
          RETURN_IF_ERROR(tick("attn_pv"));
        }
        RETURN_IF_ERROR(mark(ev(l, 3)));
        RETURN_IF_ERROR(Gemm(ob.as<uint16_t>(), m, Q, Lw.wo, Dm, a.as<float>()));
        RETURN_IF_ERROR(tick("o_gemm"));
        DLM_CUDA(k::DlmAddRmsNorm(x.as<float>(), d_sel, a.as<float>(), Lw.bo, m, Dm, Lw.mlp_norm,
                                  eps, h2.as<uint16_t>(), stream));
        RETURN_IF_ERROR(tick("add_mlp_norm"));
        RETURN_IF_ERROR(Gemm(h2.as<uint16_t>(), m, Dm, Lw.w_gu, 2 * F(), gu.as<float>()));
        RETURN_IF_ERROR(tick("gate_up_gemm"));
        DLM_CUDA(k::SiluMulToBf16(gu.as<float>(), m, F(), act.as<uint16_t>(), stream));
        RETURN_IF_ERROR(tick("silu_mul"));
        RETURN_IF_ERROR(Gemm(act.as<uint16_t>(), m, F(), Lw.w_down, Dm, a.as<float>(), 1.0f));
        RETURN_IF_ERROR(tick("down_gemm"));
      }
      if (fused && l + 1 < NL) {  // + the next layer's input norm: h for layer l + 1
        DLM_CUDA(k::DlmResidualRmsNorm(x.as<float>(), d_inv, a.as<float>(), n, Dm, l, d_row,
                                       d_req, d_views, layers[l + 1].attn_norm, eps,
                                       h.as<uint16_t>(), stream));
        RETURN_IF_ERROR(tick("residual_norm"));
      } else {
        DLM_CUDA(k::DlmResidual(x.as<float>(), d_inv, a.as<float>(), n, Dm, l, d_row, d_req,
                                d_views, stream));
        RETURN_IF_ERROR(tick("residual"));
      }
      RETURN_IF_ERROR(mark(ev(l, 4)));
    }
    return absl::OkStatus();
  };
  // Final norm + LM head + top-1 on the logit rows: never captured, so that the graph of a step
  // shape does not depend on how many masked rows are left in the block (which changes every
  // step of a decode).
  auto enqueue_head = [&]() -> absl::Status {
    if (nl > 0) {
      // The logit rows are live rows (nl <= n): h (n rows) is free by now.
      DLM_CUDA(k::RmsNormToBf16(x.as<float>(), d_logit, nl, Dm, final_norm, eps, h.as<uint16_t>(),
                                stream));
      RETURN_IF_ERROR(tick("final_norm"));
      RETURN_IF_ERROR(Gemm(h.as<uint16_t>(), nl, Dm, lm_head, V, logits.as<float>()));
      RETURN_IF_ERROR(tick("lm_head_gemm"));
      if (want_top1) {
        DLM_CUDA(k::DlmTop1(logits.as<float>(), nl, V, top1.as<int32_t>(), prob.as<float>(),
                            stream));
        RETURN_IF_ERROR(tick("top1"));
      }
    }
    RETURN_IF_ERROR(mark(ev(NL, 0)));
    return absl::OkStatus();
  };
  const bool use_graph = graphs && !profile && !profile_kernels && !gemm_tune;
  if (!use_graph) {
    RETURN_IF_ERROR(enqueue());
    graph_eager++;
  } else {
    // Everything a launch's arguments depend on; the per-step metadata (tokens, positions, cache
    // views, attention pointers) is read from `meta` by the kernels and copied in above.
    std::vector<int64_t> key = {static_cast<int64_t>(spec0.select), spec0.first_selective_layer,
                                spec0.kv_all_rows, spec0.store_proxy, B, n};
    for (int b = 0; b < B; ++b) {
      key.push_back(off[b + 1] - off[b]);
      key.push_back(items[b].cache->rows());
    }
    for (int l = 0; l < NL; ++l) key.insert(key.end(), mq[l].begin(), mq[l].end());
    for (const Grow* g : {&x, &h, &hs, &small, &cosv, &sel, &inv, &kv, &qf, &qb, &ob, &a, &h2,
                          &gu, &act, &s, &p, &attn_work, &meta}) {
      key.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(g->ptr)));
    }
    auto found = graph_exec.find(key);
    if (found == graph_exec.end() && ++graph_seen[key] >= 2) {
      if (graph_exec.size() >= kMaxGraphs) DropGraphs();
      if (graph_seen.size() > 4 * kMaxGraphs) graph_seen.clear();
      DLM_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      absl::Status st = enqueue();
      cudaGraph_t graph = nullptr;
      const cudaError_t end = cudaStreamEndCapture(stream, &graph);
      if (st.ok()) st = CudaErr(end, "cudaStreamEndCapture");
      cudaGraphExec_t exec = nullptr;
      if (st.ok()) st = CudaErr(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
      if (graph != nullptr) cudaGraphDestroy(graph);
      RETURN_IF_ERROR(st);
      found = graph_exec.emplace(key, exec).first;
      graph_captures++;
    }
    if (found != graph_exec.end()) {
      DLM_CUDA(cudaGraphLaunch(found->second, stream));
      graph_replays++;
    } else {
      RETURN_IF_ERROR(enqueue());
      graph_eager++;
    }
  }
  RETURN_IF_ERROR(enqueue_head());
  // Proxies stored by the step (layers >= 1 that did not select): valid from now on.
  for (int l = 1; l < NL && spec0.store_proxy; ++l) {
    if (selective && l >= spec0.first_selective_layer) continue;
    for (int b = 0; b < B; ++b) static_cast<CudaDlmCache*>(items[b].cache)->set_proxy_valid(l);
  }
  std::vector<int32_t> h_top(nl);
  std::vector<float> h_prob(nl), h_logits;
  if (nl > 0) {
    if (want_top1) {
      DLM_CUDA(cudaMemcpyAsync(h_top.data(), top1.ptr, nl * 4, cudaMemcpyDeviceToHost, stream));
      DLM_CUDA(cudaMemcpyAsync(h_prob.data(), prob.ptr, nl * 4, cudaMemcpyDeviceToHost, stream));
    } else {
      h_logits.resize(static_cast<size_t>(nl) * V);
      DLM_CUDA(cudaMemcpyAsync(h_logits.data(), logits.ptr, h_logits.size() * 4,
                               cudaMemcpyDeviceToHost, stream));
    }
  }
  DLM_CUDA(cudaStreamSynchronize(stream));

  for (int b = 0; b < B; ++b) {
    const DlmBatchItem& it = items[b];
    if (it.top1 != nullptr) {
      it.top1->assign(h_top.begin() + loff[b], h_top.begin() + loff[b + 1]);
      it.top1_prob->assign(h_prob.begin() + loff[b], h_prob.begin() + loff[b + 1]);
    } else {
      it.logits->assign(h_logits.begin() + static_cast<size_t>(loff[b]) * V,
                        h_logits.begin() + static_cast<size_t>(loff[b + 1]) * V);
    }
    if (it.stats != nullptr) {
      ForwardStats& st = *it.stats;
      st.Resize(NL);
      st.forwards++;
      st.lm_rows += nlog[b];
      const int nb = off[b + 1] - off[b];
      for (int l = 0; l < NL; ++l) {
        const bool sel_layer = selective && l >= spec0.first_selective_layer;
        st.q_rows[l] += mq[l][b];
        st.live_rows[l] += nb;
        st.kv_rows[l] += (!sel_layer || (spa && spec0.kv_all_rows)) ? nb : mq[l][b];
      }
    }
  }
  if (profile_kernels) {
    for (int i = 1; i < n_ticks; ++i) {
      float t = 0;
      cudaEventElapsedTime(&t, tick_events[i - 1], tick_events[i]);
      auto it = std::find_if(kernel_ms.begin(), kernel_ms.end(),
                             [&](const auto& kv) { return kv.first == tick_names[i]; });
      if (it == kernel_ms.end()) it = kernel_ms.insert(kernel_ms.end(), {tick_names[i], 0.0});
      it->second += t;
    }
    kernel_forwards++;
  }
  if (profile && batch_stats != nullptr) {
    auto ms = [&](int from, int to) {
      float t = 0;
      cudaEventElapsedTime(&t, events[from], events[to]);
      return static_cast<double>(t) * 1e-3;
    };
    batch_stats->seconds_layer0 += ms(0, ev(0, 4));
    for (int l = 1; l < NL; ++l) {
      batch_stats->seconds_select += ms(ev(l - 1, 4), ev(l, 0));
      batch_stats->seconds_kv += ms(ev(l, 0), ev(l, 1));
      batch_stats->seconds_rows += ms(ev(l, 1), ev(l, 4));
      if (mtot[l] > 0) batch_stats->seconds_attn += ms(ev(l, 2), ev(l, 3));
    }
    batch_stats->seconds_lm += ms(ev(NL - 1, 4), ev(NL, 0));
  }
  return absl::OkStatus();
}

CudaDlmModel::CudaDlmModel(std::unique_ptr<Impl> impl, const ModelConfig& config, int mask_id,
                           std::vector<int> eos_ids, int proxy_rank, std::string device_name,
                           int64_t weight_bytes)
    : impl_(std::move(impl)),
      config_(config),
      mask_id_(mask_id),
      eos_ids_(std::move(eos_ids)),
      proxy_rank_(proxy_rank),
      device_name_(std::move(device_name)),
      weight_bytes_(weight_bytes) {}

CudaDlmModel::~CudaDlmModel() = default;

const ModelConfig& CudaDlmModel::config() const { return config_; }
int CudaDlmModel::mask_id() const { return mask_id_; }
std::span<const int> CudaDlmModel::eos_ids() const { return eos_ids_; }
int CudaDlmModel::proxy_rank() const { return proxy_rank_; }
std::string CudaDlmModel::backend_name() const { return absl::StrCat("cuda (", device_name_, ")"); }
std::string CudaDlmModel::device_name() const { return device_name_; }
int64_t CudaDlmModel::weight_bytes() const { return weight_bytes_; }
std::vector<std::pair<std::string, double>> CudaDlmModel::TakeKernelProfile(
    int64_t* forwards) const {
  absl::MutexLock l(&mu_);
  if (forwards != nullptr) *forwards = impl_->kernel_forwards;
  impl_->kernel_forwards = 0;
  return std::exchange(impl_->kernel_ms, {});
}
std::string CudaDlmModel::graph_summary() const {
  absl::MutexLock l(&mu_);
  const Impl& m = *impl_;
  return absl::StrCat("cuda graphs ", m.graphs ? "on" : "off", ", skinny gemm ",
                      m.skinny ? "on" : "off", ": ", m.graph_replays, " forwards replayed, ",
                      m.graph_captures, " captured, ", m.graph_eager, " eager; ",
                      m.graph_exec.size(), " graphs held");
}
std::string CudaDlmModel::gemm_tuning_summary() const {
  absl::MutexLock l(&mu_);
  return impl_->gemm_tune ? impl_->TuningSummary() : "gemm tuning off";
}

absl::StatusOr<std::unique_ptr<CudaDlmModel>> CudaDlmModel::Create(const CudaDlmOptions& o) {
  if ((o.model != nullptr) == o.random_config.has_value()) {
    return absl::InvalidArgumentError("model: set exactly one of model and random_config");
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return absl::UnavailableError("cuda: no CUDA device is visible");
  }
  if (o.device < 0 || o.device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("device: ", o.device, " is not in [0, ", count, ")"));
  }
  DLM_CUDA(cudaSetDevice(o.device));
  if (k::ModelOpsCheckDevice() != cudaSuccess) {
    cudaGetLastError();
    return absl::UnavailableError("cuda: the kernels have no image for this device");
  }
  auto impl = std::make_unique<Impl>();
  Impl& m = *impl;
  m.profile = o.profile;
  m.device = o.device;
  m.c = o.model != nullptr ? o.model->config() : *o.random_config;
  const ModelConfig& c = m.c;
  const int mask = o.model != nullptr ? o.model->mask_id()
                   : o.random_mask_id >= 0 ? o.random_mask_id
                                           : c.mask_token_id;
  RETURN_IF_ERROR(DlmModel::Supports(c, mask));
  if (c.head_dim % 2 != 0 || c.num_attention_heads % c.num_key_value_heads != 0) {
    return absl::InvalidArgumentError("config: head_dim must be even and kv heads divide heads");
  }
  const int KVW = c.num_key_value_heads * c.head_dim;
  if (o.model != nullptr) {
    m.R = o.model->proxy_rank();
  } else {
    m.R = o.random_proxy_rank > 0 ? o.random_proxy_rank
                                  : std::min(std::max(16, KVW / 32), std::min(KVW, c.hidden_size));
  }
  DLM_CUDA(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking));
  DLM_CUBLAS(cublasCreate(&m.cublas));
  DLM_CUBLAS(cublasSetStream(m.cublas, m.stream));
  m.gemm_tune = o.gemm_tune;
  m.profile_kernels = o.profile_kernels;
  m.graphs = o.cuda_graphs;
  m.fused = o.fused_row_ops;
  m.fused_attn = o.fused_attention;
  m.fused_attn_max_rows = o.fused_attention_max_rows;
  {
    cudaDeviceProp dp;
    DLM_CUDA(cudaGetDeviceProperties(&dp, o.device));
    m.num_sms = dp.multiProcessorCount;
    m.skinny = o.skinny_gemm && dp.major >= 9;  // thread-block clusters
    m.fused_attn = m.fused_attn && dp.major >= 8;  // bf16 mma.sync
  }
  // A workspace of our own (cuBLAS's default size on Hopper), so that captured GEMMs never
  // allocate.
  DLM_CUDA(cudaMalloc(&m.cublas_ws, Impl::kCublasWorkspace));
  m.allocations.push_back(m.cublas_ws);
  DLM_CUBLAS(cublasSetWorkspace(m.cublas, m.cublas_ws, Impl::kCublasWorkspace));
  if (m.gemm_tune) {
    DLM_CUBLAS(cublasLtCreate(&m.lt));
    DLM_CUDA(cudaMalloc(&m.lt_ws, Impl::kLtWorkspace));
    m.allocations.push_back(m.lt_ws);
  }
  const int D = c.hidden_size, F = c.intermediate_size, V = c.vocab_size;
  const int QKV = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
  m.layers.resize(c.num_hidden_layers);
  if (o.model != nullptr) {
    const ModelWeights& w = o.model->weights();
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      const LayerWeights& L = w.layers[l];
      Impl::Layer& d = m.layers[l];
      std::vector<float> qkv;
      qkv.reserve(static_cast<size_t>(QKV) * D);
      for (const auto* part : {&L.wq, &L.wk, &L.wv}) qkv.insert(qkv.end(), part->begin(), part->end());
      ASSIGN_OR_RETURN(d.wqkv, m.UploadBf16(qkv));
      ASSIGN_OR_RETURN(d.wo, m.UploadBf16(L.wo));
      std::vector<float> gu(L.w_gate);
      gu.insert(gu.end(), L.w_up.begin(), L.w_up.end());
      ASSIGN_OR_RETURN(d.w_gu, m.UploadBf16(gu));
      ASSIGN_OR_RETURN(d.w_down, m.UploadBf16(L.w_down));
      if (m.R > 0) {
        ASSIGN_OR_RETURN(d.proxy, m.UploadBf16(o.model->proxy(l).proj));
      }
      ASSIGN_OR_RETURN(d.bq, m.UploadF32(L.bq));
      ASSIGN_OR_RETURN(d.bk, m.UploadF32(L.bk));
      ASSIGN_OR_RETURN(d.bv, m.UploadF32(L.bv));
      ASSIGN_OR_RETURN(d.bo, m.UploadF32(L.bo));
      ASSIGN_OR_RETURN(d.attn_norm, m.UploadF32(L.attn_norm));
      ASSIGN_OR_RETURN(d.mlp_norm, m.UploadF32(L.mlp_norm));
    }
    ASSIGN_OR_RETURN(m.embed, m.UploadBf16(w.embed));
    if (w.lm_head.empty()) {
      m.lm_head = m.embed;
    } else {
      ASSIGN_OR_RETURN(m.lm_head, m.UploadBf16(w.lm_head));
    }
    ASSIGN_OR_RETURN(m.final_norm, m.UploadF32(w.final_norm));
  } else {
    const float amp = 0.02f * std::sqrt(3.0f);
    uint64_t seed = o.random_seed * 1000003u;
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      Impl::Layer& d = m.layers[l];
      ASSIGN_OR_RETURN(d.wqkv, m.RandomBf16(static_cast<size_t>(QKV) * D, amp, ++seed));
      ASSIGN_OR_RETURN(d.wo, m.RandomBf16(static_cast<size_t>(D) * c.num_attention_heads *
                                              c.head_dim, amp, ++seed));
      ASSIGN_OR_RETURN(d.w_gu, m.RandomBf16(static_cast<size_t>(2) * F * D, amp, ++seed));
      ASSIGN_OR_RETURN(d.w_down, m.RandomBf16(static_cast<size_t>(D) * F, amp, ++seed));
      ASSIGN_OR_RETURN(d.proxy, m.RandomBf16(static_cast<size_t>(m.R) * D, 1.0f, ++seed));
      ASSIGN_OR_RETURN(d.attn_norm, m.Ones(D));
      ASSIGN_OR_RETURN(d.mlp_norm, m.Ones(D));
    }
    ASSIGN_OR_RETURN(m.embed, m.RandomBf16(static_cast<size_t>(V) * D, amp, ++seed));
    ASSIGN_OR_RETURN(m.lm_head, m.RandomBf16(static_cast<size_t>(V) * D, amp, ++seed));
    ASSIGN_OR_RETURN(m.final_norm, m.Ones(D));
  }
  ASSIGN_OR_RETURN(m.inv_freq, m.UploadF32(RopeInvFrequencies(c)));
  DLM_CUDA(cudaStreamSynchronize(m.stream));
  cudaDeviceProp prop;
  DLM_CUDA(cudaGetDeviceProperties(&prop, o.device));
  std::string name = absl::StrCat(prop.name, " (sm_", prop.major, prop.minor, ", ",
                                  prop.multiProcessorCount, " SMs)");
  // End-of-text ids: the CPU model's (its tokenizer's as fallback), else the random config's.
  std::vector<int> eos = c.eos_token_ids;
  if (o.model != nullptr) eos.assign(o.model->eos_ids().begin(), o.model->eos_ids().end());
  const int R = m.R;
  const int64_t wb = m.weight_bytes;
  LOG(INFO) << "cuda dlm model ready: " << name << " layers=" << c.num_hidden_layers
            << " hidden=" << D << " proxy_rank=" << R << " weight_bytes=" << wb;
  return std::unique_ptr<CudaDlmModel>(
      new CudaDlmModel(std::move(impl), c, mask, std::move(eos), R, std::move(name), wb));
}

absl::StatusOr<std::unique_ptr<DlmCache>> CudaDlmModel::NewCache(int rows) const {
  if (rows <= 0) return absl::InvalidArgumentError(absl::StrCat("rows: must be > 0, got ", rows));
  absl::MutexLock lock(&mu_);
  const ModelConfig& c = config_;
  const size_t NL = c.num_hidden_layers, r = rows;
  const size_t kv = NL * c.num_key_value_heads * r * c.head_dim;  // elements of K (and of V)
  const size_t delta = NL * r * c.hidden_size;
  const size_t proxy = NL * r * static_cast<size_t>(proxy_rank_);
  auto cache = std::make_unique<CudaDlmCache>(rows, c.num_hidden_layers);
  const size_t bytes = kv * 2 * 2 + delta * 4 + proxy * 4;
  DLM_CUDA(cudaSetDevice(impl_->device));
  DLM_CUDA(cudaMalloc(&cache->mem_, bytes));
  DLM_CUDA(cudaMemsetAsync(cache->mem_, 0, bytes, impl_->stream));
  DLM_CUDA(cudaStreamSynchronize(impl_->stream));
  char* base = static_cast<char*>(cache->mem_);
  cache->view.k = reinterpret_cast<uint16_t*>(base);
  cache->view.v = reinterpret_cast<uint16_t*>(base + kv * 2);
  cache->view.delta = reinterpret_cast<float*>(base + kv * 4);
  cache->view.proxy = proxy > 0 ? reinterpret_cast<float*>(base + kv * 4 + delta * 4) : nullptr;
  cache->view.rows = rows;
  return cache;
}

absl::Status CudaDlmModel::ForwardBatch(std::span<const DlmBatchItem> items,
                                        ForwardStats* batch_stats) const {
  RETURN_IF_ERROR(CheckBatchItems(items));
  for (const DlmBatchItem& it : items) {
    if (dynamic_cast<CudaDlmCache*>(it.cache) == nullptr) {
      return absl::InvalidArgumentError("items: a cache not made by this CUDA model");
    }
  }
  for (const DlmBatchItem& it : items) {
    auto* cache = static_cast<CudaDlmCache*>(it.cache);
    RETURN_IF_ERROR(ValidateForward(config_, proxy_rank_, cache->rows(), it.canvas, *it.spec,
                                    [cache](int l) { return cache->proxy_valid(l); }, nullptr));
  }
  absl::MutexLock lock(&mu_);
  DLM_CUDA(cudaSetDevice(impl_->device));
  // Homogeneous groups (same step kind and output kind), in order of first appearance.
  std::vector<bool> done(items.size(), false);
  for (size_t i = 0; i < items.size(); ++i) {
    if (done[i]) continue;
    std::vector<DlmBatchItem> group;
    for (size_t j = i; j < items.size(); ++j) {
      if (!done[j] && SameKind(*items[i].spec, *items[j].spec) &&
          (items[i].top1 == nullptr) == (items[j].top1 == nullptr)) {
        group.push_back(items[j]);
        done[j] = true;
      }
    }
    RETURN_IF_ERROR(impl_->Forward(group, batch_stats));
  }
  return absl::OkStatus();
}

}  // namespace prehoc::dlm
