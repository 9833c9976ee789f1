// Benchmark of paged decode attention: dense, token-sparse and page-sparse (with and without the
// keep-mask -> CSR construction), plus the device-to-device copy bandwidth, in one process.
//
//   attention_bench [--batch=1,8,16] [--kv-heads=32,8] [--ctx=4096,16384,65536,131072]
//                   [--keep=8,16,32] [--q-heads=32] [--head-dim=128] [--dtype=bf16|f16]
//                   [--reps=30] [--json=PATH] [--splits=N] [--fuse-reduction=0|1]
//                   [--mask-split=0|4096|16384]
//                   [--placement=random|sequential]
//                   [--ops=dense,token,mask,rand,page] [--timeline=0|1]
//
// Method: CUDA events around every repetition, median over --reps after 3 warm-ups; each
// repetition uses the next of R input sets (R * set bytes >= 512 MiB, so L2 (50 MB) is not what
// is measured); a spin kernel is queued first so host launch overhead is not timed (as with CUDA
// graphs). Sparse selections are stratified random: one token (page) out of every `keep` per
// (sequence, kv head), so every row keeps exactly ceil(len / keep) items.
// Ops: dense; sparse_token+build (BuildIndexListsFromMask + kToken attention), build_token,
// sparse_token (attention on prebuilt lists), sparse_mask (kTokenMask: the keep-mask compacted
// inside the attention launch, construction included), sparse_token_rand+build, sparse_page+build,
// sparse_page. --fuse-reduction=1 merges the splits in the attention launch (PagedDecodeParams::
// fuse_reduction; default 0, the API's default: the reduction kernel measured faster).
// --mask-split sets PagedDecodeParams::mask_split_positions (0 = the planner's choice, 4096 = short
// kTokenMask splits, 16384 (8192 at head_dim 64) = long splits).
// Output: a table on stdout, and one JSON object per measurement in --json (a JSON array).
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

namespace prehoc::bench {
namespace {

using kernels::AttnDType;
using kernels::KvSelection;
using kernels::PagedDecodeParams;

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
  std::vector<int> batches{1, 8, 16};
  std::vector<int> kv_heads{32, 8};
  std::vector<int> ctxs{4096, 16384, 65536, 131072};
  std::vector<int> keeps{8, 16, 32};
  int q_heads = 32;
  int head_dim = 128;
  bool bf16 = true;
  int reps = 30;
  int splits = 0;
  bool fuse = false;
  int mask_split = 0;
  bool sequential_pages = false;
  bool timeline = false;
  std::string ops = "dense,token,mask,rand,page";  // op groups to run
  std::string json;
};

std::vector<int> ParseList(const std::string& s) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(std::atoi(item.c_str()));
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
    if (auto v = val("--batch")) o.batches = ParseList(v);
    else if (auto v = val("--kv-heads")) o.kv_heads = ParseList(v);
    else if (auto v = val("--ctx")) o.ctxs = ParseList(v);
    else if (auto v = val("--keep")) o.keeps = ParseList(v);
    else if (auto v = val("--q-heads")) o.q_heads = std::atoi(v);
    else if (auto v = val("--head-dim")) o.head_dim = std::atoi(v);
    else if (auto v = val("--dtype")) o.bf16 = std::string(v) != "f16";
    else if (auto v = val("--reps")) o.reps = std::max(1, std::atoi(v));
    else if (auto v = val("--splits")) o.splits = std::atoi(v);
    else if (auto v = val("--fuse-reduction")) o.fuse = std::atoi(v) != 0;
    else if (auto v = val("--mask-split")) o.mask_split = std::atoi(v);
    else if (auto v = val("--placement")) o.sequential_pages = std::string(v) == "sequential";
    else if (auto v = val("--ops")) o.ops = v;
    else if (auto v = val("--timeline")) o.timeline = std::atoi(v) != 0;
    else if (auto v = val("--json")) o.json = v;
    else {
      std::fprintf(stderr, "attention_bench: unknown argument '%s'\n", a.c_str());
      std::exit(2);
    }
  }
  return o;
}

template <typename T = void>
T* DeviceAlloc(size_t bytes) {
  void* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(bytes, 16)));
  return static_cast<T*>(p);
}

