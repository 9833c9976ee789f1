#include "worker/backends/cuda/cuda_model.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <deque>
#include <map>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/logging.h"
#include "common/status.h"
#include "worker/kernels/model_ops.h"
#include "worker/kernels/paged_decode.h"
#include "worker/kernels/prefill_attention.h"
#include "worker/kernels/sampling.h"
#include "worker/kernels/selection_prhs.h"
#include "worker/kv_cache.h"
#include "worker/rope.h"

namespace prehoc {
namespace {

absl::Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // not sticky: clear it
    return absl::ResourceExhaustedError(absl::StrCat(what, ": out of device memory"));
  }
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}
#define CUDA_RETURN_IF_ERROR(expr) RETURN_IF_ERROR(CudaStatus((expr), #expr))

absl::Status CublasStatus(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cublasGetStatusName(s), " (",
                                          cublasGetStatusString(s), ")"));
}
#define CUBLAS_RETURN_IF_ERROR(expr) RETURN_IF_ERROR(CublasStatus((expr), #expr))

// Owning device allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { Reset(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // Frees the old allocation and allocates `bytes` (contents undefined).
  absl::Status Allocate(size_t bytes, const char* what) {
    Reset();
    if (bytes == 0) return absl::OkStatus();
    cudaError_t err = cudaMalloc(&ptr_, bytes);
    if (err != cudaSuccess) {
      ptr_ = nullptr;
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      if (err == cudaErrorMemoryAllocation) {
        return absl::ResourceExhaustedError(absl::StrCat("cudaMalloc of ", bytes, " bytes for ",
                                                         what, " failed: ", free_b,
                                                         " bytes free of ", total_b));
      }
      return CudaStatus(err, what);
    }
    bytes_ = bytes;
    return absl::OkStatus();
  }
  void Swap(DeviceBuffer& o) {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
  }
  void Reset() {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Sub-allocations of one buffer, 256-byte aligned.
struct ArenaLayout {
  size_t bytes = 0;
  size_t Add(size_t n) {
    const size_t off = (bytes + 255) / 256 * 256;
    bytes = off + n;
    return off;
  }
};

constexpr size_t kBf16 = 2;

}  // namespace

struct CudaModel::Impl {
  ModelConfig config;
  int page_size = 16;
  int max_context = 0;
  bool force_generic = false;
  bool tiled_prefill = false;
  int device = 0;
  int num_sms = 0;
  std::string device_name;

  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  DeviceBuffer cublas_workspace;
  // GEMM autotuning (options.gemm_autotune): per (m, n, k) with n <= kMaxTunedRows, the fastest of
  // cublasGemmEx's default and cublasLt's heuristic candidates, timed once on first use.
  static constexpr int kMaxTunedRows = 64;
  bool gemm_autotune = false;
  cublasLtHandle_t lt = nullptr;
  struct LtPlan {
    bool use_gemm_ex = true;
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  std::map<std::tuple<int, int, int>, LtPlan> lt_plans;
  DeviceBuffer tune_out;

  // Weights.
  struct Layer {
    uint16_t* wqkv = nullptr;  // [(Hq + 2 Hkv) hd][D]
    uint16_t* wo = nullptr;    // [D][Hq hd]
    uint16_t* w_gu = nullptr;  // [2F][D]
    uint16_t* w_down = nullptr;  // [D][F]
    float* bqkv = nullptr;     // [(Hq + 2 Hkv) hd] or null
    float* bo = nullptr;       // [D] or null
    float* attn_norm = nullptr;
    float* mlp_norm = nullptr;
  };
  DeviceBuffer matrices;  // bf16 arena
  DeviceBuffer smalls;    // f32 arena
  std::vector<Layer> layers;
  uint16_t* embed = nullptr;
  uint16_t* lm_head = nullptr;
  float* final_norm = nullptr;
  float* inv_freq = nullptr;
  int64_t weight_bytes = 0;

  // KV pools: [layer][k | v][num_pages][Hkv][page_size][hd] bf16.
  DeviceBuffer kv;
  size_t pool_elems = 0;
  int32_t num_pages = 0;
  std::unique_ptr<PageAllocator> allocator;

  struct Sequence {
    int length = 0;
    std::vector<int32_t> page_table;
    int prhs_slot = -1;  // CIS state slot in the PrHS pools (-1 = none yet)
    int quest_seen = 0;  // Quest: positions whose page bounds are folded (as QuestSelector's)
    bool hs_calibrated = false;  // HShare: channels and sharing map set (every unit at once)
    int64_t aliased_pages = 0;   // ETF: (layer, page) slots copied from an earlier layer
  };
  std::unordered_map<SeqId, Sequence> seqs;
  SeqId next_seq = 1;

  // Activations, sized for cap_rows rows and cap_logit_rows logits rows.
  int cap_rows = 0, cap_logit_rows = 0;
  DeviceBuffer x, h, qkv, q, attn, gu, act, normed, logits, greedy;
  DeviceBuffer meta;
  size_t meta_cap = 0;  // int32 elements
  DeviceBuffer decode_ws;

  // Pinned host staging for the per-step metadata; a ring so that the host can run ahead of the
  // GPU by a few steps without overwriting a buffer a pending copy still reads.
  struct Staging {
    int32_t* host = nullptr;
    size_t cap = 0;
    cudaEvent_t done = nullptr;
  };
  std::array<Staging, 4> staging;
  int next_staging = 0;

  // ---- PrHS decode selection (see the header). CIS state pools, per layer [slots][Hkv] state
  // rows: anchor_q [..][G * hd] bf16, reuse / valid / anchor_count int32, anchor_set
  // [..][prhs_stride] int32; a sequence owns slot Sequence::prhs_slot until it is freed.
  int prhs_slots = 0;
  int prhs_stride = 0;
  DeviceBuffer prhs_anchor_q, prhs_reuse, prhs_valid, prhs_set, prhs_count;
  std::vector<int> prhs_free_slots;
  // H2O (kHeavy rows, allocated at the first h2o decode): per layer [slots][Hkv] state rows of
  // the tracked (not evicted) positions [..][h2o_stride] int32, their accumulated scores f32 and
  // counts int32 (PrhsHeavySelect); valid / reuse (= the last step's length) / the kept set are
  // the CIS pools' rows of the same slot.
  int h2o_stride = 0;
  DeviceBuffer h2o_pos, h2o_acc, h2o_count;
  // HShare (kApprox rows, allocated at the first hshare decode): per layer [slots][Hkv] rows of
  // the calibrated channels [..][hd] int32 (the first approx_channels used) and the shared
  // unit (layer * Hkv + kv head, or -1) int32.
  bool hs_pools = false;
  DeviceBuffer hs_channels, hs_source;
  // Per step: refresh [L][rows] int32 | delta [L][rows] f32 | index_indptr [L][rows + 1] int32,
  // copied to the host in one piece; the CSR indices of the current layer; the workspace.
  DeviceBuffer prhs_out, prhs_indices, prhs_ws;
  // Quest page bounds per layer [L][num_pages][Hkv][2][hd] bf16 (allocated at the first quest
  // decode; indexed by physical page).
  DeviceBuffer quest_bounds;
  // A step's selection results on their way to the host (pinned copy of prhs_out).
  struct PendingSelection {
    cudaEvent_t done = nullptr;
    int32_t* host = nullptr;
    size_t cap = 0;  // int32 elements
    int batch = 0;
    std::vector<SelectionTelemetry*> telemetry;  // [batch]; null = the item does not select
    std::vector<SelectionPolicy> policy;         // [batch]
    bool per_head = false;                       // topk is [L][batch * Hkv]
    std::vector<int32_t> topk;                   // [L][batch] as passed to the kernels
    std::vector<int32_t> lens;                   // [batch] t of the step
  };
  std::deque<PendingSelection> prhs_pending;  // oldest first
  std::vector<PendingSelection> prhs_spare;   // accounted records, their pinned buffers reused
  static constexpr size_t kMaxPendingSelections = 4;

  ~Impl() {
    if (stream != nullptr) cudaStreamSynchronize(stream);
    for (PendingSelection& p : prhs_spare) ReleasePending(&p);
    for (PendingSelection& p : prhs_pending) ReleasePending(&p);
    for (Staging& s : staging) {
      if (s.host != nullptr) cudaFreeHost(s.host);
      if (s.done != nullptr) cudaEventDestroy(s.done);
    }
    for (auto& [key, plan] : lt_plans) {
      if (plan.a != nullptr) cublasLtMatrixLayoutDestroy(plan.a);
      if (plan.b != nullptr) cublasLtMatrixLayoutDestroy(plan.b);
      if (plan.c != nullptr) cublasLtMatrixLayoutDestroy(plan.c);
      if (plan.desc != nullptr) cublasLtMatmulDescDestroy(plan.desc);
    }
    if (lt != nullptr) cublasLtDestroy(lt);
    if (cublas != nullptr) cublasDestroy(cublas);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  static void ReleasePending(PendingSelection* p) {
    if (p->host != nullptr) cudaFreeHost(p->host);
    if (p->done != nullptr) cudaEventDestroy(p->done);
    p->host = nullptr;
    p->done = nullptr;
  }

  int D() const { return config.hidden_size; }
  int Hq() const { return config.num_attention_heads; }
  int Hkv() const { return config.num_key_value_heads; }
  int HD() const { return config.head_dim; }
  int F() const { return config.intermediate_size; }
  int V() const { return config.vocab_size; }
  int QkvWidth() const { return (Hq() + 2 * Hkv()) * HD(); }
  uint16_t* KPool(int l) const { return kv.as<uint16_t>() + (2 * static_cast<size_t>(l)) * pool_elems; }
  uint16_t* VPool(int l) const {
    return kv.as<uint16_t>() + (2 * static_cast<size_t>(l) + 1) * pool_elems;
  }
  bool FastDecodeKernel() const {
    return !force_generic && (HD() == 64 || HD() == 128) && page_size == 16;
  }
  bool TiledPrefillKernel() const {
    return tiled_prefill && !force_generic && (HD() == 64 || HD() == 128);
  }

  absl::Status Init(const CudaModelOptions& o, const ModelWeights* host_weights);
  absl::Status AllocateWeights(bool has_qkv_bias, bool has_o_bias);
  absl::Status UploadWeights(const ModelWeights& w);
  absl::Status RandomWeights(uint64_t seed);

  // y[n][m] (f32) = x[n][k] (bf16) · w[m][k]ᵀ (bf16) + beta · y.
  absl::Status Gemm(const uint16_t* x, int n, int k, const uint16_t* w, int m, float* y,
                    float beta) {
    if (gemm_autotune && n <= kMaxTunedRows) {
      auto it = lt_plans.find({m, n, k});
      if (it == lt_plans.end()) {
        ASSIGN_OR_RETURN(LtPlan plan, Tune(x, n, k, w, m));
        it = lt_plans.emplace(std::make_tuple(m, n, k), plan).first;
      }
      if (!it->second.use_gemm_ex) return LtGemm(it->second, x, w, y, beta);
    }
    return GemmEx(x, n, k, w, m, y, beta);
  }
  absl::Status GemmEx(const uint16_t* x, int n, int k, const uint16_t* w, int m, float* y,
                      float beta) {
    const float alpha = 1.0f;
    // Column-major: yᵀ [m x n] = op(W) [m x k] · xᵀ [k x n] with W seen as [k x m] (lda = k).
    CUBLAS_RETURN_IF_ERROR(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, w,
                                        CUDA_R_16BF, k, x, CUDA_R_16BF, k, &beta, y, CUDA_R_32F,
                                        m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return absl::OkStatus();
  }
  absl::Status LtGemm(const LtPlan& p, const uint16_t* x, const uint16_t* w, float* y,
                      float beta) {
    const float alpha = 1.0f;
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(lt, p.desc, &alpha, w, p.a, x, p.b, &beta, y, p.c, y,
                                          p.c, &p.algo, cublas_workspace.as<void>(),
                                          cublas_workspace.bytes(), stream));
    return absl::OkStatus();
  }
  // Times cublasGemmEx and up to 16 cublasLt heuristic candidates for this shape (into a scratch
  // output, so the real y is untouched) and returns the fastest. Synchronises the stream.
  absl::StatusOr<LtPlan> Tune(const uint16_t* x, int n, int k, const uint16_t* w, int m);

  absl::Status EnsureCapacity(int rows, int logit_rows);
  absl::Status EnsureBuffer(DeviceBuffer* buf, size_t bytes, const char* what) {
    if (buf->bytes() >= bytes) return absl::OkStatus();
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    return buf->Allocate(bytes, what);
  }
  // Copies `meta` to the device (through the pinned ring) and returns the device pointer.
  absl::StatusOr<int32_t*> UploadMeta(const std::vector<int32_t>& meta);

  struct ItemDesc {
    SeqId seq = 0;
    int n = 0;                         // new tokens
    std::span<const int32_t> tokens;   // host tokens (empty with device tokens)
    bool all_logits = false;
    bool no_logits = false;            // no logits row at all (StepSample's unwanted draws)
    int uninitialized = 0;             // > 0: benchmark growth without a forward
    const SelectionPlan* plan = nullptr;  // decode selection (dense / prhs / oracle / streaming)
    SelectionTelemetry* telemetry = nullptr;
    const SelectionPlan* prefill_plan = nullptr;  // PSAW band / ETF of multi-token causal items
  };
  // Grows the PrHS state pools to at least `slots` sequences and `stride` anchor entries per
  // row (and, with h2o > 0 or H2O pools already present, the H2O pools to h2o tracked entries
  // per row), keeping every existing slot's state. Synchronises the stream.
  absl::Status GrowPrhsPools(int slots, int stride, int h2o = 0, bool hshare = false);
  // Elements of one layer's Quest page bounds: num_pages x Hkv x 2 x hd.
  size_t QuestBoundsPerLayer() const {
    return static_cast<size_t>(num_pages) * Hkv() * 2 * HD();
  }
  // Gives `s` a slot with a cleared CIS state (valid = reuse = 0 in every layer).
  absl::Status AcquirePrhsSlot(Sequence* s);
  // Accounts the pending selection results whose copy has landed (all of them with `wait`, or
  // the oldest ones beyond kMaxPendingSelections).
  absl::Status FlushSelections(bool wait);
  void AccountSelection(const PendingSelection& p) const;
  // The common path of Step, DecodeGreedyAsync and AppendUninitialized. Validates, allocates
  // pages, runs the forward (unless the items are `uninitialized`), and commits the new lengths.
  // With host_logits, copies the logits rows (and greedy tokens) back and synchronises.
  // `draws` (optional, one per item): the token of each logits row is drawn on the device
  // (SampleRows; rows other than an item's last are greedy) instead of the argmax, and lands
  // where the argmax would (d_next / greedy).
  absl::Status Run(const std::vector<ItemDesc>& items, bool causal, const int32_t* d_tokens,
                   int32_t* d_next, const CudaKvSelection* selection,
                   std::vector<std::vector<float>>* host_logits, std::vector<int32_t>* greedy,
                   std::span<const TokenDraw> draws = {});
};

CudaModel::CudaModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaModel::~CudaModel() = default;

absl::StatusOr<std::unique_ptr<CudaModel>> CudaModel::Create(const CudaModelOptions& options) {
  const int sources = (options.weights != nullptr) + !options.model_dir.empty() +
                      options.random_config.has_value();
  if (sources != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "exactly one of weights, model_dir and random_config must be set (got ", sources, ")"));
  }
  ModelConfig config;
  if (options.weights != nullptr) {
    config = options.weights->config;
  } else if (!options.model_dir.empty()) {
    ASSIGN_OR_RETURN(config, LoadModelConfig(options.model_dir));
  } else {
    config = *options.random_config;
  }
  RETURN_IF_ERROR(Supports(config, options.page_size));
  if (options.max_context < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_context must be >= 0, got ", options.max_context));
  }

