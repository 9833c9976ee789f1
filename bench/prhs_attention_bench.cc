// Attention-operator benchmark of PrHS decode on the GPU: one layer's attention for a batch,
// including selection, vs our dense paged kernel, in one process (the PyTorch SDPA peer is
// tools/bench/peer_attention.py, run in the same device command).
//
//   prhs_attention_bench [--batch=16] [--kv-heads=32] [--q-heads=32] [--head-dim=128]
//       [--ctx=2048,4096,16384,32768] [--budget=8] [--rates=0,0.1,0.25,0.5,1]
//       [--budget-matched=1] [--sink=8] [--local=32] [--reps=30] [--json=PATH]
//
// One PrHS step = PrhsGate (every row, every step) + PrhsRefreshScores + PrhsRefreshSelect (only
// the rows whose gate fired; a fraction `rate` of the rows) + PrhsBuildIndexLists (every row:
// the local window moves each step) + token-sparse PagedDecodeAttention over the lists.
// Budget B(t) = round(t / budget) tokens (sink + selected + local), k = B - sink - local, and with
// --budget-matched=1 (default) k /= 1 + 2r/3 so the dilated set stays within B (the plan's
// prhs-budget-matched); the real kept count is measured from the lists and reported.
// The refresh rate is imposed exactly: before each timed repetition the CIS state is restored
// (outside the timed region) so that round(rate * rows) rows have an anchor with cos = -1 (the
// gate refreshes them) and the others an anchor equal to the query (cos = 1, shared).
// Method (as attention_bench): CUDA events per repetition, median of --reps after 3 warm-ups,
// inputs rotated over sets of >= 512 MiB in all, a GPU spin queued first so host launch overhead
// is not timed; per-stage times come from a second loop with events between the stages.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "bench/bench_kernels.h"
#include "worker/kernels/paged_decode.h"
#include "worker/kernels/selection_prhs.h"