template <typename T>
T* Upload(const std::vector<T>& v) {
  T* d = DeviceAlloc<T>(v.size() * sizeof(T));
  if (!v.empty()) CHECK_CUDA(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// Median of `reps` timed repetitions of op(rep) in microseconds.
double TimeUs(const std::function<void(int)>& op, int reps, cudaStream_t stream) {
  for (int i = 0; i < 3; ++i) op(i);
  CHECK_CUDA(cudaStreamSynchronize(stream));
  std::vector<cudaEvent_t> ev(2 * reps);
  for (auto& e : ev) CHECK_CUDA(cudaEventCreate(&e));
  CHECK_CUDA(Spin(static_cast<uint64_t>(reps) * 40000 + 1000000, stream));
  for (int i = 0; i < reps; ++i) {
    CHECK_CUDA(cudaEventRecord(ev[2 * i], stream));
    op(i);
    CHECK_CUDA(cudaEventRecord(ev[2 * i + 1], stream));
  }
  CHECK_CUDA(cudaStreamSynchronize(stream));
  std::vector<double> us(reps);
  for (int i = 0; i < reps; ++i) {
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]));
    us[i] = ms * 1000.0;
  }
  for (auto& e : ev) CHECK_CUDA(cudaEventDestroy(e));
  std::sort(us.begin(), us.end());
  return us[reps / 2];
}

struct Record {
  std::string op;
  int batch, kv_heads, q_heads, head_dim, ctx, keep;  // keep = 1/fraction (1 = dense)
  double us;
  double kv_bytes;    // K+V bytes of the attended tokens
  double read_bytes;  // every byte the op reads (KV, q, index lists, masks, page tables)
  int splits, ctas;
  bool mask_long;  // kTokenMask long splits
};

std::string Json(const Record& r, const std::string& dtype) {
  char buf[512];
  std::snprintf(buf, sizeof(buf),
                "{\"impl\": \"prehoc\", \"op\": \"%s\", \"dtype\": \"%s\", \"batch\": %d, "
                "\"kv_heads\": %d, \"q_heads\": %d, \"head_dim\": %d, \"ctx\": %d, \"keep\": %d, "
                "\"us\": %.3f, \"kv_bytes\": %.0f, \"read_bytes\": %.0f, \"bw_kv_gbs\": %.1f, "
                "\"bw_read_gbs\": %.1f, \"splits\": %d, \"ctas\": %d, \"mask_long_splits\": %s}",
                r.op.c_str(), dtype.c_str(), r.batch, r.kv_heads, r.q_heads, r.head_dim, r.ctx,
                r.keep, r.us, r.kv_bytes, r.read_bytes, r.kv_bytes / r.us / 1e3,
                r.read_bytes / r.us / 1e3, r.splits, r.ctas, r.mask_long ? "true" : "false");
  return buf;
}

// Percentile q in [0, 1] of v (sorted copy).
double Pct(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(q * (v.size() - 1) + 0.5)];
}