  // ---- Device.
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();
    return absl::UnavailableError(absl::StrCat(
        "CUDA backend unavailable: no CUDA device (cudaGetDeviceCount: ",
        err == cudaSuccess ? "0 devices" : cudaGetErrorString(err), "); use the CPU engine"));
  }
  if (options.device < 0 || options.device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("device=", options.device, " but ", count, " CUDA devices are present"));
  }
  CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
  cudaDeviceProp prop;
  CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, options.device));
  if (prop.major < 8) {
    return absl::UnavailableError(absl::StrCat("CUDA backend unavailable: ", prop.name, " is sm_",
                                               prop.major, prop.minor,
                                               "; bf16 kernels need sm_80 or newer"));
  }
  err = kernels::ModelOpsCheckDevice();
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::UnavailableError(absl::StrCat(
        "CUDA backend unavailable: the kernels were not built for ", prop.name, " (sm_",
        prop.major, prop.minor, "): ", cudaGetErrorString(err)));
  }

  std::shared_ptr<const ModelWeights> host = options.weights;
  if (host == nullptr && !options.model_dir.empty()) {
    ASSIGN_OR_RETURN(std::unique_ptr<ModelWeights> loaded, ModelWeights::Load(options.model_dir));
    host = std::move(loaded);
    config = host->config;
  }

  auto impl = std::make_unique<Impl>();
  impl->config = config;
  impl->page_size = options.page_size;
  impl->max_context =
      options.max_context > 0 ? options.max_context : config.max_position_embeddings;
  impl->force_generic = options.force_generic_attention;
  impl->tiled_prefill = options.tiled_prefill;
  impl->gemm_autotune = options.gemm_autotune;
  impl->device = options.device;
  impl->num_sms = prop.multiProcessorCount;
  impl->device_name = absl::StrCat(prop.name, " (sm_", prop.major, prop.minor, ", ",
                                   prop.multiProcessorCount, " SMs)");

  // ---- KV pools.
  const int64_t page_bytes = int64_t{2} * config.num_hidden_layers * config.num_key_value_heads *
                             options.page_size * config.head_dim * static_cast<int64_t>(kBf16);
  const int64_t num_pages = options.kv_cache_bytes / page_bytes;
  if (num_pages < 1 || num_pages > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv_cache_bytes=", options.kv_cache_bytes, " gives ", num_pages, " pages of ", page_bytes,
        " bytes; need between 1 and 2^30 pages"));
  }
  impl->num_pages = static_cast<int32_t>(num_pages);
  impl->pool_elems = static_cast<size_t>(num_pages) * config.num_key_value_heads *
                     options.page_size * config.head_dim;

  RETURN_IF_ERROR(impl->Init(options, host.get()));
  RETURN_IF_ERROR(impl->kv.Allocate(static_cast<size_t>(num_pages * page_bytes), "KV pools"));
  impl->allocator = std::make_unique<PageAllocator>(impl->num_pages);
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(impl->stream));
  LOG(INFO) << "cuda model ready on " << impl->device_name << ": layers="
            << config.num_hidden_layers << " weight_bytes=" << impl->weight_bytes
            << " kv_pages=" << num_pages << " page_size=" << options.page_size
            << " kv_bytes=" << impl->kv.bytes()
            << (impl->FastDecodeKernel() ? " decode=paged_decode" : " decode=generic")
            << (impl->TiledPrefillKernel() ? " prefill=tiled" : " prefill=generic");
  return std::unique_ptr<CudaModel>(new CudaModel(std::move(impl)));
}

absl::Status CudaModel::Impl::Init(const CudaModelOptions& o, const ModelWeights* host_weights) {
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CUBLAS_RETURN_IF_ERROR(cublasCreate(&cublas));
  CUBLAS_RETURN_IF_ERROR(cublasSetStream(cublas, stream));
  // A workspace of our own (32 MiB, cuBLAS's recommendation for Hopper), allocated once.
  RETURN_IF_ERROR(cublas_workspace.Allocate(size_t{32} << 20, "cuBLAS workspace"));
  CUBLAS_RETURN_IF_ERROR(
      cublasSetWorkspace(cublas, cublas_workspace.as<void>(), cublas_workspace.bytes()));
  for (Staging& s : staging) {
    CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
  }
  if (host_weights != nullptr) {
    const ModelWeights& w = *host_weights;
    bool qkv_bias = false, o_bias = false;
    for (const LayerWeights& l : w.layers) {
      qkv_bias |= !l.bq.empty() || !l.bk.empty() || !l.bv.empty();
      o_bias |= !l.bo.empty();
    }
    RETURN_IF_ERROR(AllocateWeights(qkv_bias, o_bias));
    RETURN_IF_ERROR(UploadWeights(w));
  } else {
    RETURN_IF_ERROR(AllocateWeights(config.qkv_bias, config.o_bias));
    RETURN_IF_ERROR(RandomWeights(o.random_seed));
  }
  return absl::OkStatus();
}