namespace prehoc::bench {
namespace {

using kernels::AttnDType;
using kernels::KvSelection;
using kernels::PagedDecodeParams;
using kernels::PrhsSelectParams;

#define CHECK_CUDA(expr)                                                                      \
  do {                                                                                        \
    cudaError_t err_ = (expr);                                                                \
    if (err_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr,               \
                   cudaGetErrorString(err_));                                                 \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

struct Options {
  int batch = 16;
  int kv_heads = 32;
  int q_heads = 32;
  int head_dim = 128;
  std::vector<int> ctxs{2048, 4096, 16384, 32768};
  int budget = 8;
  std::vector<double> rates{0.0, 0.1, 0.25, 0.5, 1.0};
  bool budget_matched = true;
  int sink = 8;
  int local = 32;
  int reps = 30;
  std::string json;
};

template <typename T>
std::vector<T> ParseList(const std::string& s) {
  std::vector<T> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(static_cast<T>(std::atof(item.c_str())));
  return v;
}

Options ParseArgs(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto val = [&](const char* name) -> const char* {
      const size_t n = std::strlen(name);
      if (a.compare(0, n, name) == 0 && a.size() > n && a[n] == '=') return a.c_str() + n + 1;
      return nullptr;
    };
    if (auto v = val("--batch")) o.batch = std::atoi(v);
    else if (auto v = val("--kv-heads")) o.kv_heads = std::atoi(v);
    else if (auto v = val("--q-heads")) o.q_heads = std::atoi(v);
    else if (auto v = val("--head-dim")) o.head_dim = std::atoi(v);
    else if (auto v = val("--ctx")) o.ctxs = ParseList<int>(v);
    else if (auto v = val("--budget")) o.budget = std::atoi(v);
    else if (auto v = val("--rates")) o.rates = ParseList<double>(v);
    else if (auto v = val("--budget-matched")) o.budget_matched = std::atoi(v) != 0;
    else if (auto v = val("--sink")) o.sink = std::atoi(v);
    else if (auto v = val("--local")) o.local = std::atoi(v);
    else if (auto v = val("--reps")) o.reps = std::max(1, std::atoi(v));
    else if (auto v = val("--json")) o.json = v;
    else {
      std::fprintf(stderr, "prhs_attention_bench: unknown argument '%s'\n", a.c_str());
      std::exit(2);
    }
  }
  return o;
}

template <typename T = void>
T* DeviceAlloc(size_t bytes) {
  void* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(bytes, 256)));
  return static_cast<T*>(p);
}
template <typename T>
T* Upload(const std::vector<T>& v) {
  T* d = DeviceAlloc<T>(v.size() * sizeof(T));
  if (!v.empty()) CHECK_CUDA(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <typename T>
std::vector<T> Download(const T* d, size_t n) {
  std::vector<T> v(n);
  if (n > 0) CHECK_CUDA(cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Times `stages` (each enqueues work) per repetition, with prepare(rep) enqueued before the
// start event (not timed). Returns the median total and the median of each stage (µs).
std::vector<double> TimeStages(const std::function<void(int)>& prepare,
                               const std::vector<std::function<void(int)>>& stages, int reps,
                               bool per_stage, cudaStream_t stream) {
  for (int i = 0; i < 3; ++i) {
    prepare(i);
    for (const auto& s : stages) s(i);
  }
  CHECK_CUDA(cudaStreamSynchronize(stream));
  const int ns = static_cast<int>(stages.size());
  const int per = per_stage ? ns + 1 : 2;
  std::vector<cudaEvent_t> ev(static_cast<size_t>(reps) * per);
  for (auto& e : ev) CHECK_CUDA(cudaEventCreate(&e));
  CHECK_CUDA(Spin(static_cast<uint64_t>(reps) * 60000 + 1000000, stream));
  for (int i = 0; i < reps; ++i) {
    prepare(i);
    cudaEvent_t* e = ev.data() + static_cast<size_t>(i) * per;
    CHECK_CUDA(cudaEventRecord(e[0], stream));
    for (int s = 0; s < ns; ++s) {
      stages[s](i);
      if (per_stage) CHECK_CUDA(cudaEventRecord(e[s + 1], stream));
    }
    if (!per_stage) CHECK_CUDA(cudaEventRecord(e[1], stream));
  }
  CHECK_CUDA(cudaStreamSynchronize(stream));
  std::vector<double> result;
  std::vector<std::vector<double>> t(per_stage ? ns + 1 : 1, std::vector<double>(reps));
  for (int i = 0; i < reps; ++i) {
    cudaEvent_t* e = ev.data() + static_cast<size_t>(i) * per;
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, e[0], e[per - 1]));
    t[0][i] = ms * 1000.0;
    if (per_stage) {
      for (int s = 0; s < ns; ++s) {
        CHECK_CUDA(cudaEventElapsedTime(&ms, e[s], e[s + 1]));
        t[s + 1][i] = ms * 1000.0;
      }
    }
  }
  for (auto& e : ev) CHECK_CUDA(cudaEventDestroy(e));
  for (auto& v : t) result.push_back(Median(v));
  return result;
}

bool AllFinite(const uint16_t* d_out, size_t n) {  // bf16
  const std::vector<uint16_t> h = Download(d_out, n);
  for (uint16_t x : h) {
    if ((x & 0x7f80) == 0x7f80) return false;
  }
  return true;
}

struct Record {
  std::string op;
  int ctx;
  double rate;  // imposed refresh fraction (-1 when not applicable)
  double us;
  double gate_us = 0, score_us = 0, select_us = 0, lists_us = 0, attn_us = 0;
  double kept_fraction = 0;  // real mean list length / t
  int refreshed_rows = 0;
  int k = 0, budget_tokens = 0, max_list = 0;
};

class Bench {
 public:
  explicit Bench(const Options& o) : o_(o) { CHECK_CUDA(cudaStreamCreate(&stream_)); }

  void RunCtx(int ctx, std::vector<Record>* out) {
    const int B = o_.batch, hkv = o_.kv_heads, hq = o_.q_heads, D = o_.head_dim;
    const int G = hq / hkv, rows = B * hkv;
    const int pages_per_seq = (ctx + 15) / 16;
    const size_t set_pages = static_cast<size_t>(B) * pages_per_seq;
    const size_t page_elems = static_cast<size_t>(hkv) * 16 * D;
    const size_t set_kv_bytes = set_pages * page_elems * 2 * 2;
    const int sets = static_cast<int>(
        std::clamp<size_t>((size_t{512} << 20) / set_kv_bytes + 1, 1, 16));
    const size_t pool_pages = sets * set_pages;

    // Plan: B(t) = round(t / budget), k per the (budget-matched) PrHS plan.
    const int64_t budget_tokens = std::llround(static_cast<double>(ctx) / o_.budget);
    double kd = static_cast<double>(std::max<int64_t>(0, budget_tokens - o_.sink - o_.local));
    if (o_.budget_matched) kd /= 1.0 + 2.0 * 1 * (1.0 / 3.0);
    const int k = static_cast<int>(std::floor(kd));
    const int anchor_stride = k + 2 * static_cast<int>(k / 3.0) + 1;
    const int max_list = o_.sink + anchor_stride + o_.local;

    size_t free_b = 0, total_b = 0;
    CHECK_CUDA(cudaMemGetInfo(&free_b, &total_b));
    const size_t need = pool_pages * page_elems * 2 * 2 + (size_t{2} << 30);
    if (need > free_b) {
      std::printf("skip ctx=%d: needs %.1f GB, %.1f GB free\n", ctx, need / 1e9, free_b / 1e9);
      return;
    }
    uint16_t* k_pool = DeviceAlloc<uint16_t>(pool_pages * page_elems * 2);
    uint16_t* v_pool = DeviceAlloc<uint16_t>(pool_pages * page_elems * 2);
    CHECK_CUDA(FillUniform16(k_pool, pool_pages * page_elems, 21, true, stream_));
    CHECK_CUDA(FillUniform16(v_pool, pool_pages * page_elems, 22, true, stream_));
    std::vector<int32_t> perm(pool_pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::mt19937 rng(ctx + B * 7 + hkv);
    std::shuffle(perm.begin(), perm.end(), rng);
    int32_t* d_pages = Upload(perm);
    std::vector<int32_t> indptr(B + 1), lens(B, ctx), topk(B, k);
    for (int b = 0; b <= B; ++b) indptr[b] = b * pages_per_seq;
    int32_t* d_indptr = Upload(indptr);
    int32_t* d_lens = Upload(lens);
    int32_t* d_topk = Upload(topk);
    const size_t q_elems = static_cast<size_t>(B) * hq * D;
    uint16_t* d_q = DeviceAlloc<uint16_t>(q_elems * 2 * sets);
    CHECK_CUDA(FillUniform16(d_q, q_elems * sets, 23, true, stream_));
    uint16_t* d_out = DeviceAlloc<uint16_t>(q_elems * 2 * sets);

    // CIS state per set; outputs and workspace shared.
    const size_t anchor_elems = static_cast<size_t>(rows) * G * D;
    std::vector<uint16_t*> d_anchor(sets), d_pristine(sets);
    std::vector<int32_t*> d_reuse(sets), d_valid(sets), d_aset(sets), d_acount(sets);
    for (int s = 0; s < sets; ++s) {
      d_anchor[s] = DeviceAlloc<uint16_t>(anchor_elems * 2);
      d_pristine[s] = DeviceAlloc<uint16_t>(anchor_elems * 2);
      d_reuse[s] = DeviceAlloc<int32_t>(rows * 4);
      d_valid[s] = DeviceAlloc<int32_t>(rows * 4);
      d_aset[s] = DeviceAlloc<int32_t>(static_cast<size_t>(rows) * anchor_stride * 4);
      d_acount[s] = DeviceAlloc<int32_t>(rows * 4);
      CHECK_CUDA(cudaMemset(d_reuse[s], 0, rows * 4));
      CHECK_CUDA(cudaMemset(d_valid[s], 0, rows * 4));
      CHECK_CUDA(cudaMemset(d_acount[s], 0, rows * 4));
    }
    int32_t* d_refresh = DeviceAlloc<int32_t>(rows * 4);
    float* d_cos = DeviceAlloc<float>(rows * 4);
    float* d_delta = DeviceAlloc<float>(rows * 4);
    int32_t* d_csr_indptr = DeviceAlloc<int32_t>((rows + 1) * 4);
    const int64_t capacity = static_cast<int64_t>(rows) * max_list;
    int32_t* d_csr = DeviceAlloc<int32_t>(capacity * 4);

    PrhsSelectParams sp;
    sp.dtype = AttnDType::kBFloat16;
    sp.batch = B;
    sp.num_q_heads = hq;
    sp.num_kv_heads = hkv;
    sp.head_dim = D;
    sp.max_seq_len = ctx;
    sp.sink = o_.sink;
    sp.local = o_.local;
    sp.tau = 0.8f;
    sp.max_reuse = 64;
    sp.dilate_r = 1;
    sp.dilate_m_fraction = 1.0 / 3.0;
    sp.d_k_pool = k_pool;
    sp.d_page_indptr = d_indptr;
    sp.d_seq_lens = d_lens;
    sp.d_topk = d_topk;
    sp.anchor_stride = anchor_stride;
    sp.d_refresh = d_refresh;
    sp.d_cos = d_cos;
    sp.d_delta = d_delta;
    sp.d_index_indptr = d_csr_indptr;
    sp.d_index_indices = d_csr;
    sp.index_capacity = capacity;
    auto sel_for = [&](int s) {
      PrhsSelectParams p = sp;
      p.d_q = d_q + q_elems * s;
      p.d_page_indices = d_pages + set_pages * s;
      p.d_anchor_q = d_anchor[s];
      p.d_reuse = d_reuse[s];
      p.d_valid = d_valid[s];
      p.d_anchor_set = d_aset[s];
      p.d_anchor_count = d_acount[s];
      return p;
    };
    {
      PrhsSelectParams p = sel_for(0);
      if (const char* e = kernels::PrhsSelectCheck(p)) {
        std::fprintf(stderr, "PrhsSelectCheck: %s\n", e);
        std::exit(1);
      }
    }
    const size_t sel_ws = kernels::PrhsSelectWorkspaceBytes(sel_for(0));
    void* d_sel_ws = DeviceAlloc(sel_ws);
    sp.d_workspace = d_sel_ws;
    sp.workspace_bytes = sel_ws;

    PagedDecodeParams ap;
    ap.dtype = AttnDType::kBFloat16;
    ap.batch = B;
    ap.num_q_heads = hq;
    ap.num_kv_heads = hkv;
    ap.head_dim = D;
    ap.d_k_pool = k_pool;
    ap.d_v_pool = v_pool;
    ap.d_page_indptr = d_indptr;
    ap.d_seq_lens = d_lens;
    ap.d_q = d_q;
    ap.d_out = d_out;
    ap.d_page_indices = d_pages;
    ap.d_index_indptr = d_csr_indptr;
    ap.d_index_indices = d_csr;
    PagedDecodeParams dense = ap, sparse = ap;
    dense.selection = KvSelection::kDense;
    dense.max_kv_len = ctx;
    sparse.selection = KvSelection::kToken;
    sparse.max_kv_len = max_list;
    const size_t attn_ws = std::max(kernels::PagedDecodeWorkspaceBytes(dense),
                                    kernels::PagedDecodeWorkspaceBytes(sparse));
    if (attn_ws == SIZE_MAX) {
      std::fprintf(stderr, "attention workspace query failed\n");
      std::exit(1);
    }
    void* d_attn_ws = DeviceAlloc(attn_ws);
    for (PagedDecodeParams* p : {&dense, &sparse}) {
      p->d_workspace = d_attn_ws;
      p->workspace_bytes = attn_ws;
    }
    auto attn_for = [&](PagedDecodeParams p, int s) {
      p.d_q = d_q + q_elems * s;
      p.d_out = d_out + q_elems * s;
      p.d_page_indices = d_pages + set_pages * s;
      return p;
    };

    // Initial refresh of every row of every set (valid = 0 → all refresh), so shared rows have
    // a real top-k set from these keys.
    for (int s = 0; s < sets; ++s) CHECK_CUDA(kernels::PrhsSelectStep(sel_for(s), stream_));
    CHECK_CUDA(cudaStreamSynchronize(stream_));

    auto log = [&](const Record& r) {
      out->push_back(r);
      std::printf("%-12s ctx=%-6d rate=%-5.2f %9.1f us  gate %6.1f score %7.1f select %6.1f "
                  "lists %5.1f attn %7.1f  kept %.4f refreshed %d/%d k=%d\n",
                  r.op.c_str(), r.ctx, r.rate, r.us, r.gate_us, r.score_us, r.select_us,
                  r.lists_us, r.attn_us, r.kept_fraction, r.refreshed_rows, rows, r.k);
      std::fflush(stdout);
    };
    auto nop = [](int) {};

    // ---- dense (ours)
    {
      CHECK_CUDA(cudaMemsetAsync(d_out, 0xff, q_elems * 2 * sets, stream_));
      const auto t = TimeStages(
          nop, {[&](int i) {
            CHECK_CUDA(kernels::PagedDecodeAttention(attn_for(dense, i % sets), stream_));
          }},
          o_.reps, false, stream_);
      if (!AllFinite(d_out, q_elems)) {
        std::fprintf(stderr, "dense output has non-finite values\n");
        std::exit(1);
      }
      Record r{"dense", ctx, -1, t[0]};
      r.attn_us = t[0];
      r.kept_fraction = 1.0;
      r.budget_tokens = static_cast<int>(budget_tokens);
      log(r);
    }

    // ---- PrHS at each refresh rate
    std::vector<uint16_t> h_q(q_elems);
    for (double rate : o_.rates) {
      const int n_ref = static_cast<int>(std::lround(rate * rows));
      for (int s = 0; s < sets; ++s) {
        h_q = Download(d_q + q_elems * s, q_elems);
        std::vector<int> order(rows);
        std::iota(order.begin(), order.end(), 0);
        std::mt19937 rr(977 * s + static_cast<unsigned>(rate * 1000) + ctx);
        std::shuffle(order.begin(), order.end(), rr);
        std::vector<uint16_t> anchor(anchor_elems);
        for (int i = 0; i < rows; ++i) {
          const int r = order[i];
          const int b = r / hkv, h = r % hkv;
          const uint16_t* qg = h_q.data() + (static_cast<size_t>(b) * hq + h * G) * D;
          for (int e = 0; e < G * D; ++e) {
            // refreshed rows: -q (cos = -1); shared rows: q (cos = 1)
            anchor[static_cast<size_t>(r) * G * D + e] = i < n_ref ? (qg[e] ^ 0x8000) : qg[e];
          }
        }
        CHECK_CUDA(cudaMemcpy(d_pristine[s], anchor.data(), anchor_elems * 2,
                              cudaMemcpyHostToDevice));
      }
      auto prepare = [&](int i) {
        const int s = i % sets;
        CHECK_CUDA(cudaMemcpyAsync(d_anchor[s], d_pristine[s], anchor_elems * 2,
                                   cudaMemcpyDeviceToDevice, stream_));
        CHECK_CUDA(cudaMemsetAsync(d_reuse[s], 0, rows * 4, stream_));
      };
      // One checked step: refresh count, real kept fraction, finite output.
      prepare(0);
      CHECK_CUDA(kernels::PrhsSelectStep(sel_for(0), stream_));
      CHECK_CUDA(cudaMemsetAsync(d_out, 0xff, q_elems * 2, stream_));
      CHECK_CUDA(kernels::PagedDecodeAttention(attn_for(sparse, 0), stream_));
      CHECK_CUDA(cudaStreamSynchronize(stream_));
      const std::vector<int32_t> flags = Download(d_refresh, rows);
      const std::vector<int32_t> ip = Download(d_csr_indptr, rows + 1);
      int refreshed = 0;
      for (int f : flags) refreshed += f != 0;
      int max_row = 0;
      for (int r = 0; r < rows; ++r) max_row = std::max(max_row, ip[r + 1] - ip[r]);
      if (refreshed != n_ref || max_row > max_list || ip[rows] > capacity ||
          !AllFinite(d_out, q_elems)) {
        std::fprintf(stderr, "PrHS step check failed: refreshed %d (want %d), longest list %d "
                     "(bound %d), total %d (capacity %lld)\n", refreshed, n_ref, max_row, max_list,
                     ip[rows], static_cast<long long>(capacity));
        std::exit(1);
      }
      const double kept = static_cast<double>(ip[rows]) / rows / ctx;

      const std::vector<std::function<void(int)>> stages{
          [&](int i) { CHECK_CUDA(kernels::PrhsGate(sel_for(i % sets), stream_)); },
          [&](int i) { CHECK_CUDA(kernels::PrhsRefreshScores(sel_for(i % sets), stream_)); },
          [&](int i) { CHECK_CUDA(kernels::PrhsRefreshSelect(sel_for(i % sets), stream_)); },
          [&](int i) { CHECK_CUDA(kernels::PrhsBuildIndexLists(sel_for(i % sets), stream_)); },
          [&](int i) {
            CHECK_CUDA(kernels::PagedDecodeAttention(attn_for(sparse, i % sets), stream_));
          }};
      const auto total = TimeStages(prepare, stages, o_.reps, false, stream_);
      const auto parts = TimeStages(prepare, stages, o_.reps, true, stream_);
      const std::vector<std::function<void(int)>> select_only(stages.begin(), stages.end() - 1);
      const auto sel = TimeStages(prepare, select_only, o_.reps, false, stream_);
      Record r{"prhs", ctx, rate, total[0]};
      r.gate_us = parts[1];
      r.score_us = parts[2];
      r.select_us = parts[3];
      r.lists_us = parts[4];
      r.attn_us = parts[5];
      r.kept_fraction = kept;
      r.refreshed_rows = refreshed;
      r.k = k;
      r.budget_tokens = static_cast<int>(budget_tokens);
      r.max_list = max_list;
      log(r);
      Record rs{"prhs_select", ctx, rate, sel[0]};
      rs.kept_fraction = kept;
      rs.refreshed_rows = refreshed;
      rs.k = k;
      rs.budget_tokens = static_cast<int>(budget_tokens);
      log(rs);
    }
    // ---- sparse attention alone on the last lists (what selection adds on top of)
    {
      const auto t = TimeStages(
          nop, {[&](int i) {
            CHECK_CUDA(kernels::PagedDecodeAttention(attn_for(sparse, i % sets), stream_));
          }},
          o_.reps, false, stream_);
      Record r{"sparse_attn", ctx, -1, t[0]};
      r.attn_us = t[0];
      r.k = k;
      r.budget_tokens = static_cast<int>(budget_tokens);
      log(r);
    }

    for (void* p : std::initializer_list<void*>{k_pool, v_pool, d_pages, d_indptr, d_lens, d_topk,
                                                d_q, d_out, d_refresh, d_cos, d_delta,
                                                d_csr_indptr, d_csr, d_sel_ws, d_attn_ws}) {
      CHECK_CUDA(cudaFree(p));
    }
    for (int s = 0; s < sets; ++s) {
      for (void* p : std::initializer_list<void*>{d_anchor[s], d_pristine[s], d_reuse[s],
                                                  d_valid[s], d_aset[s], d_acount[s]}) {
        CHECK_CUDA(cudaFree(p));
      }
    }
  }

 private:
  Options o_;
  cudaStream_t stream_;
};

}  // namespace
}  // namespace prehoc::bench

int main(int argc, char** argv) {
  using namespace prehoc::bench;
  const Options o = ParseArgs(argc, argv);
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s, %d SMs, L2 %.0f MB, %.1f GB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize / 1e6, prop.totalGlobalMem / 1e9);
  std::printf("shape: batch %d, q heads %d, kv heads %d, head_dim %d, bf16, budget 1/%d%s\n",
              o.batch, o.q_heads, o.kv_heads, o.head_dim, o.budget,
              o.budget_matched ? " (budget-matched k)" : "");
  Bench bench(o);
  std::vector<Record> records;
  for (int ctx : o.ctxs) bench.RunCtx(ctx, &records);
  if (!o.json.empty()) {
    FILE* f = std::fopen(o.json.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "cannot write %s\n", o.json.c_str());
      return 1;
    }
    std::fprintf(f, "{\"device\": \"%s\", \"batch\": %d, \"q_heads\": %d, \"kv_heads\": %d, "
                 "\"head_dim\": %d, \"budget\": %d, \"budget_matched\": %s, \"records\": [\n",
                 prop.name, o.batch, o.q_heads, o.kv_heads, o.head_dim, o.budget,
                 o.budget_matched ? "true" : "false");
    for (size_t i = 0; i < records.size(); ++i) {
      const Record& r = records[i];
      std::fprintf(f,
                   "  {\"op\": \"%s\", \"ctx\": %d, \"rate\": %.3f, \"us\": %.3f, \"gate_us\": %.3f, "
                   "\"score_us\": %.3f, \"select_us\": %.3f, \"lists_us\": %.3f, "
                   "\"attn_us\": %.3f, \"kept_fraction\": %.5f, \"refreshed_rows\": %d, "
                   "\"k\": %d, \"budget_tokens\": %d, \"max_list\": %d}%s\n",
                   r.op.c_str(), r.ctx, r.rate, r.us, r.gate_us, r.score_us, r.select_us,
                   r.lists_us, r.attn_us, r.kept_fraction, r.refreshed_rows, r.k,
                   r.budget_tokens, r.max_list, i + 1 < records.size() ? "," : "");
    }
    std::fprintf(f, "]}\n");
    std::fclose(f);
  }
  return 0;
}