// Diagnostics (--timeline=1): one launch of `p` with PagedDecodeParams::d_timeline set, then a
// summary of its CTAs' phases (ns from the first CTA's start; percentiles 0/10/50/90/100).
void PrintTimeline(const std::string& op, PagedDecodeParams p, cudaStream_t stream) {
  kernels::PagedDecodePlan plan;
  CHECK_CUDA(kernels::PagedDecodePlanFor(p, &plan));
  const size_t n = static_cast<size_t>(plan.ctas) * 8;
  unsigned long long* d_tl = nullptr;
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&d_tl), n * 8));
  CHECK_CUDA(cudaMemset(d_tl, 0, n * 8));
  p.d_timeline = d_tl;
  CHECK_CUDA(cudaStreamSynchronize(stream));
  CHECK_CUDA(kernels::PagedDecodeAttention(p, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  std::vector<unsigned long long> h(n);
  CHECK_CUDA(cudaMemcpy(h.data(), d_tl, n * 8, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaFree(d_tl));
  unsigned long long t0 = ~0ull, t1 = 0;
  for (size_t i = 0; i < n; i += 8) {
    if (h[i + 1] == 0) continue;
    t0 = std::min(t0, h[i + 1]);
    t1 = std::max(t1, h[i + 2]);
  }
  std::vector<double> start, end, life, rate, issued, first, loop;
  std::vector<int> per_sm(1024, 0);
  for (size_t i = 0; i < n; i += 8) {
    if (h[i + 1] == 0) continue;
    start.push_back(static_cast<double>(h[i + 1] - t0));
    end.push_back(static_cast<double>(h[i + 2] - t0));
    life.push_back(static_cast<double>(h[i + 2] - h[i + 1]));
    if (h[i + 2] > h[i + 1]) rate.push_back(static_cast<double>(h[i + 6]) / (h[i + 2] - h[i + 1]));
    per_sm[h[i] % 1024]++;
  }
  const double cyc_per_ns = Pct(rate, 0.5) > 0 ? Pct(rate, 0.5) : 1.8;
  for (size_t i = 0; i < n; i += 8) {
    if (h[i + 1] == 0) continue;
    issued.push_back(h[i + 3] / cyc_per_ns);
    if (h[i + 4] > 0) first.push_back(h[i + 4] / cyc_per_ns);
    loop.push_back(h[i + 5] / cyc_per_ns);
  }
  auto pr = [](const char* name, const std::vector<double>& v) {
    std::printf(" %s %.0f/%.0f/%.0f/%.0f/%.0f", name, Pct(v, 0), Pct(v, 0.1), Pct(v, 0.5),
                Pct(v, 0.9), Pct(v, 1));
  };
  const int sms = static_cast<int>(
      std::count_if(per_sm.begin(), per_sm.end(), [](int c) { return c > 0; }));
  std::printf("timeline %-12s ctas=%zu sms=%d max/sm=%d span=%.0fns clk=%.2f/ns", op.c_str(),
              start.size(), sms, *std::max_element(per_sm.begin(), per_sm.end()),
              static_cast<double>(t1 - t0), cyc_per_ns);
  pr("start", start);
  pr("issued", issued);
  pr("first", first);
  pr("loop", loop);
  pr("life", life);
  pr("end", end);
  std::printf("\n");
  std::fflush(stdout);
}

// Checks that every output element is finite (outputs were poisoned with NaN before the run).
bool AllFinite(const uint16_t* d_out, size_t n, bool bf16) {
  std::vector<uint16_t> h(n);
  CHECK_CUDA(cudaMemcpy(h.data(), d_out, n * 2, cudaMemcpyDeviceToHost));
  for (uint16_t x : h) {
    const bool nonfinite = bf16 ? (x & 0x7f80) == 0x7f80 : (x & 0x7c00) == 0x7c00;
    if (nonfinite) return false;
  }
  return true;
}

class Bench {
 public:
  explicit Bench(const Options& o) : o_(o) { CHECK_CUDA(cudaStreamCreate(&stream_)); }

  double CopyBandwidthGBs() {
    const size_t bytes = size_t{2} << 30;
    void* a = DeviceAlloc(bytes);
    void* b = DeviceAlloc(bytes);
    CHECK_CUDA(cudaMemsetAsync(a, 1, bytes, stream_));
    const double us = TimeUs(
        [&](int i) {
          CHECK_CUDA(cudaMemcpyAsync(i % 2 ? a : b, i % 2 ? b : a, bytes,
                                     cudaMemcpyDeviceToDevice, stream_));
        },
        20, stream_);
    CHECK_CUDA(cudaFree(a));
    CHECK_CUDA(cudaFree(b));
    return 2.0 * bytes / us / 1e3;  // read + write
  }

  void RunShape(int batch, int hkv, int ctx, std::vector<Record>* out) {
    const int D = o_.head_dim, hq = o_.q_heads;
    const int pages_per_seq = (ctx + 15) / 16;
    const size_t set_pages = static_cast<size_t>(batch) * pages_per_seq;
    const size_t page_bytes = static_cast<size_t>(hkv) * 16 * D * 2;
    const size_t set_kv_bytes = set_pages * page_bytes * 2;
    const int sets = static_cast<int>(
        std::clamp<size_t>((size_t{512} << 20) / set_kv_bytes + 1, 1, 32));
    const size_t pool_pages = sets * set_pages;
    size_t free_b = 0, total_b = 0;
    CHECK_CUDA(cudaMemGetInfo(&free_b, &total_b));
    const int rows = batch * hkv;
    const int stride = (ctx + 15) / 16 * 16;
    const size_t mask_bytes = static_cast<size_t>(sets) * rows * stride;
    const size_t need = pool_pages * page_bytes * 2 + mask_bytes * 2 + (size_t{1} << 30);
    if (need > free_b) {
      std::printf("skip batch=%d kv_heads=%d ctx=%d: needs %.1f GB, %.1f GB free\n", batch, hkv,
                  ctx, need / 1e9, free_b / 1e9);
      return;
    }
    uint16_t* k_pool = DeviceAlloc<uint16_t>(pool_pages * page_bytes);
    uint16_t* v_pool = DeviceAlloc<uint16_t>(pool_pages * page_bytes);
    CHECK_CUDA(FillUniform16(k_pool, pool_pages * page_bytes / 2, 11, o_.bf16, stream_));
    CHECK_CUDA(FillUniform16(v_pool, pool_pages * page_bytes / 2, 12, o_.bf16, stream_));

    // Page placement: a random permutation of the pool, set s owns slice s.
    std::vector<int32_t> perm(pool_pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::mt19937 rng(ctx + batch * 7 + hkv);
    if (!o_.sequential_pages) std::shuffle(perm.begin(), perm.end(), rng);
    int32_t* d_pages = Upload(perm);
    std::vector<int32_t> indptr(batch + 1), lens(batch, ctx);
    for (int b = 0; b <= batch; ++b) indptr[b] = b * pages_per_seq;
    int32_t* d_indptr = Upload(indptr);
    int32_t* d_lens = Upload(lens);
    const size_t q_elems = static_cast<size_t>(batch) * hq * D;
    uint16_t* d_q = DeviceAlloc<uint16_t>(q_elems * 2 * sets);
    CHECK_CUDA(FillUniform16(d_q, q_elems * sets, 13, o_.bf16, stream_));
    uint16_t* d_out = DeviceAlloc<uint16_t>(q_elems * 2 * sets);
    float* d_lse = DeviceAlloc<float>(static_cast<size_t>(batch) * hq * 4 * sets);

    PagedDecodeParams base;
    base.dtype = o_.bf16 ? AttnDType::kBFloat16 : AttnDType::kFloat16;
    base.batch = batch;
    base.num_q_heads = hq;
    base.num_kv_heads = hkv;
    base.head_dim = D;
    base.d_k_pool = k_pool;
    base.d_v_pool = v_pool;
    base.d_page_indptr = d_indptr;
    base.d_seq_lens = d_lens;
    base.force_num_splits = o_.splits;
    base.fuse_reduction = o_.fuse;
    base.mask_split_positions = o_.mask_split == 0      ? 0
                                : o_.mask_split == 4096 ? kernels::kMaskSplitPositions
                                                        : kernels::MaskLongSplitPositions(D);
    // Set 0's tensors (for_set picks a set per repetition); workspace queries need non-null ones.
    base.d_q = d_q;
    base.d_out = d_out;
    base.d_page_indices = d_pages;
    auto for_set = [&](PagedDecodeParams p, int s) {
      p.d_q = d_q + q_elems * s;
      p.d_out = d_out + q_elems * s;
      p.d_lse = d_lse + static_cast<size_t>(batch) * hq * s;
      p.d_page_indices = d_pages + set_pages * s;
      return p;
    };
    // Workspace for the largest plan (dense at full length).
    PagedDecodeParams wsp = base;
    wsp.max_kv_len = ctx;
    wsp.d_q = d_q;
    wsp.d_out = d_out;
    wsp.d_page_indices = d_pages;
    wsp.d_index_indptr = d_indptr;  // planning checks for non-null only
    wsp.d_index_indices = d_indptr;
    wsp.mask_stride = stride;
    wsp.d_mask = reinterpret_cast<const uint8_t*>(d_indptr);
    size_t ws_bytes = 0;
    for (KvSelection sel : {KvSelection::kDense, KvSelection::kToken, KvSelection::kPage,
                            KvSelection::kTokenMask}) {
      wsp.selection = sel;
      const size_t b = kernels::PagedDecodeWorkspaceBytes(wsp);
      if (b == SIZE_MAX) {
        std::fprintf(stderr, "workspace query failed: %s\n", kernels::PagedDecodeCheck(wsp));
        std::exit(1);
      }
      ws_bytes = std::max(ws_bytes, b);
    }
    // Zero-filled once: the fused reduction's tickets start at zero and are left at zero.
    void* d_ws = DeviceAlloc(ws_bytes);
    CHECK_CUDA(cudaMemset(d_ws, 0, ws_bytes));
    base.d_workspace = d_ws;
    base.workspace_bytes = ws_bytes;
    // A different max_kv_len can plan more splits: grow the workspace (outside timed regions).
    auto ensure_ws = [&](PagedDecodeParams* p) {
      const size_t need = kernels::PagedDecodeWorkspaceBytes(*p);
      if (need == SIZE_MAX) {
        std::fprintf(stderr, "workspace query failed: %s\n", kernels::PagedDecodeCheck(*p));
        std::exit(1);
      }
      if (need > ws_bytes) {
        CHECK_CUDA(cudaFree(d_ws));
        d_ws = DeviceAlloc(need);
        CHECK_CUDA(cudaMemset(d_ws, 0, need));
        ws_bytes = need;
      }
      base.d_workspace = p->d_workspace = d_ws;
      base.workspace_bytes = p->workspace_bytes = ws_bytes;
    };

    auto record = [&](const std::string& op, int keep, double us, double kv, double read,
                      const PagedDecodeParams& p) {
      kernels::PagedDecodePlan plan;
      CHECK_CUDA(kernels::PagedDecodePlanFor(p, &plan));
      Record r{op, batch, hkv, hq, D, ctx, keep, us, kv, read, plan.num_splits, plan.ctas,
               plan.mask_long_splits};
      out->push_back(r);
      std::printf("%-20s B=%-2d Hkv=%-2d ctx=%-6d keep=1/%-2d %9.1f us  kv %7.1f GB/s  all %7.1f GB/s  "
                  "splits=%d ctas=%d%s\n",
                  op.c_str(), batch, hkv, ctx, keep, us, kv / us / 1e3, read / us / 1e3,
                  plan.num_splits, plan.ctas, plan.mask_long_splits ? " long" : "");
      std::fflush(stdout);
    };
    const double q_out_bytes = 2.0 * q_elems * 2;

    // Op groups (--ops): dense; token (token+build, build, token); mask; rand; page (both).
    auto want = [&](const char* group) {
      return ("," + o_.ops + ",").find(std::string(",") + group + ",") != std::string::npos;
    };
    // ---- dense
    if (want("dense")) {
      PagedDecodeParams p = base;
      p.selection = KvSelection::kDense;
      p.max_kv_len = ctx;
      CHECK_CUDA(cudaMemsetAsync(d_out, 0xff, q_elems * 2 * sets, stream_));
      const double us = TimeUs(
          [&](int i) { CHECK_CUDA(kernels::PagedDecodeAttention(for_set(p, i % sets), stream_)); },
          o_.reps, stream_);
      if (!AllFinite(d_out, q_elems, o_.bf16)) {
        std::fprintf(stderr, "dense output has non-finite values\n");
        std::exit(1);
      }
      const double kv = static_cast<double>(batch) * hkv * ctx * D * 4;
      record("dense", 1, us, kv, kv + q_out_bytes / 2 + batch * pages_per_seq * 4.0,
             for_set(p, 0));
      if (o_.timeline) PrintTimeline("dense", for_set(p, 0), stream_);
    }

    // ---- sparse
    const int page_stride = (pages_per_seq + 15) / 16 * 16;
    uint8_t* d_mask = DeviceAlloc<uint8_t>(mask_bytes);
    uint8_t* d_page_mask = DeviceAlloc<uint8_t>(static_cast<size_t>(sets) * rows * page_stride);
    int32_t* d_counts = DeviceAlloc<int32_t>(static_cast<size_t>(rows) * 4);
    int32_t* d_csr_indptr = DeviceAlloc<int32_t>(static_cast<size_t>(sets) * (rows + 1) * 4);
    for (int keep : o_.keeps) {
      const int k_tok = (ctx + keep - 1) / keep;
      const int k_pages = (pages_per_seq + keep - 1) / keep;
      const size_t cap =
          static_cast<size_t>(rows) * (std::max(k_tok, k_pages) + k_tok / 4 + 256);
      int32_t* d_csr = DeviceAlloc<int32_t>(cap * 4 * sets);
      for (int s = 0; s < sets; ++s) {
        CHECK_CUDA(MakeStratifiedMask(d_mask + static_cast<size_t>(s) * rows * stride, rows,
                                      stride, ctx, keep, 1000 + s * 31 + keep, stream_));
        CHECK_CUDA(MakeStratifiedMask(d_page_mask + static_cast<size_t>(s) * rows * page_stride,
                                      rows, page_stride, pages_per_seq, keep, 2000 + s * 31 + keep,
                                      stream_));
      }
      auto set_csr = [&](PagedDecodeParams p, int s) {
        p = for_set(p, s);
        p.d_index_indptr = d_csr_indptr + static_cast<size_t>(s) * (rows + 1);
        p.d_index_indices = d_csr + cap * s;
        return p;
      };
      auto build = [&](int s, bool pages) {
        const uint8_t* m = pages ? d_page_mask + static_cast<size_t>(s) * rows * page_stride
                                 : d_mask + static_cast<size_t>(s) * rows * stride;
        CHECK_CUDA(kernels::BuildIndexListsFromMask(
            m, rows, pages ? page_stride : stride, d_counts,
            d_csr_indptr + static_cast<size_t>(s) * (rows + 1), d_csr + cap * s, stream_));
      };
      const double kv_tok = static_cast<double>(rows) * k_tok * D * 4;
      const double idx_tok = static_cast<double>(rows) * k_tok * 4;
      // page table reads (one per attended token, mostly L1/L2 hits) are not counted.
      PagedDecodeParams pt = base;
      pt.selection = KvSelection::kToken;
      pt.max_kv_len = k_tok;
      pt.d_index_indptr = pt.d_index_indices = d_csr_indptr;  // for the workspace query
      ensure_ws(&pt);
      double us = 0;
      // token: construction + attention
      if (want("token")) {
        CHECK_CUDA(cudaMemsetAsync(d_out, 0xff, q_elems * 2 * sets, stream_));
        us = TimeUs(
            [&](int i) {
              const int s = i % sets;
              build(s, false);
              CHECK_CUDA(kernels::PagedDecodeAttention(set_csr(pt, s), stream_));
            },
            o_.reps, stream_);
        if (!AllFinite(d_out, q_elems, o_.bf16)) {
          std::fprintf(stderr, "token-sparse output has non-finite values\n");
          std::exit(1);
      }
      record("sparse_token+build", keep, us, kv_tok,
             kv_tok + 2.0 * rows * stride + idx_tok + q_out_bytes / 2, set_csr(pt, 0));
      // token: construction only
      us = TimeUs([&](int i) { build(i % sets, false); }, o_.reps, stream_);
      record("build_token", keep, us, 0, 2.0 * rows * stride + idx_tok, set_csr(pt, 0));
      // token: attention only (lists built above for every set)
      for (int s = 0; s < sets; ++s) build(s, false);
      us = TimeUs(
          [&](int i) {
            CHECK_CUDA(kernels::PagedDecodeAttention(set_csr(pt, i % sets), stream_));
          },
          o_.reps, stream_);
      record("sparse_token", keep, us, kv_tok, kv_tok + idx_tok + q_out_bytes / 2, set_csr(pt, 0));
      if (o_.timeline) PrintTimeline("sparse_token", set_csr(pt, 0), stream_);
      }
      // token from the keep-mask, compaction fused into the attention launch
      if (want("mask")) {
        PagedDecodeParams pm = base;
        pm.selection = KvSelection::kTokenMask;
        pm.max_kv_len = k_tok;
        pm.mask_stride = stride;
        pm.d_mask = d_mask;
        ensure_ws(&pm);
        auto set_mask = [&](PagedDecodeParams p, int s) {
          p = for_set(p, s);
          p.d_mask = d_mask + static_cast<size_t>(s) * rows * stride;
          return p;
        };
        CHECK_CUDA(cudaMemsetAsync(d_out, 0xff, q_elems * 2 * sets, stream_));
        us = TimeUs(
            [&](int i) {
              CHECK_CUDA(kernels::PagedDecodeAttention(set_mask(pm, i % sets), stream_));
            },
            o_.reps, stream_);
        if (!AllFinite(d_out, q_elems, o_.bf16)) {
          std::fprintf(stderr, "mask-sparse output has non-finite values\n");
          std::exit(1);
        }
        record("sparse_mask", keep, us, kv_tok, kv_tok + 1.0 * rows * stride + q_out_bytes / 2,
               set_mask(pm, 0));
        if (o_.timeline) PrintTimeline("sparse_mask", set_mask(pm, 0), stream_);
      }
      // token, independent random selection per head (Bernoulli 1/keep; no cross-head locality)
      if (want("rand")) {
        for (int s = 0; s < sets; ++s) {
          CHECK_CUDA(MakeBernoulliMask(d_mask + static_cast<size_t>(s) * rows * stride, rows,
                                       stride, ctx, keep, 3000 + s * 31 + keep, stream_));
        }
        PagedDecodeParams pr = pt;
        pr.max_kv_len = k_tok + k_tok / 4 + 256;  // > 8 sigma above the mean count
        pr.d_index_indptr = pr.d_index_indices = d_csr_indptr;  // for the workspace query
        ensure_ws(&pr);
        // capacity: cap >= rows * k_tok; the Bernoulli rows may hold more, so bound by the mask
        if (static_cast<size_t>(rows) * pr.max_kv_len <= cap) {
          us = TimeUs(
              [&](int i) {
                const int s = i % sets;
                build(s, false);
                CHECK_CUDA(kernels::PagedDecodeAttention(set_csr(pr, s), stream_));
              },
              o_.reps, stream_);
          record("sparse_token_rand+build", keep, us, kv_tok,
                 kv_tok + 2.0 * rows * stride + idx_tok + q_out_bytes / 2, set_csr(pr, 0));
        }
      }
      // page: construction + attention
      if (want("page")) {
        const double kv_page = static_cast<double>(rows) * k_pages * 16 * D * 4;
        PagedDecodeParams pp = base;
        pp.selection = KvSelection::kPage;
        pp.max_kv_len = k_pages * 16;
        pp.d_index_indptr = pp.d_index_indices = d_csr_indptr;  // for the workspace query
        ensure_ws(&pp);
        us = TimeUs(
            [&](int i) {
              const int s = i % sets;
              build(s, true);
              CHECK_CUDA(kernels::PagedDecodeAttention(set_csr(pp, s), stream_));
            },
            o_.reps, stream_);
        record("sparse_page+build", keep, us, kv_page,
               kv_page + 2.0 * rows * page_stride + rows * k_pages * 4.0 + q_out_bytes / 2,
               set_csr(pp, 0));
        // page: attention only
        for (int s = 0; s < sets; ++s) build(s, true);
        us = TimeUs(
            [&](int i) {
              CHECK_CUDA(kernels::PagedDecodeAttention(set_csr(pp, i % sets), stream_));
            },
            o_.reps, stream_);
        record("sparse_page", keep, us, kv_page, kv_page + rows * k_pages * 4.0 + q_out_bytes / 2,
               set_csr(pp, 0));
      }
      CHECK_CUDA(cudaFree(d_csr));
    }
    for (void* p : std::initializer_list<void*>{k_pool, v_pool, d_pages, d_indptr, d_lens, d_q,
                                                d_out, d_lse, d_ws, d_mask, d_page_mask, d_counts,
                                                d_csr_indptr}) {
      CHECK_CUDA(cudaFree(p));
    }
  }

  cudaStream_t stream() const { return stream_; }

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
  Bench bench(o);
  const double copy_gbs = bench.CopyBandwidthGBs();
  std::printf("device-to-device copy: %.1f GB/s (bytes read + written)\n", copy_gbs);
  // Launch floor: what the events measure around one / two (PDL-dependent) empty kernels.
  double empty_us[2];
  for (int n = 1; n <= 2; ++n) {
    empty_us[n - 1] = TimeUs([&](int) { CHECK_CUDA(EmptyLaunches(n, bench.stream())); }, o.reps,
                             bench.stream());
    std::printf("empty kernels x%d: %.2f us\n", n, empty_us[n - 1]);
  }
  std::vector<Record> records;
  for (int hkv : o.kv_heads) {
    for (int b : o.batches) {
      for (int ctx : o.ctxs) bench.RunShape(b, hkv, ctx, &records);
    }
  }
  if (!o.json.empty()) {
    FILE* f = std::fopen(o.json.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "cannot write %s\n", o.json.c_str());
      return 1;
    }
    std::fprintf(f,
                 "{\"device\": \"%s\", \"copy_gbs\": %.1f, \"empty_kernel_us\": %.2f, "
                 "\"empty_kernels2_us\": %.2f, \"records\": [\n",
                 prop.name, copy_gbs, empty_us[0], empty_us[1]);
    for (size_t i = 0; i < records.size(); ++i) {
      std::fprintf(f, "  %s%s\n", Json(records[i], o.bf16 ? "bf16" : "f16").c_str(),
                   i + 1 < records.size() ? "," : "");
    }
    std::fprintf(f, "]}\n");
    std::fclose(f);
  }
  return 0;
}