absl::Status CudaModel::Impl::AllocateWeights(bool has_qkv_bias, bool has_o_bias) {
  const size_t d = D(), f = F(), v = V(), qkv_w = QkvWidth(), q_w = static_cast<size_t>(Hq()) * HD();
  ArenaLayout mats, smalls_layout;
  struct Offsets {
    size_t wqkv, wo, w_gu, w_down, bqkv, bo, attn_norm, mlp_norm;
  };
  std::vector<Offsets> offs(config.num_hidden_layers);
  for (Offsets& o : offs) {
    o.wqkv = mats.Add(qkv_w * d * kBf16);
    o.wo = mats.Add(d * q_w * kBf16);
    o.w_gu = mats.Add(2 * f * d * kBf16);
    o.w_down = mats.Add(d * f * kBf16);
    o.bqkv = has_qkv_bias ? smalls_layout.Add(qkv_w * sizeof(float)) : SIZE_MAX;
    o.bo = has_o_bias ? smalls_layout.Add(d * sizeof(float)) : SIZE_MAX;
    o.attn_norm = smalls_layout.Add(d * sizeof(float));
    o.mlp_norm = smalls_layout.Add(d * sizeof(float));
  }
  const size_t layer_bytes = mats.bytes;
  const size_t embed_off = mats.Add(v * d * kBf16);
  const size_t lm_off = config.tie_word_embeddings ? embed_off : mats.Add(v * d * kBf16);
  const size_t final_norm_off = smalls_layout.Add(d * sizeof(float));
  const size_t inv_freq_off = smalls_layout.Add(HD() / 2 * sizeof(float));
  RETURN_IF_ERROR(matrices.Allocate(mats.bytes, "weights"));
  RETURN_IF_ERROR(smalls.Allocate(smalls_layout.bytes, "norm weights and biases"));
  auto mat = [&](size_t off) {
    return reinterpret_cast<uint16_t*>(matrices.as<char>() + off);
  };
  auto f32 = [&](size_t off) {
    return off == SIZE_MAX ? nullptr : reinterpret_cast<float*>(smalls.as<char>() + off);
  };
  layers.resize(config.num_hidden_layers);
  for (int l = 0; l < config.num_hidden_layers; ++l) {
    const Offsets& o = offs[l];
    layers[l] = Layer{mat(o.wqkv), mat(o.wo), mat(o.w_gu), mat(o.w_down),
                      f32(o.bqkv), f32(o.bo), f32(o.attn_norm), f32(o.mlp_norm)};
  }
  embed = mat(embed_off);
  lm_head = mat(lm_off);
  final_norm = f32(final_norm_off);
  inv_freq = f32(inv_freq_off);
  // Bytes a decode step streams: every layer's matrices and the LM head.
  weight_bytes = static_cast<int64_t>(layer_bytes) + static_cast<int64_t>(v * d * kBf16);
  const std::vector<float> freqs = RopeInvFrequencies(config);
  CUDA_RETURN_IF_ERROR(cudaMemcpy(inv_freq, freqs.data(), freqs.size() * sizeof(float),
                                  cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

absl::Status CudaModel::Impl::UploadWeights(const ModelWeights& w) {
  const size_t d = D(), f = F(), v = V(), q_w = static_cast<size_t>(Hq()) * HD(),
               kv_w = static_cast<size_t>(Hkv()) * HD();
  auto check = [](const std::vector<float>& t, size_t n, const std::string& name) {
    if (t.size() != n) {
      return absl::InvalidArgumentError(absl::StrCat("weight ", name, " has ", t.size(),
                                                     " elements, expected ", n));
    }
    return absl::OkStatus();
  };
  std::vector<uint16_t> bf;
  // Converts the concatenation of `parts` to bf16 and copies it to `dst`.
  auto upload_bf16 = [&](uint16_t* dst, std::initializer_list<const std::vector<float>*> parts) {
    bf.clear();
    for (const std::vector<float>* p : parts) {
      for (float x : *p) bf.push_back(FloatToBf16(x));
    }
    return CudaStatus(cudaMemcpy(dst, bf.data(), bf.size() * kBf16, cudaMemcpyHostToDevice),
                      "weight upload");
  };
  auto upload_f32 = [&](float* dst, const std::vector<float>& src) {
    return CudaStatus(
        cudaMemcpy(dst, src.data(), src.size() * sizeof(float), cudaMemcpyHostToDevice),
        "weight upload");
  };
  if (static_cast<int>(w.layers.size()) != config.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("weights have ", w.layers.size(),
                                                   " layers, config says ",
                                                   config.num_hidden_layers));
  }
  for (int i = 0; i < config.num_hidden_layers; ++i) {
    const LayerWeights& l = w.layers[i];
    const std::string p = absl::StrCat("layers.", i, ".");
    RETURN_IF_ERROR(check(l.wq, q_w * d, p + "q_proj"));
    RETURN_IF_ERROR(check(l.wk, kv_w * d, p + "k_proj"));
    RETURN_IF_ERROR(check(l.wv, kv_w * d, p + "v_proj"));
    RETURN_IF_ERROR(check(l.wo, d * q_w, p + "o_proj"));
    RETURN_IF_ERROR(check(l.w_gate, f * d, p + "gate_proj"));
    RETURN_IF_ERROR(check(l.w_up, f * d, p + "up_proj"));
    RETURN_IF_ERROR(check(l.w_down, d * f, p + "down_proj"));
    RETURN_IF_ERROR(check(l.attn_norm, d, p + "input_layernorm"));
    RETURN_IF_ERROR(check(l.mlp_norm, d, p + "post_attention_layernorm"));
    const Layer& g = layers[i];
    RETURN_IF_ERROR(upload_bf16(g.wqkv, {&l.wq, &l.wk, &l.wv}));
    RETURN_IF_ERROR(upload_bf16(g.wo, {&l.wo}));
    RETURN_IF_ERROR(upload_bf16(g.w_gu, {&l.w_gate, &l.w_up}));
    RETURN_IF_ERROR(upload_bf16(g.w_down, {&l.w_down}));
    RETURN_IF_ERROR(upload_f32(g.attn_norm, l.attn_norm));
    RETURN_IF_ERROR(upload_f32(g.mlp_norm, l.mlp_norm));
    if (g.bqkv != nullptr) {
      std::vector<float> b;
      b.reserve(q_w + 2 * kv_w);
      auto part = [&](const std::vector<float>& src, size_t n) {
        if (src.empty()) {
          b.insert(b.end(), n, 0.0f);
        } else {
          b.insert(b.end(), src.begin(), src.end());
        }
      };
      if (!l.bq.empty()) RETURN_IF_ERROR(check(l.bq, q_w, p + "q_proj.bias"));
      if (!l.bk.empty()) RETURN_IF_ERROR(check(l.bk, kv_w, p + "k_proj.bias"));
      if (!l.bv.empty()) RETURN_IF_ERROR(check(l.bv, kv_w, p + "v_proj.bias"));
      part(l.bq, q_w);
      part(l.bk, kv_w);
      part(l.bv, kv_w);
      RETURN_IF_ERROR(upload_f32(g.bqkv, b));
    }
    if (g.bo != nullptr) {
      const std::vector<float> zeros(d, 0.0f);
      if (!l.bo.empty()) RETURN_IF_ERROR(check(l.bo, d, p + "o_proj.bias"));
      RETURN_IF_ERROR(upload_f32(g.bo, l.bo.empty() ? zeros : l.bo));
    }
  }
  RETURN_IF_ERROR(check(w.embed, v * d, "embed_tokens"));
  RETURN_IF_ERROR(check(w.final_norm, d, "norm"));
  RETURN_IF_ERROR(upload_bf16(embed, {&w.embed}));
  if (lm_head != embed) {
    const std::vector<float>& head = w.lm_head.empty() ? w.embed : w.lm_head;
    RETURN_IF_ERROR(check(head, v * d, "lm_head"));
    RETURN_IF_ERROR(upload_bf16(lm_head, {&head}));
  }
  RETURN_IF_ERROR(upload_f32(final_norm, w.final_norm));
  return absl::OkStatus();
}

absl::Status CudaModel::Impl::RandomWeights(uint64_t seed) {
  const size_t d = D(), f = F(), v = V(), qkv_w = QkvWidth(), q_w = static_cast<size_t>(Hq()) * HD();
  // Uniform with the variance of normal(0, 0.02), as ModelWeights::Random.
  const float amp = 0.02f * 1.7320508f;
  uint64_t tensor = seed * 1000003ull;
  auto fill = [&](uint16_t* p, size_t n) {
    return CudaStatus(kernels::FillUniformBf16(p, n, amp, ++tensor, stream), "FillUniformBf16");
  };
  auto ones = [&](float* p, size_t n) {
    return CudaStatus(kernels::FillF32(p, n, 1.0f, stream), "FillF32");
  };
  auto zeros = [&](float* p, size_t n) {
    return p == nullptr ? absl::OkStatus()
                        : CudaStatus(kernels::FillF32(p, n, 0.0f, stream), "FillF32");
  };
  for (const Layer& l : layers) {
    RETURN_IF_ERROR(fill(l.wqkv, qkv_w * d));
    RETURN_IF_ERROR(fill(l.wo, d * q_w));
    RETURN_IF_ERROR(fill(l.w_gu, 2 * f * d));
    RETURN_IF_ERROR(fill(l.w_down, d * f));
    RETURN_IF_ERROR(zeros(l.bqkv, qkv_w));
    RETURN_IF_ERROR(zeros(l.bo, d));
    RETURN_IF_ERROR(ones(l.attn_norm, d));
    RETURN_IF_ERROR(ones(l.mlp_norm, d));
  }
  RETURN_IF_ERROR(fill(embed, v * d));
  if (lm_head != embed) RETURN_IF_ERROR(fill(lm_head, v * d));
  RETURN_IF_ERROR(ones(final_norm, d));
  return absl::OkStatus();
}

absl::StatusOr<CudaModel::Impl::LtPlan> CudaModel::Impl::Tune(const uint16_t* x, int n, int k,
                                                               const uint16_t* w, int m) {
  LtPlan plan;
  if (lt == nullptr) CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&lt));
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                                        &ta, sizeof(ta)));
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB,
                                                        &tb, sizeof(tb)));
  // A = W as a column-major [k x m] matrix (op T), B = x as [k x n], C = D = y as [m x n].
  CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan.a, CUDA_R_16BF, k, m, k));
  CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan.b, CUDA_R_16BF, k, n, k));
  CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan.c, CUDA_R_32F, m, n, m));
  cublasLtMatmulPreference_t pref = nullptr;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&pref));
  const size_t ws = cublas_workspace.bytes();
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                       sizeof(ws));
  cublasLtMatmulHeuristicResult_t results[16];
  int count = 0;
  const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(lt, plan.desc, plan.a, plan.b, plan.c,
                                                           plan.c, pref, 16, results, &count);
  cublasLtMatmulPreferenceDestroy(pref);
  if (hs != CUBLAS_STATUS_SUCCESS) count = 0;

  RETURN_IF_ERROR(EnsureBuffer(&tune_out, static_cast<size_t>(m) * n * sizeof(float), "tuning"));
  float* out = tune_out.as<float>();
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&e0));
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&e1));
  // Median-free: best of 3 timings of 4 back-to-back runs after one warm-up.
  auto time_us = [&](auto&& run) -> absl::StatusOr<double> {
    RETURN_IF_ERROR(run());
    double best = 1e30;
    for (int rep = 0; rep < 3; ++rep) {
      CUDA_RETURN_IF_ERROR(cudaEventRecord(e0, stream));
      for (int i = 0; i < 4; ++i) RETURN_IF_ERROR(run());
      CUDA_RETURN_IF_ERROR(cudaEventRecord(e1, stream));
      CUDA_RETURN_IF_ERROR(cudaEventSynchronize(e1));
      float ms = 0;
      CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, e0, e1));
      best = std::min(best, ms * 1e3 / 4);
    }
    return best;
  };
  auto timed = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(const double ex_us,
                     time_us([&] { return GemmEx(x, n, k, w, m, out, 0.0f); }));
    double best_us = ex_us;
    int best = -1;
    for (int i = 0; i < count; ++i) {
      if (results[i].state != CUBLAS_STATUS_SUCCESS || results[i].workspaceSize > ws) continue;
      plan.algo = results[i].algo;
      auto us = time_us([&] { return LtGemm(plan, x, w, out, 0.0f); });
      if (!us.ok()) {  // a candidate that fails to run is skipped
        cudaGetLastError();
        continue;
      }
      if (*us < best_us) {
        best_us = *us;
        best = i;
      }
    }
    plan.use_gemm_ex = best < 0;
    if (best >= 0) plan.algo = results[best].algo;
    const double bytes = 2.0 * m * k + 2.0 * n * k + 4.0 * m * n;
    LOG(INFO) << "gemm autotune m=" << m << " n=" << n << " k=" << k << ": cublasGemmEx "
              << ex_us << " us, " << count << " cublasLt candidates, chose "
              << (best < 0 ? std::string("cublasGemmEx") : absl::StrCat("cublasLt #", best))
              << " " << best_us << " us (" << bytes / best_us / 1e3 << " GB/s)";
    return absl::OkStatus();
  };
  const absl::Status st = timed();
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  RETURN_IF_ERROR(st);
  return plan;
}

absl::Status CudaModel::Impl::EnsureCapacity(int rows, int logit_rows) {
  if (rows > cap_rows) {
    const size_t n = std::max(16, std::max(rows, cap_rows * 2));
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    const size_t d = D(), qo = static_cast<size_t>(Hq()) * HD();
    RETURN_IF_ERROR(x.Allocate(n * d * sizeof(float), "activations"));
    RETURN_IF_ERROR(h.Allocate(n * d * kBf16, "activations"));
    RETURN_IF_ERROR(qkv.Allocate(n * QkvWidth() * sizeof(float), "activations"));
    RETURN_IF_ERROR(q.Allocate(n * qo * kBf16, "activations"));
    RETURN_IF_ERROR(attn.Allocate(n * qo * kBf16, "activations"));
    RETURN_IF_ERROR(gu.Allocate(n * 2 * F() * sizeof(float), "activations"));
    RETURN_IF_ERROR(act.Allocate(n * F() * kBf16, "activations"));
    cap_rows = static_cast<int>(n);
  }
  if (logit_rows > cap_logit_rows) {
    const size_t n = std::max(16, std::max(logit_rows, cap_logit_rows * 2));
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    RETURN_IF_ERROR(normed.Allocate(n * D() * kBf16, "logits"));
    RETURN_IF_ERROR(logits.Allocate(n * V() * sizeof(float), "logits"));
    RETURN_IF_ERROR(greedy.Allocate(n * sizeof(int32_t), "logits"));
    cap_logit_rows = static_cast<int>(n);
  }
  return absl::OkStatus();
}

absl::StatusOr<int32_t*> CudaModel::Impl::UploadMeta(const std::vector<int32_t>& m) {
  if (m.size() > meta_cap) {
    const size_t n = std::max(m.size(), meta_cap * 2);
    RETURN_IF_ERROR(EnsureBuffer(&meta, n * sizeof(int32_t), "step metadata"));
    meta_cap = n;
  }
  Staging& s = staging[next_staging];
  next_staging = (next_staging + 1) % static_cast<int>(staging.size());
  // The copy that last read this slot must be done before it is overwritten.
  CUDA_RETURN_IF_ERROR(cudaEventSynchronize(s.done));
  if (m.size() > s.cap) {
    if (s.host != nullptr) CUDA_RETURN_IF_ERROR(cudaFreeHost(s.host));
    s.host = nullptr;
    const size_t n = std::max(m.size(), s.cap * 2);
    CUDA_RETURN_IF_ERROR(cudaMallocHost(reinterpret_cast<void**>(&s.host), n * sizeof(int32_t)));
    s.cap = n;
  }
  std::memcpy(s.host, m.data(), m.size() * sizeof(int32_t));
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(meta.as<int32_t>(), s.host, m.size() * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, stream));
  CUDA_RETURN_IF_ERROR(cudaEventRecord(s.done, stream));
  return meta.as<int32_t>();
}

namespace {

// Whether decode steps run `plan`'s selection on the device (the selection kernels of
// selection_prhs.h: PrHS, oracle top-k as kExact rows, StreamingLLM as kWindow rows).
bool SelectsOnDevice(const SelectionPlan* plan) {
  return plan != nullptr && (plan->policy == SelectionPolicy::kPrhs ||
                             plan->policy == SelectionPolicy::kOracle ||
                             plan->policy == SelectionPolicy::kStreaming ||
                             plan->policy == SelectionPolicy::kQuest ||
                             plan->policy == SelectionPolicy::kH2O ||
                             plan->policy == SelectionPolicy::kHShare);
}
// Whether the policy keeps per-sequence state on the device (a state slot: CIS anchors, the
// oracle's and Quest's chosen sets, H2O's tracked tokens and scores).
bool HasSelectionState(const SelectionPlan* plan) {
  return plan != nullptr &&
         (plan->policy == SelectionPolicy::kPrhs || plan->policy == SelectionPolicy::kOracle ||
          plan->policy == SelectionPolicy::kQuest || plan->policy == SelectionPolicy::kH2O ||
          plan->policy == SelectionPolicy::kHShare);
}
// H2OSelector's budget min(max(B(t), 1), t) and recent window min(local, budget) at length t.
int64_t H2OBudget(const SelectionPlan& plan, int64_t t) {
  return std::min<int64_t>(std::max<int64_t>(plan.Budget(t), 1), t);
}
int64_t H2ORecent(const SelectionPlan& plan, int layer, int64_t t) {
  return std::min<int64_t>(plan.layers[layer].local, H2OBudget(plan, t));
}
// Quest's pages to keep at length t: max(1, ceil(B(t) / page)) (QuestSelector), and whether that
// covers every page (the row then attends densely, as QuestSelector).
int64_t QuestPages(const SelectionPlan& plan, int64_t t, int page) {
  return std::max<int64_t>(1, (plan.Budget(t) + page - 1) / page);
}
bool QuestDense(const SelectionPlan& plan, int64_t t, int page) {
  return QuestPages(plan, t, page) >= (t + page - 1) / page;
}
// Whether the plan's k differs between kv heads (the δ-controller's per-head scales).
bool PerHeadK(const SelectionPlan& plan) {
  for (const LayerSelectionPlan& lp : plan.layers) {
    if (!lp.head_k_scale.empty()) return true;
  }
  return false;
}
// The kernels' k for (layer, kv head) at length t, as the CPU selectors choose it: PrHS's
// TopK (with the per-head scale), the oracle's min(B(t), t), Quest's pages (page size 16);
// 0 for streaming (no top-k). The
// caller marks rows whose budget covers the sequence dense (-1) separately.
int64_t DeviceTopK(const SelectionPlan& plan, int layer, int64_t t, int kv_head, int max_context) {
  int64_t k = 0;
  if (plan.policy == SelectionPolicy::kPrhs || plan.policy == SelectionPolicy::kHShare) {
    k = plan.TopK(layer, t, kv_head);
  }
  if (plan.policy == SelectionPolicy::kOracle) k = std::min<int64_t>(plan.Budget(t), t);
  if (plan.policy == SelectionPolicy::kQuest) k = QuestPages(plan, t, 16);  // pages
  if (plan.policy == SelectionPolicy::kH2O) k = H2OBudget(plan, t) - H2ORecent(plan, layer, t);
  return std::clamp<int64_t>(k, 0, max_context);
}

}  // namespace

absl::Status CudaModel::Impl::GrowPrhsPools(int slots, int stride, int h2o, bool hshare) {
  if (slots <= prhs_slots && stride <= prhs_stride && h2o <= h2o_stride &&
      (!hshare || hs_pools)) {
    return absl::OkStatus();
  }
  slots = std::max(slots, prhs_slots);
  stride = std::max(stride, prhs_stride);
  h2o = std::max(h2o, h2o_stride);
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  const size_t L = config.num_hidden_layers, hkv = Hkv();
  const size_t q_row = static_cast<size_t>(Hq() / Hkv()) * HD() * kBf16;
  // Copies [L][old_rows][width_old] into [L][new_rows][width_new] (rows = slots * Hkv).
  auto grow = [&](DeviceBuffer* buf, size_t old_w, size_t new_w, const char* what) {
    DeviceBuffer fresh;
    RETURN_IF_ERROR(fresh.Allocate(L * slots * hkv * new_w, what));
    if (prhs_slots > 0 && old_w > 0) {
      const size_t old_rows = static_cast<size_t>(prhs_slots) * hkv;
      for (size_t l = 0; l < L; ++l) {
        CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(
            fresh.as<char>() + l * slots * hkv * new_w, new_w,
            buf->as<char>() + l * old_rows * old_w, old_w, old_w, old_rows,
            cudaMemcpyDeviceToDevice, stream));
      }
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    }
    buf->Swap(fresh);
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(grow(&prhs_anchor_q, q_row, q_row, "PrHS anchor queries"));
  RETURN_IF_ERROR(grow(&prhs_reuse, 4, 4, "PrHS reuse counts"));
  RETURN_IF_ERROR(grow(&prhs_valid, 4, 4, "PrHS valid flags"));
  RETURN_IF_ERROR(grow(&prhs_count, 4, 4, "PrHS anchor counts"));
  RETURN_IF_ERROR(grow(&prhs_set, static_cast<size_t>(prhs_stride) * 4,
                       static_cast<size_t>(stride) * 4, "PrHS anchor sets"));
  if (h2o > 0) {
    // The first H2O pools copy nothing (old width 0): no live sequence has H2O state yet, and a
    // slot's state is read only once its first H2O step has written it (valid).
    const size_t old_w = static_cast<size_t>(h2o_stride) * 4;
    RETURN_IF_ERROR(grow(&h2o_pos, old_w, static_cast<size_t>(h2o) * 4, "H2O positions"));
    RETURN_IF_ERROR(grow(&h2o_acc, old_w, static_cast<size_t>(h2o) * 4, "H2O scores"));
    RETURN_IF_ERROR(grow(&h2o_count, h2o_stride > 0 ? 4 : 0, 4, "H2O counts"));
    h2o_stride = h2o;
  }
  if (hshare || hs_pools) {  // the first HShare pools copy nothing (no live HShare state)
    const size_t w = static_cast<size_t>(HD()) * 4;
    RETURN_IF_ERROR(grow(&hs_channels, hs_pools ? w : 0, w, "HShare channels"));
    RETURN_IF_ERROR(grow(&hs_source, hs_pools ? 4 : 0, 4, "HShare sources"));
    hs_pools = true;
  }
  for (int i = slots - 1; i >= prhs_slots; --i) prhs_free_slots.push_back(i);
  prhs_slots = slots;
  prhs_stride = stride;
  return absl::OkStatus();
}

absl::Status CudaModel::Impl::AcquirePrhsSlot(Sequence* s) {
  if (s->prhs_slot >= 0) return absl::OkStatus();
  if (prhs_free_slots.empty()) {
    RETURN_IF_ERROR(GrowPrhsPools(std::max(8, 2 * prhs_slots), std::max(prhs_stride, 64)));
  }
  s->prhs_slot = prhs_free_slots.back();
  prhs_free_slots.pop_back();
  // valid = reuse = count = 0 for the slot's Hkv rows in every layer.
  for (int l = 0; l < config.num_hidden_layers; ++l) {
    const size_t row0 = (static_cast<size_t>(l) * prhs_slots + s->prhs_slot) * Hkv();
    for (DeviceBuffer* b : {&prhs_valid, &prhs_reuse, &prhs_count}) {
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(b->as<int32_t>() + row0, 0,
                                           static_cast<size_t>(Hkv()) * sizeof(int32_t), stream));
    }
  }
  return absl::OkStatus();
}

void CudaModel::Impl::AccountSelection(const PendingSelection& p) const {
  const int L = config.num_hidden_layers, hkv = Hkv(), B = p.batch, rows = B * hkv;
  const int32_t* refresh = p.host;
  const float* delta = reinterpret_cast<const float*>(p.host + static_cast<size_t>(L) * rows);
  const int32_t* indptr = p.host + 2 * static_cast<size_t>(L) * rows;
  for (int b = 0; b < B; ++b) {
    SelectionTelemetry* t = p.telemetry[b];
    if (t == nullptr) continue;
    const int len = p.lens[b];
    const SelectionPolicy policy = p.policy[b];
    const size_t units = static_cast<size_t>(L) * hkv;
    if (t->refreshes_per_unit.size() < units) t->refreshes_per_unit.resize(units, 0);
    // Same order as the CPU selectors: layer by layer, kv head by kv head. What each counts:
    // PrhsSelector shares, refreshes (t keys scored each) and δ of the previous set at a
    // refresh; OracleSelector a refresh per non-dense selection (no δ); QuestSelector a refresh
    // per non-dense selection (per layer only); StreamingSelector only the selection itself.
    for (int l = 0; l < L; ++l) {
      const int32_t* ip = indptr + static_cast<size_t>(l) * (rows + 1);
      for (int h = 0; h < hkv; ++h) {
        const int r = b * hkv + h;
        const size_t lr = static_cast<size_t>(l) * rows + r;
        const int32_t k = p.per_head ? p.topk[static_cast<size_t>(l) * rows + r]
                                     : p.topk[static_cast<size_t>(l) * B + b];
        // H2OSelector counts neither refreshes nor shares.
        if (k >= 0 && policy != SelectionPolicy::kStreaming && policy != SelectionPolicy::kH2O) {
          if (refresh[lr] == 0) {
            ++t->shares;
            ++t->shares_per_layer[l];
          } else {
            ++t->refreshes;
            ++t->refreshes_per_layer[l];
            // QuestSelector and HShareSelector count neither.
            if (policy != SelectionPolicy::kQuest && policy != SelectionPolicy::kHShare) {
              ++t->refreshes_per_unit[static_cast<size_t>(l) * hkv + h];
              t->scored_keys_sum += len;
            }
            if (refresh[lr] == 2 && policy == SelectionPolicy::kPrhs) {
              t->refresh_delta.push_back(delta[lr]);
              t->refresh_delta_layer.push_back(static_cast<int16_t>(l));
              t->refresh_delta_head.push_back(static_cast<int16_t>(h));
            }
          }
        }
        const int64_t kept = ip[r + 1] - ip[r];
        ++t->selections;
        t->kept_tokens_sum += kept;
        t->kept_fraction_sum += len > 0 ? static_cast<double>(kept) / len : 1.0;
        t->context_keys_sum += len;
      }
    }
  }
}

absl::Status CudaModel::Impl::FlushSelections(bool wait) {
  while (!prhs_pending.empty()) {
    PendingSelection& p = prhs_pending.front();
    if (wait || prhs_pending.size() > kMaxPendingSelections) {
      CUDA_RETURN_IF_ERROR(cudaEventSynchronize(p.done));
    } else {
      const cudaError_t q = cudaEventQuery(p.done);
      if (q == cudaErrorNotReady) break;
      CUDA_RETURN_IF_ERROR(q);
    }
    AccountSelection(p);
    prhs_spare.push_back(std::move(p));
    prhs_pending.pop_front();
  }
  return absl::OkStatus();
}

absl::Status CudaModel::Impl::Run(const std::vector<ItemDesc>& items, bool causal,
                                  const int32_t* d_tokens, int32_t* d_next,
                                  const CudaKvSelection* selection,
                                  std::vector<std::vector<float>>* host_logits,
                                  std::vector<int32_t>* greedy_out,
                                  std::span<const TokenDraw> draws) {
  const ModelConfig& c = config;
  // ---- Validate everything before touching state.
  std::unordered_set<SeqId> seen;
  int64_t pages_needed = 0, total = 0;
  bool all_single = true, uninitialized = false;
  const SelectionPlan* prhs_ref = nullptr;  // the first item with a prhs plan
  const SelectionPlan* hs_ref = nullptr;    // the first item with an hshare plan
  bool use_prhs = false;                     // some item selects on the device (any policy)
  bool per_head = false;                     // some item's k differs between kv heads
  for (size_t b = 0; b < items.size(); ++b) {
    const ItemDesc& it = items[b];
    auto s = seqs.find(it.seq);
    if (s == seqs.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch item ", b, ": unknown sequence ", it.seq));
    }
    if (!seen.insert(it.seq).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch item ", b, ": sequence ", it.seq, " appears twice in one step"));
    }
    if (it.n < 1) return absl::InvalidArgumentError(absl::StrCat("batch item ", b, ": no tokens"));
    for (size_t i = 0; i < it.tokens.size(); ++i) {
      if (it.tokens[i] < 0 || it.tokens[i] >= c.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat("batch item ", b, ": token id ",
                                                       it.tokens[i], " at position ", i,
                                                       " is outside [0, ", c.vocab_size, ")"));
      }
    }
    const int64_t new_len = s->second.length + static_cast<int64_t>(it.n);
    if (new_len > max_context) {
      return absl::InvalidArgumentError(absl::StrCat(
          "batch item ", b, ": sequence length ", new_len, " exceeds max_context ", max_context));
    }
    pages_needed += PagesFor(new_len, page_size) -
                    static_cast<int64_t>(s->second.page_table.size());
    total += it.n;
    all_single &= it.n == 1;
    uninitialized |= it.uninitialized > 0;
    if (it.plan != nullptr) {
      absl::Status ps = SupportsPlan(c, page_size, *it.plan);
      if (!ps.ok()) {
        return absl::Status(ps.code(), absl::StrCat("batch item ", b, ": ", ps.message()));
      }
      if (SelectsOnDevice(it.plan)) {
        if (it.n != 1 || it.telemetry == nullptr) {
          return absl::InvalidArgumentError(absl::StrCat(
              "batch item ", b, ": a ", it.plan->policy_name,
              " plan needs a single-token (decode) item and telemetry"));
        }
        use_prhs = true;
        per_head |= PerHeadK(*it.plan);
      }
      if (it.plan->policy == SelectionPolicy::kHShare) {
        if (hs_ref == nullptr) {
          hs_ref = it.plan;
        } else {
          for (int l = 0; l < c.num_hidden_layers; ++l) {
            const LayerSelectionPlan &x = hs_ref->layers[l], &y = it.plan->layers[l];
            if (x.refresh_interval != y.refresh_interval ||
                x.approx_channels != y.approx_channels) {
              return absl::InvalidArgumentError(absl::StrCat(
                  "batch item ", b, ": its hshare plan's layer ", l,
                  " refresh_interval/approx_channels differ from another item's in the same step "
                  "(run such sequences in separate steps)"));
            }
          }
        }
      }
      if (it.plan->policy == SelectionPolicy::kPrhs) {
        if (prhs_ref == nullptr) {
          prhs_ref = it.plan;
        } else {
          for (int l = 0; l < c.num_hidden_layers; ++l) {
            const LayerSelectionPlan &x = prhs_ref->layers[l], &y = it.plan->layers[l];
            if (x.tau != y.tau || x.max_reuse != y.max_reuse || x.dilate_r != y.dilate_r ||
                x.dilate_m_fraction != y.dilate_m_fraction) {
              return absl::InvalidArgumentError(absl::StrCat(
                  "batch item ", b, ": its prhs plan's layer ", l,
                  " tau/max_reuse/dilation differ from another item's in the same step (run "
                  "such sequences in separate steps)"));
            }
          }
        }
      }
    }
  }
  // PSAW prefill band (Engine::Step: causal items of more than one token): per layer and item
  // the drop fraction and sink; any band at all makes the step carry the tables.
  bool use_band = false;
  for (size_t b = 0; b < items.size(); ++b) {
    const SelectionPlan* pp = items[b].prefill_plan;
    if (pp == nullptr) continue;
    absl::Status ps = SupportsPlan(c, page_size, *pp);
    if (!ps.ok()) {
      return absl::Status(ps.code(),
                          absl::StrCat("batch item ", b, ": prefill plan: ", ps.message()));
    }
    if (causal && items[b].n > 1) {
      for (const LayerSelectionPlan& lp : pp->layers) use_band |= lp.psaw_drop_fraction > 0;
    }
  }
  // ETF (Engine::Step's conditions: a causal step whose only item prefills a whole prompt from
  // position 0 with a prefill plan; other steps ignore ETF, as the CPU engine does): layer l
  // computes rows [etf_frozen[l], N) only — floor(f_l · N) rounded down to whole pages, the last
  // row always computed, non-decreasing over layers. Frozen rows keep the residual they had; their
  // K/V pages at layer l are copies of layer l − 1's (made before l's attention), which is what
  // the CPU's alias table reads.
  std::vector<int32_t> etf_frozen(c.num_hidden_layers, 0);
  int64_t etf_aliased = 0;
  if (causal && items.size() == 1 && items[0].n > 1 && items[0].uninitialized == 0 &&
      items[0].prefill_plan != nullptr && seqs[items[0].seq].length == 0) {
    const std::vector<int64_t> frozen =
        EtfFrozenRows(*items[0].prefill_plan, c.num_hidden_layers, items[0].n, page_size);
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      etf_frozen[l] = static_cast<int32_t>(frozen[l]);
      etf_aliased += frozen[l] / page_size;
    }
    if (etf_frozen[0] > 0) {  // SupportsPlan refuses it; never reached
      return absl::InternalError("ETF: rows frozen at layer 0 have no K/V to alias");
    }
  }
  if (items.empty()) return absl::OkStatus();
  if (total > (int64_t{1} << 24)) {
    return absl::InvalidArgumentError(absl::StrCat("step has ", total, " tokens (max 2^24)"));
  }
  const bool fast_decode = all_single && FastDecodeKernel();
  if (use_prhs && (!fast_decode || selection != nullptr || uninitialized)) {
    return absl::InvalidArgumentError(
        "prhs / oracle / streaming plans need a step of single-token items on the fast decode "
        "kernel and no CudaKvSelection (run prefill chunks in a separate step)");
  }
  if (selection != nullptr) {
    if (!fast_decode) {
      return absl::InvalidArgumentError(
          "selection: sparse decode needs single-token items, head_dim 64 or 128 and page_size "
          "16 (and not force_generic_attention)");
    }
    const size_t n = selection->d_indptr.size();
    if ((n != 1 && n != static_cast<size_t>(c.num_hidden_layers)) ||
        selection->d_indices.size() != n || selection->max_list_len < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "selection: d_indptr/d_indices must have 1 or num_hidden_layers (",
          c.num_hidden_layers, ") entries each, and max_list_len >= 0"));
    }
    for (size_t l = 0; l < n; ++l) {
      if (selection->d_indptr[l] == nullptr || selection->d_indices[l] == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("selection: layer ", l, " list is null"));
      }
    }
  }

  // ---- PrHS state: a slot per selecting sequence (kept until the sequence is freed; a cleared
  // state is what a new sequence starts from, so this needs no undo on a later error) and anchor
  // rows long enough for every k the plans ask for up to max_context.
  const int NL = c.num_hidden_layers;
  bool use_h2o = false;
  if (use_prhs) {
    int stride = prhs_stride;
    int h2o = 0;
    for (const ItemDesc& it : items) {
      if (!HasSelectionState(it.plan)) continue;
      const bool prhs = it.plan->policy == SelectionPolicy::kPrhs;
      if (it.plan->policy == SelectionPolicy::kH2O) {
        // Tracked entries: kept heavy + recent <= the budget, at every length up to max_context.
        use_h2o = true;
        const int64_t len = seqs[it.seq].length + 1;
        for (const int64_t t : {len, static_cast<int64_t>(max_context)}) {
          h2o = static_cast<int>(std::max<int64_t>(h2o, H2OBudget(*it.plan, t)));
        }
      }
      const int heads = PerHeadK(*it.plan) ? Hkv() : 1;
      const int64_t len = seqs[it.seq].length + 1;
      for (int l = 0; l < NL; ++l) {
        const LayerSelectionPlan& lp = it.plan->layers[l];
        for (const int64_t t : {len, static_cast<int64_t>(max_context)}) {
          for (int h = 0; h < heads; ++h) {
            const int64_t k = DeviceTopK(*it.plan, l, t, heads > 1 ? h : -1, max_context);
            const int64_t m =
                prhs ? static_cast<int64_t>(lp.dilate_m_fraction * static_cast<double>(k)) : 0;
            stride = static_cast<int>(std::max<int64_t>(
                stride, std::min<int64_t>(k + 2 * lp.dilate_r * m, max_context)));
          }
        }
      }
    }
    RETURN_IF_ERROR(GrowPrhsPools(prhs_slots, std::max(64, (stride + 63) / 64 * 64),
                                  h2o > 0 ? std::max(64, (h2o + 63) / 64 * 64) : 0,
                                  hs_ref != nullptr));
    for (const ItemDesc& it : items) {
      if (HasSelectionState(it.plan)) RETURN_IF_ERROR(AcquirePrhsSlot(&seqs[it.seq]));
    }
  }

  // ---- Pages (all or nothing; returned on any later failure).
  ASSIGN_OR_RETURN(std::vector<int32_t> fresh,
                   allocator->Allocate(static_cast<int32_t>(pages_needed)));
  auto give_back = [&](absl::Status st) {
    allocator->Free(fresh).IgnoreError();
    return st;
  };

  std::vector<int> calibrating;  // items whose HShare state is calibrated this step
  // ---- Metadata: packed int32 [tokens N][pos N][slot N][row_seq N][logit_rows R]
  //      [page_indptr B+1][seq_lens B][page_indices P].
  const int B = static_cast<int>(items.size());
  const int N = static_cast<int>(total);
  std::vector<std::vector<int32_t>> tables(B);
  std::vector<int32_t> tokens, pos, slot, row_seq, logit_rows, page_indptr{0}, seq_lens,
      page_indices;
  std::vector<int> logit_count(B);
  int max_len = 0;
  {
    size_t next_fresh = 0;
    for (int b = 0; b < B; ++b) {
      const ItemDesc& it = items[b];
      const Sequence& s = seqs[it.seq];
      tables[b] = s.page_table;
      const int new_len = s.length + it.n;
      while (static_cast<int32_t>(tables[b].size()) < PagesFor(new_len, page_size)) {
        tables[b].push_back(fresh[next_fresh++]);
      }
      for (int i = 0; i < it.n; ++i) {
        const int p = s.length + i;
        if (!it.tokens.empty()) tokens.push_back(it.tokens[i]);
        pos.push_back(p);
        slot.push_back(tables[b][p / page_size] * page_size + p % page_size);
        row_seq.push_back(b);
        if (!it.no_logits && (it.all_logits || i == it.n - 1)) {
          logit_rows.push_back(static_cast<int32_t>(pos.size()) - 1);
        }
      }
      logit_count[b] = it.no_logits ? 0 : it.all_logits ? it.n : 1;
      page_indptr.push_back(page_indptr.back() + static_cast<int32_t>(tables[b].size()));
      seq_lens.push_back(new_len);
      page_indices.insert(page_indices.end(), tables[b].begin(), tables[b].end());
      max_len = std::max(max_len, new_len);
    }
  }
  auto commit = [&]() {
    for (int b = 0; b < B; ++b) {
      Sequence& s = seqs[items[b].seq];
      s.length += items[b].n;
      s.page_table = std::move(tables[b]);
      const SelectionPlan* pp = items[b].plan;
      if (use_prhs && pp != nullptr && pp->policy == SelectionPolicy::kQuest) {
        s.quest_seen = s.length;  // this step folded every position into the bounds
      }
    }
    for (int b : calibrating) seqs[items[b].seq].hs_calibrated = true;
    if (etf_aliased > 0) seqs[items[0].seq].aliased_pages = etf_aliased;
  };
  if (uninitialized) {
    commit();
    return absl::OkStatus();
  }
  const int R = static_cast<int>(logit_rows.size());
  std::vector<int32_t> m;
  m.reserve(tokens.size() + 4 * N + R + 2 * B + 1 + page_indices.size());
  auto append = [&](const std::vector<int32_t>& v) {
    const size_t off = m.size();
    m.insert(m.end(), v.begin(), v.end());
    return off;
  };
  const size_t o_tokens = append(tokens), o_pos = append(pos), o_slot = append(slot),
               o_row_seq = append(row_seq), o_logit_rows = append(logit_rows),
               o_indptr = append(page_indptr), o_lens = append(seq_lens),
               o_indices = append(page_indices);
  // PrHS: per layer and item the kernels' k (-1 = attend densely: a dense item, or a budget
  // that covers the sequence, as PrhsSelector), the items' state slots, and bounds on the lists.
  // Per item its mode (kCis / kExact / kWindow) and per layer its sink and local window: PrHS
  // the plan's; the oracle none (candidates [0, t), the list is its top-k); streaming the plan's
  // sink and a window of max(B(t), sink + 1) − sink (StreamingSelector).
  std::vector<int32_t> topk_tab, slot_tab, mode_tab, sink_tab, local_tab;
  // HShare calibration this step: per item kExact for the items calibrating (their first
  // non-dense hshare step), kWindow (untouched) for every other.
  std::vector<int32_t> cal_tab;
  int64_t index_capacity = 0;
  int max_list = 1;
  const int topk_cols = per_head ? B * Hkv() : B;
  if (use_prhs) {
    topk_tab.assign(static_cast<size_t>(NL) * topk_cols, -1);
    slot_tab.assign(B, 0);
    mode_tab.assign(B, kernels::kPrhsModeCis);
    cal_tab.assign(B, kernels::kPrhsModeWindow);
    sink_tab.assign(static_cast<size_t>(NL) * B, 0);
    local_tab.assign(static_cast<size_t>(NL) * B, 0);
    for (int b = 0; b < B; ++b) {
      const ItemDesc& it = items[b];
      const int t = seq_lens[b];
      int bound = t;
      if (SelectsOnDevice(it.plan)) {
        const SelectionPlan& plan = *it.plan;
        const bool heads = PerHeadK(plan);
        if (HasSelectionState(it.plan)) slot_tab[b] = seqs[it.seq].prhs_slot;
        int fixed = 0;
        for (int l = 0; l < NL; ++l) {
          const LayerSelectionPlan& lp = plan.layers[l];
          const size_t lb = static_cast<size_t>(l) * B + b;
          if (plan.policy == SelectionPolicy::kPrhs || plan.policy == SelectionPolicy::kHShare) {
            sink_tab[lb] = lp.sink;
            local_tab[lb] = lp.local;
          } else if (plan.policy == SelectionPolicy::kH2O) {
            local_tab[lb] = static_cast<int32_t>(H2ORecent(plan, l, t));  // no sink
          } else if (plan.policy == SelectionPolicy::kStreaming) {
            sink_tab[lb] = lp.sink;
            local_tab[lb] = static_cast<int32_t>(std::min<int64_t>(
                std::max<int64_t>(plan.Budget(t), lp.sink + 1) - lp.sink, max_context));
          }
          fixed = std::max(fixed, sink_tab[lb] + local_tab[lb]);
        }
        // H2O never attends densely: evicted tokens stay out even when B(t) >= t.
        const bool dense_row = plan.policy == SelectionPolicy::kH2O ? false
                               : plan.policy == SelectionPolicy::kQuest
                                   ? QuestDense(plan, t, page_size)
                                   : plan.Budget(t) >= t;
        if (plan.policy == SelectionPolicy::kStreaming) {
          mode_tab[b] = kernels::kPrhsModeWindow;
          for (int l = 0; l < NL; ++l) {
            for (int h = 0; h < (per_head ? Hkv() : 1); ++h) {
              topk_tab[static_cast<size_t>(l) * topk_cols + (per_head ? b * Hkv() + h : b)] = 0;
            }
          }
          bound = std::min(t, fixed);
        } else if (!dense_row) {  // else dense rows, as the CPU selectors
          if (plan.policy == SelectionPolicy::kOracle) mode_tab[b] = kernels::kPrhsModeExact;
          if (plan.policy == SelectionPolicy::kQuest) mode_tab[b] = kernels::kPrhsModePages;
          if (plan.policy == SelectionPolicy::kH2O) mode_tab[b] = kernels::kPrhsModeHeavy;
          if (plan.policy == SelectionPolicy::kHShare) {
            mode_tab[b] = kernels::kPrhsModeApprox;
            if (!seqs[it.seq].hs_calibrated) {
              cal_tab[b] = kernels::kPrhsModeExact;
              calibrating.push_back(b);
            }
          }
          for (int l = 0; l < NL; ++l) {
            for (int h = 0; h < (per_head ? Hkv() : 1); ++h) {
              topk_tab[static_cast<size_t>(l) * topk_cols + (per_head ? b * Hkv() + h : b)] =
                  static_cast<int32_t>(DeviceTopK(plan, l, t, heads ? h : -1, max_context));
            }
          }
          bound = static_cast<int>(std::min<int64_t>(t, int64_t{fixed} + prhs_stride));
          if (plan.policy == SelectionPolicy::kQuest) {
            bound = static_cast<int>(std::min<int64_t>(t, int64_t{page_size} * prhs_stride));
          }
        }
      }
      index_capacity += static_cast<int64_t>(Hkv()) * bound;
      max_list = std::max(max_list, bound);
    }
  }
  const size_t o_topk = append(topk_tab), o_state_slot = append(slot_tab),
               o_mode = append(mode_tab), o_sink = append(sink_tab), o_local = append(local_tab),
               o_cal = append(cal_tab);
  // Quest: per item the first logical page whose bounds this step recomputes (the page of the
  // first position not folded at its last quest step; none for other items).
  bool use_quest = false;
  size_t o_bounds_from = 0;
  if (use_prhs) {
    std::vector<int32_t> from(B, INT32_MAX);
    for (int b = 0; b < B; ++b) {
      const SelectionPlan* pp = items[b].plan;
      if (pp == nullptr || pp->policy != SelectionPolicy::kQuest) continue;
      from[b] = seqs[items[b].seq].quest_seen / page_size;
      use_quest = true;
    }
    if (use_quest) o_bounds_from = append(from);
  }
  // PSAW: the prefill band per [layer][item] (f64 drop fraction, packed as int32 pairs at an
  // 8-byte aligned offset, then int32 sinks; f = 0 for items without a band), and for PrHS
  // decode the candidates' lower bound cand_lo[layer][item] = (int64) (f · t), as PrhsSelector.
  size_t o_band = 0, o_band_sink = 0, o_cand_lo = 0;
  if (use_band) {
    if (m.size() % 2 != 0) m.push_back(0);
    o_band = m.size();
    std::vector<int32_t> sinks(static_cast<size_t>(NL) * B, 0);
    for (int l = 0; l < NL; ++l) {
      for (int b = 0; b < B; ++b) {
        const SelectionPlan* pp = items[b].prefill_plan;
        const bool on = pp != nullptr && causal && items[b].n > 1;
        const double f = on ? pp->layers[l].psaw_drop_fraction : 0.0;
        int32_t halves[2];
        std::memcpy(halves, &f, sizeof(f));
        m.push_back(halves[0]);
        m.push_back(halves[1]);
        if (on) sinks[static_cast<size_t>(l) * B + b] = pp->layers[l].sink;
      }
    }
    o_band_sink = append(sinks);
  }
  // Query tiles of the tiled prefill kernel (rows of one item are one sequence, ascending), per
  // layer over the rows it computes (all of them unless ETF froze a prefix).
  std::vector<size_t> o_qtiles(NL, 0);
  std::vector<int> num_qtiles(NL, 0);
  const bool tiled_prefill_step = !fast_decode && TiledPrefillKernel();
  if (tiled_prefill_step) {
    for (int l = 0; l < NL; ++l) {
      if (l > 0 && etf_frozen[l] == etf_frozen[l - 1]) {
        o_qtiles[l] = o_qtiles[l - 1];
        num_qtiles[l] = num_qtiles[l - 1];
        continue;
      }
      const int r0 = etf_frozen[l];
      const std::vector<int32_t> qtiles =
          kernels::PrefillQueryTiles(row_seq.data() + r0, pos.data() + r0, N - r0);
      num_qtiles[l] = static_cast<int>(qtiles.size() / 2);
      o_qtiles[l] = append(qtiles);
    }
  }
  bool use_cand_lo = false;
  if (use_prhs) {
    std::vector<int32_t> cand_lo(static_cast<size_t>(NL) * B, 0);
    for (int b = 0; b < B; ++b) {
      const SelectionPlan* pp = items[b].plan;
      if (pp == nullptr || pp->policy != SelectionPolicy::kPrhs) continue;
      for (int l = 0; l < NL; ++l) {
        const double f = pp->layers[l].psaw_drop_fraction;
        if (f <= 0) continue;
        cand_lo[static_cast<size_t>(l) * B + b] =
            static_cast<int32_t>(static_cast<int64_t>(f * static_cast<double>(seq_lens[b])));
        use_cand_lo = true;
      }
    }
    if (use_cand_lo) o_cand_lo = append(cand_lo);
  }
  // Device sampling: per logits row its SamplingRow (an item's last row gets its draw; earlier
  // rows of all_logits items are greedy) and u, at 8-byte aligned offsets; none when every
  // row is greedy (the argmax kernel then serves).
  size_t o_sample_rows = 0, o_uniform = 0;
  bool device_sampling = false;
  if (!draws.empty()) {
    std::vector<kernels::SamplingRow> srows(R);
    std::vector<double> us(R, 0.0);
    int row = 0;
    for (int b = 0; b < B; ++b) {
      row += logit_count[b];
      if (logit_count[b] == 0) continue;
      const TokenDraw& d = draws[b];
      kernels::SamplingRow& sr = srows[row - 1];
      sr.temperature = d.options.temperature;
      sr.top_k = d.options.top_k;
      sr.top_p = d.options.top_p;
      us[row - 1] = d.u;
      device_sampling |= d.options.temperature > 0.0f;
    }
    if (device_sampling) {
      static_assert(sizeof(kernels::SamplingRow) % 8 == 0 && alignof(kernels::SamplingRow) <= 8);
      if (m.size() % 2 != 0) m.push_back(0);
      o_sample_rows = m.size();
      m.resize(m.size() + srows.size() * sizeof(kernels::SamplingRow) / 4);
      std::memcpy(m.data() + o_sample_rows, srows.data(),
                  srows.size() * sizeof(kernels::SamplingRow));
      o_uniform = m.size();
      m.resize(m.size() + us.size() * 2);
      std::memcpy(m.data() + o_uniform, us.data(), us.size() * sizeof(double));
    }
  }
  if (d_tokens == nullptr && static_cast<int>(tokens.size()) != N) {
    return give_back(absl::InternalError("host tokens missing"));
  }

  absl::Status st = EnsureCapacity(N, R);
  if (!st.ok()) return give_back(st);

  // Decode attention parameters (fixed for the step, per layer only the pools and lists change).
  kernels::PagedDecodeParams dp;
  if (fast_decode) {
    dp.dtype = kernels::AttnDType::kBFloat16;
    dp.selection = selection != nullptr || use_prhs ? kernels::KvSelection::kToken
                                                    : kernels::KvSelection::kDense;
    dp.batch = B;
    dp.num_q_heads = Hq();
    dp.num_kv_heads = Hkv();
    dp.head_dim = HD();
    dp.page_size = page_size;
    dp.max_kv_len = selection != nullptr ? std::max(selection->max_list_len, 1)
                    : use_prhs           ? max_list
                                         : max_len;
    dp.num_sms = num_sms;
    // Placeholders for the workspace query (it checks pointers for null only).
    dp.d_q = q.as<void>();
    dp.d_out = attn.as<void>();
    dp.d_k_pool = KPool(0);
    dp.d_v_pool = VPool(0);
    dp.d_page_indptr = dp.d_page_indices = dp.d_seq_lens = reinterpret_cast<const int32_t*>(1);
    if (selection != nullptr) {
      dp.d_index_indptr = selection->d_indptr[0];
      dp.d_index_indices = selection->d_indices[0];
    } else if (use_prhs) {
      dp.d_index_indptr = dp.d_index_indices = reinterpret_cast<const int32_t*>(1);
    }
    const size_t ws = kernels::PagedDecodeWorkspaceBytes(dp);
    if (ws == SIZE_MAX) {
      return give_back(absl::InternalError(absl::StrCat(
          "paged decode planning failed: ", kernels::PagedDecodeCheck(dp) ? kernels::PagedDecodeCheck(dp) : "device query")));
    }
    st = EnsureBuffer(&decode_ws, std::max<size_t>(ws, 16), "decode workspace");
    if (!st.ok()) return give_back(st);
    dp.d_workspace = decode_ws.as<void>();
    dp.workspace_bytes = decode_ws.bytes();
  }

  auto uploaded = UploadMeta(m);
  if (!uploaded.ok()) return give_back(uploaded.status());
  const int32_t* dm = *uploaded;
  const int32_t* d_pos = dm + o_pos;
  const int32_t* d_slot = dm + o_slot;
  const int32_t* d_row_seq = dm + o_row_seq;
  const int32_t* d_logit_rows = dm + o_logit_rows;
  const int32_t* d_indptr = dm + o_indptr;
  const int32_t* d_lens = dm + o_lens;
  const int32_t* d_indices = dm + o_indices;
  const int32_t* d_tok = d_tokens != nullptr ? d_tokens : dm + o_tokens;

  // PrHS selection parameters (per layer only the plan scalars, the K pool, k and the state and
  // output rows change). Outputs: refresh [NL][rows] | delta [NL][rows] | indptr [NL][rows + 1].
  kernels::PrhsSelectParams sp;
  const int sel_rows = B * Hkv();
  const size_t sel_out_elems = static_cast<size_t>(NL) * (3 * static_cast<size_t>(sel_rows) + 1);
  if (use_prhs) {
    sp.dtype = kernels::AttnDType::kBFloat16;
    sp.batch = B;
    sp.num_q_heads = Hq();
    sp.num_kv_heads = Hkv();
    sp.head_dim = HD();
    sp.page_size = page_size;
    sp.max_seq_len = max_len;
    sp.num_sms = num_sms;
    sp.d_q = q.as<void>();
    sp.d_k_pool = KPool(0);
    sp.d_page_indptr = d_indptr;
    sp.d_page_indices = d_indices;
    sp.d_seq_lens = d_lens;
    sp.d_topk = dm + o_topk;
    sp.topk_per_head = per_head;
    sp.d_state_slot = dm + o_state_slot;
    sp.d_mode = dm + o_mode;
    sp.anchor_stride = prhs_stride;
    sp.index_capacity = std::max<int64_t>(index_capacity, 1);
    st = EnsureBuffer(&prhs_out, sel_out_elems * sizeof(int32_t), "PrHS step outputs");
    if (st.ok()) {
      st = EnsureBuffer(&prhs_indices, static_cast<size_t>(sp.index_capacity) * sizeof(int32_t),
                        "PrHS index lists");
    }
    if (!st.ok()) return give_back(st);
    sp.d_anchor_q = prhs_anchor_q.as<void>();
    sp.d_reuse = prhs_reuse.as<int32_t>();
    sp.d_valid = prhs_valid.as<int32_t>();
    sp.d_anchor_set = prhs_set.as<int32_t>();
    sp.d_anchor_count = prhs_count.as<int32_t>();
    sp.d_refresh = prhs_out.as<int32_t>();
    sp.d_delta = reinterpret_cast<float*>(prhs_out.as<int32_t>() + static_cast<size_t>(NL) * sel_rows);
    sp.d_index_indptr = prhs_out.as<int32_t>() + 2 * static_cast<size_t>(NL) * sel_rows;
    sp.d_index_indices = prhs_indices.as<int32_t>();
    const size_t ws = kernels::PrhsSelectWorkspaceBytes(sp);
    if (ws == SIZE_MAX) {
      const char* why = kernels::PrhsSelectCheck(sp);
      return give_back(absl::InternalError(
          absl::StrCat("PrHS selection planning failed: ", why != nullptr ? why : "?")));
    }
    st = EnsureBuffer(&prhs_ws, std::max<size_t>(ws, 256), "PrHS workspace");
    if (!st.ok()) return give_back(st);
    sp.d_workspace = prhs_ws.as<void>();
    sp.workspace_bytes = prhs_ws.bytes();
    if (use_quest) {
      st = EnsureBuffer(&quest_bounds, static_cast<size_t>(NL) * QuestBoundsPerLayer() * kBf16,
                        "Quest page bounds");
      if (!st.ok()) return give_back(st);
      sp.d_bounds_from = dm + o_bounds_from;
    }
  }

  // ---- Forward.
  const int Dm = D(), Fm = F(), Vm = V(), qo = Hq() * HD();
  const float eps = static_cast<float>(c.rms_norm_eps);
  float* dx = x.as<float>();
  uint16_t* dh = h.as<uint16_t>();
  float* dqkv = qkv.as<float>();
  uint16_t* dq = q.as<uint16_t>();
  uint16_t* dattn = attn.as<uint16_t>();
  float* dgu = gu.as<float>();
  uint16_t* dact = act.as<uint16_t>();
  // HShare calibration of layer l (HShareSelector::Calibrate, every unit of the calibrating
  // items): channels and exact top-k on the device (kExact rows of a pass with the calibration
  // mode table), then on the host the greedy overlap map — the unit shares the first earlier
  // representative (lower layer, or lower kv head of this layer) whose exact set overlaps its
  // own by >= 50 % — uploaded as the units' sources. Synchronises the stream once per layer,
  // only at a sequence's first non-dense hshare step.
  struct HsCal {
    std::vector<int> rep_units;                 // representatives with a non-empty exact set
    std::vector<std::vector<uint64_t>> rep_bits;  // their exact sets as bitsets over [0, t)
  };
  std::vector<HsCal> hs_cal(calibrating.size());
  auto calibrate_hshare = [&](kernels::PrhsSelectParams cp, int l,
                              const int32_t* d_cal) -> absl::Status {
    cp.d_mode = d_cal;
    cp.d_delta = nullptr;
    cp.d_cos = nullptr;
    CUDA_RETURN_IF_ERROR(kernels::PrhsHShareCalibrate(cp, stream));
    CUDA_RETURN_IF_ERROR(kernels::PrhsGate(cp, stream));
    CUDA_RETURN_IF_ERROR(kernels::PrhsRefreshScores(cp, stream));
    CUDA_RETURN_IF_ERROR(kernels::PrhsRefreshSelect(cp, stream));
    const int hkv = Hkv(), stride = prhs_stride;
    std::vector<int32_t> counts(hkv), sets(static_cast<size_t>(hkv) * stride), src(hkv);
    for (size_t i = 0; i < calibrating.size(); ++i) {
      const int b = calibrating[i];
      const size_t row0 = static_cast<size_t>(seqs[items[b].seq].prhs_slot) * hkv;
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(counts.data(), cp.d_anchor_count + row0,
                                           counts.size() * 4, cudaMemcpyDeviceToHost, stream));
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(sets.data(), cp.d_anchor_set + row0 * stride,
                                           sets.size() * 4, cudaMemcpyDeviceToHost, stream));
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
      HsCal& hc = hs_cal[i];
      const size_t words = (static_cast<size_t>(seq_lens[b]) + 63) / 64;
      for (int h = 0; h < hkv; ++h) {
        const int n = std::min(counts[h], stride);
        const int32_t* e = sets.data() + static_cast<size_t>(h) * stride;
        std::vector<uint64_t> bits(words, 0);
        for (int j = 0; j < n; ++j) bits[e[j] >> 6] |= uint64_t{1} << (e[j] & 63);
        src[h] = -1;
        if (n == 0) continue;  // no set: shares nothing and is nobody's representative
        for (size_t o = 0; o < hc.rep_units.size() && src[h] < 0; ++o) {
          int64_t common = 0;
          for (size_t w = 0; w < words; ++w) common += std::popcount(bits[w] & hc.rep_bits[o][w]);
          if (common * 2 >= n) src[h] = hc.rep_units[o];
        }
        if (src[h] < 0) {
          hc.rep_units.push_back(l * hkv + h);
          hc.rep_bits.push_back(std::move(bits));
        }
      }
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(const_cast<int32_t*>(cp.d_hs_source) + row0,
                                           src.data(), src.size() * 4, cudaMemcpyHostToDevice,
                                           stream));
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));  // src is reused
    }
    return absl::OkStatus();
  };
  auto forward = [&]() -> absl::Status {
    CUDA_RETURN_IF_ERROR(kernels::EmbeddingGather(embed, d_tok, N, Dm, Vm, dx, stream));
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      const Layer& L = layers[l];
      // Rows [r0, N) run this layer (r0 > 0 only under ETF); activations are compact from row 0,
      // the residual xl and the row tables are offset by r0.
      const int r0 = etf_frozen[l], NR = N - r0;
      float* xl = dx + static_cast<size_t>(r0) * Dm;
      if (r0 > 0) {  // the frozen prefix's K/V pages: layer l − 1's (l > 0: SupportsPlan)
        const int64_t page_elems = static_cast<int64_t>(Hkv()) * page_size * HD();
        CUDA_RETURN_IF_ERROR(kernels::CopyPagesBf16(KPool(l - 1), KPool(l), d_indices,
                                                    r0 / page_size, page_elems, stream));
        CUDA_RETURN_IF_ERROR(kernels::CopyPagesBf16(VPool(l - 1), VPool(l), d_indices,
                                                    r0 / page_size, page_elems, stream));
      }
      CUDA_RETURN_IF_ERROR(kernels::RmsNormToBf16(xl, nullptr, NR, Dm, L.attn_norm, eps, dh, stream));
      RETURN_IF_ERROR(Gemm(dh, NR, Dm, L.wqkv, QkvWidth(), dqkv, 0.0f));
      kernels::RopeAppendParams rp;
      rp.rows = NR;
      rp.num_q_heads = Hq();
      rp.num_kv_heads = Hkv();
      rp.head_dim = HD();
      rp.page_size = page_size;
      rp.d_qkv = dqkv;
      rp.d_bias = L.bqkv;
      rp.d_pos = d_pos + r0;
      rp.d_slot = d_slot + r0;
      rp.d_inv_freq = inv_freq;
      rp.d_q_out = dq;
      rp.d_k_pool = KPool(l);
      rp.d_v_pool = VPool(l);
      CUDA_RETURN_IF_ERROR(kernels::RopeAppendKv(rp, stream));
      if (fast_decode) {
        dp.d_q = dq;
        dp.d_out = dattn;
        dp.d_k_pool = KPool(l);
        dp.d_v_pool = VPool(l);
        dp.d_page_indptr = d_indptr;
        dp.d_page_indices = d_indices;
        dp.d_seq_lens = d_lens;
        if (selection != nullptr) {
          const size_t sl = selection->d_indptr.size() == 1 ? 0 : l;
          dp.d_index_indptr = selection->d_indptr[sl];
          dp.d_index_indices = selection->d_indices[sl];
        } else if (use_prhs) {
          // CIS gate -> refresh scoring -> top-k + dilation + δ -> CSR lists, for this layer.
          // The CIS scalars of the step's PrHS items (they agree; kExact / kWindow rows ignore
          // them); sink and local per item.
          static const LayerSelectionPlan kUnused;
          const LayerSelectionPlan& lp = prhs_ref != nullptr ? prhs_ref->layers[l] : kUnused;
          sp.tau = static_cast<float>(lp.tau);
          sp.max_reuse = lp.max_reuse;
          sp.dilate_r = std::min(lp.dilate_r, 64);
          sp.dilate_m_fraction = lp.dilate_m_fraction;
          sp.d_sink = dm + o_sink + static_cast<size_t>(l) * B;
          sp.d_local = dm + o_local + static_cast<size_t>(l) * B;
          sp.d_q = dq;
          sp.d_k_pool = KPool(l);
          sp.d_page_bounds = use_quest ? quest_bounds.as<uint16_t>() +
                                             static_cast<size_t>(l) * QuestBoundsPerLayer()
                                       : nullptr;
          sp.d_topk = dm + o_topk + static_cast<size_t>(l) * topk_cols;
          sp.d_cand_lo = use_cand_lo ? dm + o_cand_lo + static_cast<size_t>(l) * B : nullptr;
          const size_t state_row0 = static_cast<size_t>(l) * prhs_slots * Hkv();
          sp.d_anchor_q = prhs_anchor_q.as<uint16_t>() + state_row0 * (Hq() / Hkv()) * HD();
          sp.d_reuse = prhs_reuse.as<int32_t>() + state_row0;
          sp.d_valid = prhs_valid.as<int32_t>() + state_row0;
          sp.d_anchor_count = prhs_count.as<int32_t>() + state_row0;
          sp.d_anchor_set = prhs_set.as<int32_t>() + state_row0 * prhs_stride;
          if (hs_ref != nullptr) {
            sp.d_hs_channels = hs_channels.as<int32_t>() + state_row0 * HD();
            sp.d_hs_source = hs_source.as<int32_t>() + state_row0;
            sp.hs_r = std::clamp(hs_ref->layers[l].approx_channels, 1, HD());
            sp.hs_interval = hs_ref->layers[l].refresh_interval;
            sp.d_anchor_set_base = prhs_set.as<int32_t>();
            sp.d_anchor_count_base = prhs_count.as<int32_t>();
            sp.layer_rows = static_cast<int64_t>(prhs_slots) * Hkv();
          }
          if (use_h2o) {
            sp.d_h2o_pos = h2o_pos.as<int32_t>() + state_row0 * h2o_stride;
            sp.d_h2o_acc = h2o_acc.as<float>() + state_row0 * h2o_stride;
            sp.d_h2o_count = h2o_count.as<int32_t>() + state_row0;
            sp.h2o_stride = h2o_stride;
          }
          int32_t* out = prhs_out.as<int32_t>();
          sp.d_refresh = out + static_cast<size_t>(l) * sel_rows;
          sp.d_delta = reinterpret_cast<float*>(out + static_cast<size_t>(NL) * sel_rows) +
                       static_cast<size_t>(l) * sel_rows;
          sp.d_index_indptr = out + 2 * static_cast<size_t>(NL) * sel_rows +
                              static_cast<size_t>(l) * (sel_rows + 1);
          // (after this layer's output rows are set: the calibration pass writes refresh too,
          // and the step's gate then overwrites it)
          if (!calibrating.empty()) RETURN_IF_ERROR(calibrate_hshare(sp, l, dm + o_cal));
          CUDA_RETURN_IF_ERROR(kernels::PrhsSelectStep(sp, stream));
          dp.d_index_indptr = sp.d_index_indptr;
          dp.d_index_indices = sp.d_index_indices;
        }
        CUDA_RETURN_IF_ERROR(kernels::PagedDecodeAttention(dp, stream));
        // H2O: the attention probabilities of the kept tokens, added to their scores.
        if (use_h2o) CUDA_RETURN_IF_ERROR(kernels::PrhsHeavyObserve(sp, stream));
      } else {
        kernels::PrefillAttentionParams ap;
        ap.rows = NR;
        ap.num_q_heads = Hq();
        ap.num_kv_heads = Hkv();
        ap.head_dim = HD();
        ap.page_size = page_size;
        ap.causal = causal;
        ap.d_q = dq;
        ap.d_out = dattn;
        ap.d_k_pool = KPool(l);
        ap.d_v_pool = VPool(l);
        ap.d_page_indptr = d_indptr;
        ap.d_page_indices = d_indices;
        ap.d_seq_lens = d_lens;
        ap.d_row_seq = d_row_seq + r0;
        ap.d_row_pos = d_pos + r0;
        if (use_band) {
          ap.d_band_fraction =
              reinterpret_cast<const double*>(dm + o_band) + static_cast<size_t>(l) * B;
          ap.d_band_sink = dm + o_band_sink + static_cast<size_t>(l) * B;
        }
        if (tiled_prefill_step) {
          CUDA_RETURN_IF_ERROR(
              kernels::PrefillAttentionTiled(ap, num_qtiles[l], dm + o_qtiles[l], stream));
        } else {
          CUDA_RETURN_IF_ERROR(kernels::PrefillAttention(ap, stream));
        }
      }
      RETURN_IF_ERROR(Gemm(dattn, NR, qo, L.wo, Dm, xl, 1.0f));  // x += attn · Woᵀ
      if (L.bo != nullptr) {
        CUDA_RETURN_IF_ERROR(kernels::AddResidual(xl, nullptr, L.bo, NR, Dm, stream));
      }
      CUDA_RETURN_IF_ERROR(kernels::RmsNormToBf16(xl, nullptr, NR, Dm, L.mlp_norm, eps, dh, stream));
      RETURN_IF_ERROR(Gemm(dh, NR, Dm, L.w_gu, 2 * Fm, dgu, 0.0f));
      CUDA_RETURN_IF_ERROR(kernels::SiluMulToBf16(dgu, NR, Fm, dact, stream));
      RETURN_IF_ERROR(Gemm(dact, NR, Fm, L.w_down, Dm, xl, 1.0f));  // x += act · W_downᵀ
    }
    if (R == 0) return absl::OkStatus();  // no item wants logits
    CUDA_RETURN_IF_ERROR(kernels::RmsNormToBf16(dx, d_logit_rows, R, Dm, final_norm, eps,
                                                normed.as<uint16_t>(), stream));
    RETURN_IF_ERROR(Gemm(normed.as<uint16_t>(), R, Dm, lm_head, Vm, logits.as<float>(), 0.0f));
    int32_t* d_greedy = d_next != nullptr ? d_next : greedy.as<int32_t>();
    if (device_sampling) {
      kernels::SampleRowsParams sp;
      sp.rows = R;
      sp.vocab = Vm;
      sp.d_logits = logits.as<float>();
      sp.d_row_params = reinterpret_cast<const kernels::SamplingRow*>(dm + o_sample_rows);
      sp.d_uniform = reinterpret_cast<const double*>(dm + o_uniform);
      sp.d_out = d_greedy;
      if (const char* why = kernels::SampleRowsCheck(sp); why != nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("device sampling: ", why));
      }
      CUDA_RETURN_IF_ERROR(kernels::SampleRows(sp, stream));
    } else {
      CUDA_RETURN_IF_ERROR(kernels::ArgMaxRows(logits.as<float>(), R, Vm, d_greedy, stream));
    }
    return absl::OkStatus();
  };
  st = forward();
  if (!st.ok()) return give_back(st);
  if (use_prhs) {
    // What selection did, back to the host in one asynchronous copy (accounted by
    // FlushSelections once it has landed).
    PendingSelection rec;
    if (!prhs_spare.empty()) {
      rec = std::move(prhs_spare.back());
      prhs_spare.pop_back();
    }
    auto enqueue = [&]() -> absl::Status {
      if (rec.done == nullptr) {
        CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&rec.done, cudaEventDisableTiming));
      }
      if (rec.cap < sel_out_elems) {
        if (rec.host != nullptr) CUDA_RETURN_IF_ERROR(cudaFreeHost(rec.host));
        rec.host = nullptr;
        rec.cap = 0;
        CUDA_RETURN_IF_ERROR(cudaMallocHost(reinterpret_cast<void**>(&rec.host),
                                            sel_out_elems * sizeof(int32_t)));
        rec.cap = sel_out_elems;
      }
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(rec.host, prhs_out.as<int32_t>(),
                                           sel_out_elems * sizeof(int32_t),
                                           cudaMemcpyDeviceToHost, stream));
      CUDA_RETURN_IF_ERROR(cudaEventRecord(rec.done, stream));
      return absl::OkStatus();
    };
    st = enqueue();
    if (!st.ok()) {
      prhs_spare.push_back(std::move(rec));
      return give_back(st);
    }
    rec.batch = B;
    rec.telemetry.assign(B, nullptr);
    rec.policy.assign(B, SelectionPolicy::kDense);
    for (int b = 0; b < B; ++b) {
      if (SelectsOnDevice(items[b].plan)) {
        rec.telemetry[b] = items[b].telemetry;
        rec.policy[b] = items[b].plan->policy;
      }
    }
    rec.per_head = per_head;
    rec.topk = topk_tab;
    rec.lens = seq_lens;
    prhs_pending.push_back(std::move(rec));
  }

  if (host_logits != nullptr || greedy_out != nullptr) {
    std::vector<float> all;
    if (host_logits != nullptr) {
      all.resize(static_cast<size_t>(R) * Vm);
      st = CudaStatus(cudaMemcpyAsync(all.data(), logits.as<float>(), all.size() * sizeof(float),
                                      cudaMemcpyDeviceToHost, stream),
                      "logits download");
      if (!st.ok()) return give_back(st);
    }
    std::vector<int32_t> g(R);
    st = CudaStatus(cudaMemcpyAsync(g.data(), d_next != nullptr ? d_next : greedy.as<int32_t>(),
                                    R * sizeof(int32_t), cudaMemcpyDeviceToHost, stream),
                    "greedy download");
    if (!st.ok()) return give_back(st);
    st = CudaStatus(cudaStreamSynchronize(stream), "forward");
    if (!st.ok()) return give_back(st);
    if (host_logits != nullptr) {
      host_logits->assign(B, {});
      size_t row = 0;
      for (int b = 0; b < B; ++b) {
        (*host_logits)[b].assign(all.begin() + row * Vm, all.begin() + (row + logit_count[b]) * Vm);
        row += logit_count[b];
      }
    }
    if (greedy_out != nullptr) *greedy_out = std::move(g);
  } else {
    st = CudaStatus(cudaGetLastError(), "forward launch");
    if (!st.ok()) return give_back(st);
  }
  commit();
  if (use_prhs) {
    // Synchronous steps account their selection now; asynchronous ones whatever has landed (and
    // wait for the oldest beyond kMaxPendingSelections).
    RETURN_IF_ERROR(FlushSelections(/*wait=*/host_logits != nullptr || greedy_out != nullptr));
  }
  return absl::OkStatus();
}

const ModelConfig& CudaModel::config() const { return impl_->config; }
int CudaModel::max_context() const { return impl_->max_context; }
int CudaModel::page_size() const { return impl_->page_size; }
int32_t CudaModel::num_pages() const { return impl_->num_pages; }
int32_t CudaModel::free_pages() const { return impl_->allocator->num_free(); }
int64_t CudaModel::weight_bytes() const { return impl_->weight_bytes; }
int64_t CudaModel::kv_bytes_per_token() const {
  const ModelConfig& c = impl_->config;
  return int64_t{2} * c.num_hidden_layers * c.num_key_value_heads * c.head_dim *
         static_cast<int64_t>(kBf16);
}
std::string CudaModel::device_name() const { return impl_->device_name; }
void* CudaModel::cuda_stream() const { return impl_->stream; }

CudaModel::SeqId CudaModel::CreateSequence() {
  const SeqId id = impl_->next_seq++;
  impl_->seqs.emplace(id, Impl::Sequence{});
  return id;
}

absl::Status CudaModel::FreeSequence(SeqId seq) {
  auto it = impl_->seqs.find(seq);
  if (it == impl_->seqs.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  RETURN_IF_ERROR(impl_->allocator->Free(it->second.page_table));
  // The slot's state is cleared when the next sequence acquires it (on the same stream, so
  // after every step already enqueued that reads it).
  if (it->second.prhs_slot >= 0) impl_->prhs_free_slots.push_back(it->second.prhs_slot);
  impl_->seqs.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> CudaModel::AliasedPages(SeqId seq) const {
  auto it = impl_->seqs.find(seq);
  if (it == impl_->seqs.end()) {
    return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  }
  return it->second.aliased_pages;
}

absl::StatusOr<int> CudaModel::SequenceLength(SeqId seq) const {
  auto it = impl_->seqs.find(seq);
  if (it == impl_->seqs.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  return it->second.length;
}

absl::StatusOr<std::vector<std::vector<float>>> CudaModel::Step(std::span<const StepItem> items,
                                                                bool causal,
                                                                std::vector<int32_t>* greedy,
                                                                const CudaKvSelection* selection) {
  std::vector<Impl::ItemDesc> desc(items.size());
  for (size_t b = 0; b < items.size(); ++b) {
    desc[b].seq = items[b].seq;
    desc[b].n = static_cast<int>(items[b].tokens.size());
    desc[b].tokens = items[b].tokens;
    desc[b].all_logits = items[b].all_logits;
    desc[b].plan = items[b].plan;
    desc[b].telemetry = items[b].telemetry;
    desc[b].prefill_plan = items[b].prefill_plan;
  }
  std::vector<std::vector<float>> logits;
  RETURN_IF_ERROR(impl_->Run(desc, causal, nullptr, nullptr, selection, &logits, greedy));
  return logits;
}

absl::StatusOr<std::vector<int32_t>> CudaModel::StepSample(
    std::span<const StepItem> items, std::span<const TokenDraw> draws, bool causal,
    std::vector<std::vector<float>>* logits) {
  RETURN_IF_ERROR(ValidateDraws(items.size(), draws));
  const int V = impl_->V();
  std::vector<Impl::ItemDesc> desc(items.size());
  for (size_t b = 0; b < items.size(); ++b) {
    desc[b].seq = items[b].seq;
    desc[b].n = static_cast<int>(items[b].tokens.size());
    desc[b].tokens = items[b].tokens;
    desc[b].all_logits = items[b].all_logits && draws[b].wanted;
    desc[b].no_logits = !draws[b].wanted;
    desc[b].plan = items[b].plan;
    desc[b].telemetry = items[b].telemetry;
    desc[b].prefill_plan = items[b].prefill_plan;
  }
  std::vector<int32_t> out(items.size(), -1);
  if (V > kernels::kMaxSamplingVocab) {
    // Beyond the kernel's fixed-point headroom: host sampling from the copied logits.
    std::vector<std::vector<float>> l;
    RETURN_IF_ERROR(impl_->Run(desc, causal, nullptr, nullptr, nullptr, &l, nullptr));
    for (size_t b = 0; b < items.size(); ++b) {
      if (draws[b].wanted) {
        out[b] = SampleWithUniform(std::span<const float>(l[b]).last(V), draws[b].options,
                                   draws[b].u);
      }
    }
    if (logits != nullptr) *logits = std::move(l);
    return out;
  }
  std::vector<int32_t> rows;
  RETURN_IF_ERROR(impl_->Run(desc, causal, nullptr, nullptr, nullptr, logits, &rows, draws));
  size_t row = 0;
  for (size_t b = 0; b < items.size(); ++b) {
    if (desc[b].no_logits) continue;
    row += desc[b].all_logits ? desc[b].n : 1;
    out[b] = rows[row - 1];
  }
  return out;
}

absl::Status CudaModel::DecodeGreedyAsync(std::span<const SeqId> seqs, const int32_t* d_tokens,
                                          int32_t* d_next, const CudaKvSelection* selection) {
  if (d_tokens == nullptr || d_next == nullptr) {
    return absl::InvalidArgumentError("d_tokens and d_next must be device pointers");
  }
  std::vector<Impl::ItemDesc> desc(seqs.size());
  for (size_t b = 0; b < seqs.size(); ++b) {
    desc[b].seq = seqs[b];
    desc[b].n = 1;
  }
  return impl_->Run(desc, /*causal=*/true, d_tokens, d_next, selection, nullptr, nullptr);
}

absl::Status CudaModel::DecodeGreedyAsync(std::span<const SeqId> seqs, const int32_t* d_tokens,
                                          int32_t* d_next,
                                          std::span<const SelectionPlan* const> plans,
                                          std::span<SelectionTelemetry* const> telemetry) {
  if (d_tokens == nullptr || d_next == nullptr) {
    return absl::InvalidArgumentError("d_tokens and d_next must be device pointers");
  }
  if ((!plans.empty() && plans.size() != seqs.size()) || telemetry.size() != plans.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "plans (", plans.size(), ") and telemetry (", telemetry.size(),
        ") must both be empty or have one entry per sequence (", seqs.size(), ")"));
  }
  std::vector<Impl::ItemDesc> desc(seqs.size());
  for (size_t b = 0; b < seqs.size(); ++b) {
    desc[b].seq = seqs[b];
    desc[b].n = 1;
    if (!plans.empty()) {
      desc[b].plan = plans[b];
      desc[b].telemetry = telemetry[b];
    }
  }
  return impl_->Run(desc, /*causal=*/true, d_tokens, d_next, nullptr, nullptr, nullptr);
}

absl::Status CudaModel::Synchronize() {
  RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(impl_->stream), "cudaStreamSynchronize"));
  return impl_->FlushSelections(/*wait=*/true);
}

absl::Status CudaModel::AppendUninitialized(SeqId seq, int n) {
  std::vector<Impl::ItemDesc> desc(1);
  desc[0].seq = seq;
  desc[0].n = n;
  desc[0].uninitialized = n;
  return impl_->Run(desc, true, nullptr, nullptr, nullptr, nullptr, nullptr);
}

absl::Status CudaModel::FillKvRandom(uint64_t seed) {
  RETURN_IF_ERROR(CudaStatus(
      kernels::FillUniformBf16(impl_->kv.as<uint16_t>(), impl_->kv.bytes() / kBf16, 1.0f, seed,
                               impl_->stream),
      "FillUniformBf16"));
  return Synchronize();
}

}  // namespace prehoc
