// GPU tests of paged decode attention (dense, token-sparse, page-sparse) and of the keep-mask ->
// CSR builder, against the float64 CPU reference. Skipped when no CUDA device is present.
//
// Tolerance (per element, |out - ref| <= atol + rtol * |ref|, plus a relative-norm bound):
//   fp16: atol 5e-4, rtol 1e-3;  bf16: atol 4e-3, rtol 8e-3.
// Derivation: out is rounded to T (half an ulp: 2^-12 fp16, 2^-9 bf16, relative) and p is rounded
// to T before the p·v product (error <= half an ulp × Σ p|v| <= half an ulp, since |v| <= 1);
// fp32 accumulation adds ~1e-6. The bounds are ~2x those worst cases. lse: 2e-4 + 1e-5·|ref|.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "worker/kernels/attention_reference.h"
#include "worker/kernels/paged_decode.h"
#include "worker/testing/gpu_test_util.h"

namespace prehoc::kernels {
namespace {

// Owning device buffer.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) { Resize(bytes); }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void Resize(size_t bytes) {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = bytes;
    if (bytes > 0 && cudaMalloc(&ptr_, bytes) != cudaSuccess) ptr_ = nullptr;
  }
  template <typename T>
  void Upload(const std::vector<T>& v) {
    Resize(std::max<size_t>(v.size() * sizeof(T), 16));
    if (!v.empty()) cudaMemcpy(ptr_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  template <typename T>
  std::vector<T> Download(size_t n) const {
    std::vector<T> v(n);
    if (n > 0) cudaMemcpy(v.data(), ptr_, n * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }
  void Poison() {
    if (ptr_ != nullptr) cudaMemset(ptr_, 0xff, bytes_);  // NaN in fp16, bf16 and f32
  }
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

const char* DTypeName(AttnDType t) { return t == AttnDType::kFloat16 ? "f16" : "bf16"; }

// A batch of sequences in a paged pool with randomly placed pages. Unused pages and the slots past
// each sequence's end hold NaN, so a kernel reading anything it should not produces NaN.
struct PagedBatch {
  AttnDType dtype;
  int num_q_heads, num_kv_heads, head_dim;
  std::vector<int32_t> seq_lens, page_indptr, page_indices;
  std::vector<uint16_t> q, k_pool, v_pool;
  int num_pages = 0;

  PagedBatch(AttnDType dt, int hq, int hkv, int d, const std::vector<int>& lens, uint32_t seed)
      : dtype(dt), num_q_heads(hq), num_kv_heads(hkv), head_dim(d) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> kv_dist(-1.0, 1.0), q_dist(-2.0, 2.0);
    seq_lens.assign(lens.begin(), lens.end());
    int total = 0;
    page_indptr.push_back(0);
    for (int len : lens) {
      total += (len + 15) / 16;
      page_indptr.push_back(total);
    }
    num_pages = total + 5;  // a few never-referenced (NaN) pages
    std::vector<int32_t> perm(num_pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    page_indices.assign(perm.begin(), perm.begin() + total);
    const uint16_t nan_bits = dt == AttnDType::kFloat16 ? 0x7e00 : 0x7fc0;
    const size_t page_elems = static_cast<size_t>(hkv) * 16 * d;
    k_pool.assign(page_elems * num_pages, nan_bits);
    v_pool.assign(page_elems * num_pages, nan_bits);
    for (size_t b = 0; b < lens.size(); ++b) {
      for (int t = 0; t < lens[b]; ++t) {
        const int page = page_indices[page_indptr[b] + t / 16];
        for (int h = 0; h < hkv; ++h) {
          const size_t off = ((static_cast<size_t>(page) * hkv + h) * 16 + t % 16) * d;
          for (int i = 0; i < d; ++i) {
            k_pool[off + i] = DoubleToHalfBits(kv_dist(rng), dt);
            v_pool[off + i] = DoubleToHalfBits(kv_dist(rng), dt);
          }
        }
      }
    }
    q.resize(lens.size() * hq * d);
    for (auto& x : q) x = DoubleToHalfBits(q_dist(rng), dt);
  }
  int batch() const { return static_cast<int>(seq_lens.size()); }
};

enum class Mode {
  kDense,
  kTokenAll,       // every token, ascending (must equal dense bitwise)
  kTokenRandom,    // ~30 % of tokens, ascending
  kTokenShuffled,  // ~30 % of tokens, random order, plus out-of-range entries (ignored)
  kTokenEmpty,
  kPageAll,
  kPageRandom,  // ~50 % of pages, random order
  kPageEmpty,
  kMaskAll,     // keep-mask (kTokenMask) with every position set, garbage past the sequence
  kMaskRandom,  // ~30 % of positions, non-zero bytes of any value, garbage past the sequence
  kMaskEmpty,
  kMaskOne,     // exactly one kept position per row (a random one), garbage past the sequence
};

const char* ModeName(Mode m) {
  switch (m) {
    case Mode::kDense: return "dense";
    case Mode::kTokenAll: return "token_all";
    case Mode::kTokenRandom: return "token_random";
    case Mode::kTokenShuffled: return "token_shuffled";
    case Mode::kTokenEmpty: return "token_empty";
    case Mode::kPageAll: return "page_all";
    case Mode::kPageRandom: return "page_random";
    case Mode::kPageEmpty: return "page_empty";
    case Mode::kMaskAll: return "mask_all";
    case Mode::kMaskRandom: return "mask_random";
    case Mode::kMaskEmpty: return "mask_empty";
    case Mode::kMaskOne: return "mask_one";
  }
  return "?";
}

struct Selection {
  KvSelection kind = KvSelection::kDense;
  std::vector<int32_t> indptr, indices;
  std::vector<uint8_t> mask;  // kTokenMask
  int mask_stride = 0;
  int max_kv_len = 0;
};

// A keep-mask [batch * kv heads][stride] (stride = the longest sequence rounded up to 16, + 16):
// positions past each sequence's end hold random bytes, which the kernel must ignore.
Selection MakeMaskSelection(const PagedBatch& pb, Mode mode, uint32_t seed) {
  std::mt19937 rng(seed);
  std::bernoulli_distribution keep(0.3);
  std::uniform_int_distribution<int> byte(1, 255), any(0, 255);
  std::uniform_int_distribution<int> position(0, 1 << 30);
  Selection sel;
  sel.kind = KvSelection::kTokenMask;
  const int max_len = *std::max_element(pb.seq_lens.begin(), pb.seq_lens.end());
  sel.mask_stride = (max_len + 15) / 16 * 16 + 16;
  sel.mask.assign(static_cast<size_t>(pb.batch()) * pb.num_kv_heads * sel.mask_stride, 0);
  for (int b = 0; b < pb.batch(); ++b) {
    for (int h = 0; h < pb.num_kv_heads; ++h) {
      uint8_t* m = sel.mask.data() + static_cast<size_t>(b * pb.num_kv_heads + h) * sel.mask_stride;
      const int one = pb.seq_lens[b] > 0 ? position(rng) % pb.seq_lens[b] : -1;  // kMaskOne
      for (int t = 0; t < sel.mask_stride; ++t) {
        if (t >= pb.seq_lens[b]) {
          m[t] = static_cast<uint8_t>(any(rng));
        } else if (mode == Mode::kMaskAll || (mode == Mode::kMaskRandom && keep(rng)) ||
                   (mode == Mode::kMaskOne && t == one)) {
          m[t] = static_cast<uint8_t>(byte(rng));
        }
      }
    }
  }
  sel.max_kv_len = mode == Mode::kMaskAll      ? max_len
                   : mode == Mode::kMaskRandom ? max_len / 3
                   : mode == Mode::kMaskOne    ? 1
                                               : 0;
  return sel;
}

Selection MakeSelection(const PagedBatch& pb, Mode mode, uint32_t seed) {
  std::mt19937 rng(seed);
  std::bernoulli_distribution keep_token(0.3), keep_page(0.5);
  if (mode == Mode::kMaskAll || mode == Mode::kMaskRandom || mode == Mode::kMaskEmpty ||
      mode == Mode::kMaskOne) {
    return MakeMaskSelection(pb, mode, seed);
  }
  Selection sel;
  if (mode == Mode::kDense) {
    sel.max_kv_len = *std::max_element(pb.seq_lens.begin(), pb.seq_lens.end());
    return sel;
  }
  const bool page = mode == Mode::kPageAll || mode == Mode::kPageRandom || mode == Mode::kPageEmpty;
  sel.kind = page ? KvSelection::kPage : KvSelection::kToken;
  sel.indptr.push_back(0);
  for (int b = 0; b < pb.batch(); ++b) {
    const int len = pb.seq_lens[b];
    const int items = page ? (len + 15) / 16 : len;
    for (int h = 0; h < pb.num_kv_heads; ++h) {
      std::vector<int32_t> row;
      for (int i = 0; i < items; ++i) {
        bool keep = false;
        switch (mode) {
          case Mode::kTokenAll:
          case Mode::kPageAll: keep = true; break;
          case Mode::kTokenRandom:
          case Mode::kTokenShuffled: keep = keep_token(rng); break;
          case Mode::kPageRandom: keep = keep_page(rng); break;
          default: break;
        }
        if (keep) row.push_back(i);
      }
      if (mode == Mode::kTokenShuffled) {
        row.push_back(len);       // out of range: ignored
        row.push_back(-1);        // out of range: ignored
        row.push_back(len + 100);
        std::shuffle(row.begin(), row.end(), rng);
      }
      if (mode == Mode::kPageRandom) std::shuffle(row.begin(), row.end(), rng);
      sel.indices.insert(sel.indices.end(), row.begin(), row.end());
      sel.indptr.push_back(static_cast<int32_t>(sel.indices.size()));
      sel.max_kv_len = std::max<int>(sel.max_kv_len, static_cast<int>(row.size()) * (page ? 16 : 1));
    }
  }
  if (mode == Mode::kPageAll) {
    // Also a valid bound (attended tokens never exceed the sequence); the same bound as dense gives
    // the same split plan, hence bitwise-identical results.
    sel.max_kv_len = *std::max_element(pb.seq_lens.begin(), pb.seq_lens.end());
  }
  return sel;
}

struct DeviceBatch {
  DeviceBuffer q, k, v, indptr, indices, lens, sel_indptr, sel_indices, mask, out, lse, ws;
  explicit DeviceBatch(const PagedBatch& pb) {
    q.Upload(pb.q);
    k.Upload(pb.k_pool);
    v.Upload(pb.v_pool);
    indptr.Upload(pb.page_indptr);
    indices.Upload(pb.page_indices);
    lens.Upload(pb.seq_lens);
    out.Resize(pb.q.size() * 2);
    lse.Resize(std::max<size_t>(pb.seq_lens.size() * pb.num_q_heads * 4, 16));
  }
};

struct RunResult {
  std::vector<uint16_t> out;
  std::vector<float> lse;
  PagedDecodePlan plan;
};

// Runs the kernel with poisoned outputs and workspace; fails the test on any CUDA error. With
// `fuse` (fused reduction) the tickets start at zero, the kernel runs twice (the second launch
// relies on the first having put its tickets back to zero; both outputs must be identical) and
// the tickets must be zero afterwards.
// `timeline`: PagedDecodeParams::d_timeline (diagnostics), null for none. `mask_split`:
// PagedDecodeParams::mask_split_positions (kTokenMask; 0 = the planner's choice).
void RunKernel(const PagedBatch& pb, DeviceBatch& dev, const Selection& sel, int force_splits,
               RunResult* res, bool fuse = false, unsigned long long* timeline = nullptr,
               int mask_split = 0) {
  PagedDecodeParams p;
  p.dtype = pb.dtype;
  p.selection = sel.kind;
  p.batch = pb.batch();
  p.num_q_heads = pb.num_q_heads;
  p.num_kv_heads = pb.num_kv_heads;
  p.head_dim = pb.head_dim;
  p.d_q = dev.q.get();
  p.d_out = dev.out.get();
  p.d_lse = dev.lse.get<float>();
  p.d_k_pool = dev.k.get();
  p.d_v_pool = dev.v.get();
  p.d_page_indptr = dev.indptr.get<int32_t>();
  p.d_page_indices = dev.indices.get<int32_t>();
  p.d_seq_lens = dev.lens.get<int32_t>();
  if (sel.kind == KvSelection::kTokenMask) {
    dev.mask.Upload(sel.mask);
    p.d_mask = dev.mask.get<uint8_t>();
    p.mask_stride = sel.mask_stride;
  } else if (sel.kind != KvSelection::kDense) {
    dev.sel_indptr.Upload(sel.indptr);
    dev.sel_indices.Upload(sel.indices);
    p.d_index_indptr = dev.sel_indptr.get<int32_t>();
    p.d_index_indices = dev.sel_indices.get<int32_t>();
  }
  p.max_kv_len = sel.max_kv_len;
  p.force_num_splits = force_splits;
  p.fuse_reduction = fuse;
  p.mask_split_positions = mask_split;
  p.d_timeline = timeline;
  ASSERT_EQ(PagedDecodeCheck(p), nullptr) << PagedDecodeCheck(p);
  CUDA_OK(PagedDecodePlanFor(p, &res->plan));
  const size_t ws = PagedDecodeWorkspaceBytes(p);
  ASSERT_NE(ws, SIZE_MAX);
  ASSERT_EQ(ws, res->plan.workspace_bytes);
  if (mask_split != 0) {
    ASSERT_EQ(res->plan.mask_long_splits, mask_split != kMaskSplitPositions);
  }
  dev.ws.Resize(std::max<size_t>(ws, 16));
  dev.ws.Poison();
  // Tickets (fused reduction, several splits): the first 16-byte-padded ints of the workspace.
  const size_t ticket_rows = static_cast<size_t>(p.batch) * p.num_kv_heads * res->plan.q_groups;
  const size_t ticket_bytes =
      fuse && res->plan.num_splits > 1 ? (ticket_rows * 4 + 15) / 16 * 16 : 0;
  if (ticket_bytes > 0) {
    CUDA_OK(cudaMemset(dev.ws.get(), 0, ticket_bytes));
  }
  p.d_workspace = dev.ws.get();
  p.workspace_bytes = ws;
  for (int run = 0; run < (fuse ? 2 : 1); ++run) {
    dev.out.Poison();
    dev.lse.Poison();
    CUDA_OK(PagedDecodeAttention(p, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint16_t> out = dev.out.Download<uint16_t>(pb.q.size());
    std::vector<float> lse = dev.lse.Download<float>(pb.seq_lens.size() * pb.num_q_heads);
    if (run == 1) {
      EXPECT_EQ(out, res->out) << "second fused launch differs (tickets not reset?)";
      EXPECT_EQ(0, std::memcmp(lse.data(), res->lse.data(), lse.size() * 4));
    }
    res->out = std::move(out);
    res->lse = std::move(lse);
  }
  if (ticket_bytes > 0) {
    std::vector<uint8_t> all = dev.ws.Download<uint8_t>(ws);
    for (size_t i = 0; i < ticket_bytes; ++i) {
      ASSERT_EQ(all[i], 0) << "ticket byte " << i << " not reset to zero";
    }
  }
}

struct Reference {
  std::vector<double> out, lse;
};

Reference ComputeReference(const PagedBatch& pb, const Selection& sel) {
  HostDecodeArgs a;
  a.dtype = pb.dtype;
  a.selection = sel.kind;
  a.batch = pb.batch();
  a.num_q_heads = pb.num_q_heads;
  a.num_kv_heads = pb.num_kv_heads;
  a.head_dim = pb.head_dim;
  a.q = pb.q.data();
  a.k_pool = pb.k_pool.data();
  a.v_pool = pb.v_pool.data();
  a.page_indptr = pb.page_indptr.data();
  a.page_indices = pb.page_indices.data();
  a.seq_lens = pb.seq_lens.data();
  a.index_indptr = sel.indptr.data();
  a.index_indices = sel.indices.data();
  a.mask = sel.mask.data();
  a.mask_stride = sel.mask_stride;
  Reference r;
  ReferencePagedDecode(a, &r.out, &r.lse);
  return r;
}

void ExpectClose(const PagedBatch& pb, const Reference& reference, const RunResult& got,
                 const std::string& what) {
  const std::vector<double>& ref = reference.out;
  const std::vector<double>& ref_lse = reference.lse;
  const bool f16 = pb.dtype == AttnDType::kFloat16;
  const double atol = f16 ? 5e-4 : 4e-3;
  const double rtol = f16 ? 1e-3 : 8e-3;
  double err2 = 0, ref2 = 0;
  int bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double v = HalfBitsToDouble(got.out[i], pb.dtype);
    if (!std::isfinite(v) || std::fabs(v - ref[i]) > atol + rtol * std::fabs(ref[i])) {
      if (++bad <= 5) {
        ADD_FAILURE() << what << ": out[" << i << "] (row " << i / pb.head_dim << ", dim "
                      << i % pb.head_dim << ") = " << v << ", reference " << ref[i];
      }
    }
    err2 += (v - ref[i]) * (v - ref[i]);
    ref2 += ref[i] * ref[i];
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << ref.size() << " elements out of tolerance";
  if (ref2 > 0) {
    EXPECT_LT(std::sqrt(err2 / ref2), f16 ? 2e-3 : 1.5e-2) << what << ": relative norm error";
  }
  for (size_t i = 0; i < ref_lse.size(); ++i) {
    const double v = got.lse[i];
    if (std::isinf(ref_lse[i])) {
      EXPECT_TRUE(std::isinf(v) && v < 0) << what << ": lse[" << i << "] = " << v << ", want -inf";
    } else {
      EXPECT_NEAR(v, ref_lse[i], 2e-4 + 1e-5 * std::fabs(ref_lse[i])) << what << ": lse[" << i << "]";
    }
  }
}

// ---- parameterised correctness sweep -------------------------------------------------------------

using SweepParam = std::tuple<AttnDType, int /*head_dim*/, int /*group*/, int /*lens set*/>;

const std::vector<std::vector<int>>& LensSets() {
  static const auto* sets = new std::vector<std::vector<int>>{
      {1}, {15}, {17}, {1000}, {4097}, {17, 1, 4097, 0, 1000, 15, 64, 65}};
  return *sets;
}

class PagedDecodeSweep : public ::testing::TestWithParam<SweepParam> {};

TEST_P(PagedDecodeSweep, MatchesReferenceForEverySelection) {
  SKIP_WITHOUT_DEVICE();
  const auto [dtype, head_dim, group, lens_idx] = GetParam();
  const int num_kv_heads = 2;
  const PagedBatch pb(dtype, num_kv_heads * group, num_kv_heads, head_dim, LensSets()[lens_idx],
                      1234u + 17u * lens_idx + 3u * group + head_dim);
  DeviceBatch dev(pb);
  const Mode modes[] = {Mode::kDense,      Mode::kTokenAll,       Mode::kTokenRandom,
                        Mode::kTokenShuffled, Mode::kTokenEmpty,  Mode::kPageAll,
                        Mode::kPageRandom, Mode::kPageEmpty,   Mode::kMaskAll,
                        Mode::kMaskRandom, Mode::kMaskEmpty,   Mode::kMaskOne};
  const int splits[] = {0, 1, 5};  // heuristic, single pass, forced reduction
  RunResult dense[3];
  for (Mode mode : modes) {
    const Selection sel = MakeSelection(pb, mode, 99u + static_cast<uint32_t>(mode));
    const Reference ref = ComputeReference(pb, sel);
    for (int si = 0; si < 3; ++si) {
      RunResult got;
      RunKernel(pb, dev, sel, splits[si], &got);
      if (HasFatalFailure()) return;
      const std::string what = std::string(ModeName(mode)) + " splits=" +
                               std::to_string(got.plan.num_splits) + " (forced " +
                               std::to_string(splits[si]) + ")";
      ExpectClose(pb, ref, got, what);
      if (mode == Mode::kDense) dense[si] = got;
      if (mode == Mode::kTokenAll || mode == Mode::kPageAll ||
          (mode == Mode::kMaskAll && got.plan.num_splits == 1 &&
           dense[si].plan.num_splits == 1)) {
        // Same tiles in the same order as dense: bitwise-identical output and lse.
        EXPECT_EQ(got.out, dense[si].out) << what << " differs bitwise from dense";
        EXPECT_EQ(0, std::memcmp(got.lse.data(), dense[si].lse.data(), got.lse.size() * 4))
            << what << " lse differs bitwise from dense";
      }
      if (got.plan.num_splits > 1) {
        // The fused reduction (last CTA merges) computes the same merge: bitwise identical.
        RunResult fused;
        RunKernel(pb, dev, sel, splits[si], &fused, /*fuse=*/true);
        if (HasFatalFailure()) return;
        EXPECT_EQ(fused.plan.num_splits, got.plan.num_splits);
        EXPECT_EQ(fused.out, got.out) << what << ": fused reduction differs bitwise";
        EXPECT_EQ(0, std::memcmp(fused.lse.data(), got.lse.data(), got.lse.size() * 4))
            << what << ": fused reduction lse differs bitwise";
      }
      if (sel.kind == KvSelection::kTokenMask) {
        // Long splits (forced; the planner picks them for large grids only) compact the same
        // positions: within the reference's tolerance, and bitwise equal to short splits when
        // both plans have the same splits (a split's list is then the same).
        RunResult long_splits;
        RunKernel(pb, dev, sel, splits[si], &long_splits, false, nullptr,
                  MaskLongSplitPositions(pb.head_dim));
        if (HasFatalFailure()) return;
        ExpectClose(pb, ref, long_splits, what + " long splits");
        if (long_splits.plan.num_splits == got.plan.num_splits &&
            long_splits.plan.split_positions == got.plan.split_positions) {
          EXPECT_EQ(long_splits.out, got.out) << what << ": long splits differ bitwise";
          EXPECT_EQ(0, std::memcmp(long_splits.lse.data(), got.lse.data(), got.lse.size() * 4))
              << what << ": long splits lse differs bitwise";
        }
      }
    }
  }
}

std::string SweepName(const ::testing::TestParamInfo<SweepParam>& info) {
  return std::string(DTypeName(std::get<0>(info.param))) + "_d" +
         std::to_string(std::get<1>(info.param)) + "_g" + std::to_string(std::get<2>(info.param)) +
         "_lens" + std::to_string(std::get<3>(info.param));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, PagedDecodeSweep,
    ::testing::Combine(::testing::Values(AttnDType::kFloat16, AttnDType::kBFloat16),
                       ::testing::Values(64, 128), ::testing::Values(1, 4, 8),
                       ::testing::Range(0, 6)),
    SweepName);

// Group sizes that are not a power of two and above 16 (several 16-head query groups per kv head).
TEST(PagedDecode, OddAndLargeGroups) {
  SKIP_WITHOUT_DEVICE();
  for (AttnDType dtype : {AttnDType::kFloat16, AttnDType::kBFloat16}) {
    for (auto [hq, hkv] : {std::pair{28, 4}, std::pair{32, 1}, std::pair{40, 2}}) {
      const PagedBatch pb(dtype, hq, hkv, 128, {333, 2048, 5}, 7u + hq);
      DeviceBatch dev(pb);
      for (Mode mode : {Mode::kDense, Mode::kTokenRandom, Mode::kPageRandom}) {
        const Selection sel = MakeSelection(pb, mode, 5u);
        RunResult got;
        RunKernel(pb, dev, sel, 0, &got);
        if (HasFatalFailure()) return;
        ExpectClose(pb, ComputeReference(pb, sel), got,
                    std::string(DTypeName(dtype)) + " hq=" + std::to_string(hq) + " hkv=" +
                        std::to_string(hkv) + " " + ModeName(mode));
      }
    }
  }
}

// kTokenMask long splits (MaskLongSplitPositions: 16384 positions at head_dim 128, 8192 at 64)
// with more kept positions than the shared-memory list holds (kMaskListCapacity) run in rounds: a
// full mask of 16000 tokens in one split is four rounds at head_dim 128 (two splits of two rounds
// at 64), ~30 % of 16384 positions two rounds; one kept token, an empty mask and short rows too.
// Each matches the reference; the full mask in one split runs dense's tiles in dense's order
// (rounds restart at tile boundaries): bitwise equal to dense; the fused reduction is bitwise
// equal to the reduction kernel.
using RoundsParam = std::tuple<AttnDType, int /*head_dim*/>;
class PagedDecodeMaskRounds : public ::testing::TestWithParam<RoundsParam> {};

TEST_P(PagedDecodeMaskRounds, MatchesReferenceAndDense) {
  SKIP_WITHOUT_DEVICE();
  const auto [dtype, head_dim] = GetParam();
  const int long_positions = MaskLongSplitPositions(head_dim);
  const PagedBatch pb(dtype, 8, 2, head_dim, {16000, 9000, 4097, 5, 0, 1}, 77u + head_dim);
  DeviceBatch dev(pb);
  const Selection dense_sel = MakeSelection(pb, Mode::kDense, 1u);
  RunResult dense;
  RunKernel(pb, dev, dense_sel, 1, &dense);
  if (HasFatalFailure()) return;
  for (Mode mode : {Mode::kMaskAll, Mode::kMaskRandom, Mode::kMaskOne, Mode::kMaskEmpty}) {
    const Selection sel = MakeSelection(pb, mode, 31u + static_cast<uint32_t>(mode));
    const Reference ref = ComputeReference(pb, sel);
    for (int splits : {0, 1, 2, 3}) {
      RunResult got;
      RunKernel(pb, dev, sel, splits, &got, false, nullptr, long_positions);
      if (HasFatalFailure()) return;
      const std::string what = std::string(ModeName(mode)) + " splits=" +
                               std::to_string(got.plan.num_splits) + " (forced " +
                               std::to_string(splits) + ")";
      EXPECT_TRUE(got.plan.mask_long_splits) << what;
      EXPECT_LE(got.plan.split_positions, long_positions) << what;
      ExpectClose(pb, ref, got, what);
      if (mode == Mode::kMaskAll && got.plan.num_splits == 1) {
        EXPECT_EQ(head_dim, 128) << what;
        EXPECT_EQ(got.out, dense.out) << what << " differs bitwise from dense";
        EXPECT_EQ(0, std::memcmp(got.lse.data(), dense.lse.data(), got.lse.size() * 4))
            << what << " lse differs bitwise from dense";
      }
      if (got.plan.num_splits > 1) {
        RunResult fused;
        RunKernel(pb, dev, sel, splits, &fused, /*fuse=*/true, nullptr, long_positions);
        if (HasFatalFailure()) return;
        EXPECT_EQ(fused.out, got.out) << what << ": fused reduction differs bitwise";
      }
      // Launch to launch: bitwise the same.
      RunResult again;
      RunKernel(pb, dev, sel, splits, &again, false, nullptr, long_positions);
      if (HasFatalFailure()) return;
      EXPECT_EQ(again.out, got.out) << what << ": not deterministic";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, PagedDecodeMaskRounds,
                         ::testing::Combine(::testing::Values(AttnDType::kFloat16,
                                                              AttnDType::kBFloat16),
                                            ::testing::Values(64, 128)),
                         [](const ::testing::TestParamInfo<RoundsParam>& info) {
                           return std::string(DTypeName(std::get<0>(info.param))) + "_d" +
                                  std::to_string(std::get<1>(info.param));
                         });

// Heuristic plan at a large shape: many splits, many CTAs; still matches the reference.
TEST(PagedDecode, LongContextHeuristicPlan) {
  SKIP_WITHOUT_DEVICE();
  const PagedBatch pb(AttnDType::kBFloat16, 32, 8, 128, {32768, 3}, 42u);
  DeviceBatch dev(pb);
  for (Mode mode : {Mode::kDense, Mode::kTokenRandom}) {
    const Selection sel = MakeSelection(pb, mode, 8u);
    RunResult got;
    RunKernel(pb, dev, sel, 0, &got);
    if (HasFatalFailure()) return;
    EXPECT_GT(got.plan.num_splits, 1);
    ExpectClose(pb, ComputeReference(pb, sel), got, std::string("long ") + ModeName(mode));
  }
}

// kTokenMask parameters (change `selection` for other modes) with placeholder (never
// dereferenced) tensors, for checks and planning.
alignas(16) const uint8_t kMaskPlaceholder[64] = {};
PagedDecodeParams MaskParamsForChecks(int batch, int num_q_heads, int num_kv_heads) {
  static const int32_t ints[4] = {};
  static uint16_t elems[8] = {};
  PagedDecodeParams p;
  p.dtype = AttnDType::kBFloat16;
  p.selection = KvSelection::kTokenMask;
  p.batch = batch;
  p.num_q_heads = num_q_heads;
  p.num_kv_heads = num_kv_heads;
  p.d_q = p.d_out = elems;
  p.d_k_pool = p.d_v_pool = elems;
  p.d_page_indptr = p.d_page_indices = p.d_seq_lens = ints;
  p.d_mask = kMaskPlaceholder;
  return p;
}

// The heuristic's split count is scored as launched (after rounding splits to whole tiles): its
// last-wave fill is within 0.03 of the best fill any forced split count achieves, and no plan
// with fewer CTAs comes within 0.03 of the best. (B1 / 32 kv heads / 16K once picked 32 splits,
// 4 waves, because 33 splits scored a perfect fill but launch as 32.)
TEST(PagedDecode, HeuristicScoresTheLaunchedSplitCount) {
  SKIP_WITHOUT_DEVICE();
  for (auto [batch, hkv, len] : {std::tuple{1, 32, 16384}, std::tuple{1, 8, 16384},
                                 std::tuple{1, 32, 65536}, std::tuple{8, 8, 16384},
                                 std::tuple{16, 32, 4096}, std::tuple{3, 8, 1000}}) {
    PagedDecodeParams p = MaskParamsForChecks(batch, 32, hkv);
    p.selection = KvSelection::kDense;
    p.num_sms = 132;
    p.max_kv_len = len;
    PagedDecodePlan chosen;
    CUDA_OK(PagedDecodePlanFor(p, &chosen));
    const double slots = 132.0 * chosen.ctas_per_sm;
    auto fill = [&](const PagedDecodePlan& plan) {
      return plan.ctas / (std::ceil(plan.ctas / slots) * slots);
    };
    double best = 0;
    std::vector<PagedDecodePlan> forced;
    for (int s = 1;
         s <= std::min((len + 127) / 128, 4 * static_cast<int>(std::ceil(slots / (batch * hkv))));
         ++s) {
      p.force_num_splits = s;
      forced.emplace_back();
      CUDA_OK(PagedDecodePlanFor(p, &forced.back()));
      best = std::max(best, fill(forced.back()));
    }
    char what[96];
    std::snprintf(what, sizeof(what), "B%d Hkv%d len %d: %d splits", batch, hkv, len,
                  chosen.num_splits);
    EXPECT_GE(fill(chosen), best - 0.03 - 1e-9) << what;
    for (const PagedDecodePlan& f : forced) {
      if (f.ctas < chosen.ctas) {
        EXPECT_LT(fill(f), best - 0.03) << what << " vs " << f.num_splits;
      }
    }
  }
}

// max_kv_len smaller than the real list: the last split absorbs the rest, results stay exact.
TEST(PagedDecode, UnderestimatedMaxLenIsStillCorrect) {
  SKIP_WITHOUT_DEVICE();
  const PagedBatch pb(AttnDType::kFloat16, 8, 2, 128, {3000}, 3u);
  DeviceBatch dev(pb);
  Selection sel = MakeSelection(pb, Mode::kDense, 1u);
  sel.max_kv_len = 100;
  RunResult got;
  RunKernel(pb, dev, sel, 4, &got);
  if (HasFatalFailure()) return;
  ExpectClose(pb, ComputeReference(pb, sel), got, "underestimated max_kv_len");
}

// More splits than MergeSplitsKernel keeps in shared memory (kMergeSmemFloats = 12288): the
// reduction takes its per-thread fallback (MergeRow) and still matches the reference.
TEST(PagedDecode, MoreSplitsThanTheMergeKeepsInSharedMemory) {
  SKIP_WITHOUT_DEVICE();
  const int len = 12289 * 64;  // one 64-token tile per split
  const PagedBatch pb(AttnDType::kBFloat16, 2, 1, 64, {len}, 21u);
  DeviceBatch dev(pb);
  const Selection sel = MakeSelection(pb, Mode::kDense, 1u);
  RunResult got;
  RunKernel(pb, dev, sel, 12289, &got);
  if (HasFatalFailure()) return;
  EXPECT_EQ(got.plan.num_splits, 12289);
  ExpectClose(pb, ComputeReference(pb, sel), got, "12289 splits");
}

// The diagnostic timeline: one record per CTA with a split, consistent stamps, results unchanged.
TEST(PagedDecode, TimelineRecordsEveryCtaAndChangesNothing) {
  SKIP_WITHOUT_DEVICE();
  const PagedBatch pb(AttnDType::kBFloat16, 8, 2, 128, {1000, 4097}, 9u);
  DeviceBatch dev(pb);
  for (Mode mode : {Mode::kDense, Mode::kMaskRandom}) {
    const Selection sel = MakeSelection(pb, mode, 4u);
    RunResult plain;
    RunKernel(pb, dev, sel, 5, &plain);
    if (HasFatalFailure()) return;
    const int ctas = plain.plan.ctas;
    DeviceBuffer tl(static_cast<size_t>(ctas) * 64);
    CUDA_OK(cudaMemset(tl.get(), 0, tl.bytes()));
    RunResult timed;
    RunKernel(pb, dev, sel, 5, &timed, /*fuse=*/false, tl.get<unsigned long long>());
    if (HasFatalFailure()) return;
    EXPECT_EQ(timed.out, plain.out) << ModeName(mode);
    const std::vector<unsigned long long> h = tl.Download<unsigned long long>(ctas * 8);
    int sms = 0;
    CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    int recorded = 0, tiles = 0;
    for (int i = 0; i < ctas; ++i) {
      const unsigned long long* r = &h[8 * i];
      if (r[1] == 0) continue;  // an empty split writes nothing
      ++recorded;
      EXPECT_LT(r[0], static_cast<unsigned long long>(sms));
      EXPECT_LE(r[1], r[2]);
      EXPECT_LE(r[3], r[6]);  // copies issued before the end
      EXPECT_LE(r[5], r[6]);  // main loop done before the end
      if (r[7] > 0) {
        EXPECT_LE(r[3], r[4]);  // the first tile arrives after its copies were issued
      }
      tiles += static_cast<int>(r[7]);
    }
    EXPECT_GT(recorded, 0) << ModeName(mode);
    if (mode == Mode::kDense) {
      // 5 splits of 832 tokens: the 1000-token sequence fills 2, the 4097-token one 5; 2 kv heads.
      EXPECT_EQ(timed.plan.split_tokens, 832);
      EXPECT_EQ(recorded, 2 * (2 + 5));
      EXPECT_EQ(tiles, 2 * ((1000 + 63) / 64 + (4097 + 63) / 64));  // every tile once per kv head
    }
  }
}

// ---- argument checks (no device needed) -----------------------------------------------------------

TEST(PagedDecodeCheck, RejectsUnsupportedConfigs) {
  PagedDecodeParams p;
  p.batch = 0;
  p.num_q_heads = 32;
  p.num_kv_heads = 8;
  EXPECT_EQ(PagedDecodeCheck(p), nullptr);
  p.head_dim = 96;
  EXPECT_STREQ(PagedDecodeCheck(p), "head_dim must be 64 or 128");
  p.head_dim = 128;
  p.page_size = 32;
  EXPECT_STREQ(PagedDecodeCheck(p), "page_size must be 16");
  p.page_size = 16;
  p.num_q_heads = 30;
  EXPECT_STREQ(PagedDecodeCheck(p), "num_q_heads must be a positive multiple of num_kv_heads");
  p.num_q_heads = 32;
  p.batch = 1;
  EXPECT_STREQ(PagedDecodeCheck(p), "d_q is null");
  p.batch = 0;
  p.selection = KvSelection::kToken;
  EXPECT_EQ(PagedDecodeCheck(p), nullptr);  // empty batch: pointers not needed
  PagedDecodePlan plan;
  p.head_dim = 80;
  EXPECT_EQ(PagedDecodePlanFor(p, &plan), cudaErrorInvalidValue);
  EXPECT_EQ(PagedDecodeAttention(p, nullptr), cudaErrorInvalidValue);
}

TEST(PagedDecodeCheck, RejectsBadKeepMasks) {
  PagedDecodeParams p = MaskParamsForChecks(1, 4, 1);
  const uint8_t* mask = p.d_mask;
  p.d_mask = nullptr;
  p.mask_stride = 0;
  EXPECT_STREQ(PagedDecodeCheck(p), "mask_stride must be a positive multiple of 16 (kTokenMask)");
  p.mask_stride = 24;
  EXPECT_STREQ(PagedDecodeCheck(p), "mask_stride must be a positive multiple of 16 (kTokenMask)");
  p.mask_stride = 32;
  EXPECT_STREQ(PagedDecodeCheck(p), "d_mask is null (kTokenMask)");
  p.d_mask = mask + 1;
  EXPECT_STREQ(PagedDecodeCheck(p), "d_mask must be 16-byte aligned (kTokenMask)");
  p.d_mask = mask;
  EXPECT_EQ(PagedDecodeCheck(p), nullptr);  // index lists are not needed for a keep-mask
  p.selection = static_cast<KvSelection>(7);
  EXPECT_STREQ(PagedDecodeCheck(p), "selection must be kDense, kToken, kPage or kTokenMask");
}

// Planning (occupancy is queried from the device): the keep-mask grid has at least ceil(mask_stride / kMaskSplitPositions) splits of at most kMaskSplitPositions
// positions, and the fused reduction adds its tickets to the workspace.
TEST(PagedDecode, MaskPlanAndFusedWorkspace) {
  SKIP_WITHOUT_DEVICE();
  PagedDecodeParams p = MaskParamsForChecks(2, 32, 8);
  p.num_sms = 132;
  p.mask_stride = 65536;
  p.max_kv_len = 64;  // few kept tokens: the heuristic alone would pick one split
  PagedDecodePlan plan;
  CUDA_OK(PagedDecodePlanFor(p, &plan));
  EXPECT_GE(plan.num_splits, 65536 / kMaskSplitPositions);
  EXPECT_LE(plan.split_positions, kMaskSplitPositions);
  EXPECT_GE(static_cast<int64_t>(plan.split_positions) * plan.num_splits, 65536);
  EXPECT_EQ(plan.split_positions % 64, 0);
  const size_t unfused = plan.workspace_bytes;
  p.fuse_reduction = true;
  CUDA_OK(PagedDecodePlanFor(p, &plan));
  EXPECT_EQ(plan.workspace_bytes, unfused + 64);  // 2 * 8 tickets of 4 bytes, 16-padded
  p.force_num_splits = 1;  // raised to the mask's minimum
  CUDA_OK(PagedDecodePlanFor(p, &plan));
  EXPECT_GE(plan.num_splits, 65536 / kMaskSplitPositions);
}

// The planner takes long kTokenMask splits only where short ones would need more than one wave of
// CTAs and long ones need fewer splits, and one long split per row (no reduction) where the rows
// alone cover ~every SM with >= 16 tiles each; long splits keep the occupancy of short ones; the
// field can force either; other values are rejected.
TEST(PagedDecode, MaskLongSplitPlan) {
  SKIP_WITHOUT_DEVICE();
  struct Case {
    int batch, kv_heads, stride, kept, head_dim;
    bool want_long;
    int want_splits, want_positions;
  };
  for (const Case& c : {Case{8, 8, 65536, 4096, 128, true, 4, 16384},
                        Case{8, 8, 16384, 1024, 128, false, 4, 4096},
                        Case{16, 8, 16384, 1024, 128, true, 1, 16384},
                        Case{16, 8, 16384, 512, 128, true, 2, 8192},
                        Case{16, 8, 65536, 4096, 128, true, 4, 16384},
                        Case{16, 8, 4096, 256, 128, false, 2, 2048},
                        Case{1, 8, 16384, 1024, 128, false, 8, 2048},
                        Case{1, 8, 131072, 8192, 128, false, 32, 4096},
                        Case{8, 8, 65536, 4096, 64, true, 8, 8192}}) {
    PagedDecodeParams p = MaskParamsForChecks(c.batch, 32, c.kv_heads);
    p.head_dim = c.head_dim;
    p.num_sms = 132;
    p.mask_stride = c.stride;
    p.max_kv_len = c.kept;
    PagedDecodePlan plan;
    CUDA_OK(PagedDecodePlanFor(p, &plan));
    char what[96];
    std::snprintf(what, sizeof(what), "B%d Hkv%d stride %d d%d", c.batch, c.kv_heads, c.stride,
                  c.head_dim);
    EXPECT_EQ(plan.mask_long_splits, c.want_long) << what;
    EXPECT_EQ(plan.num_splits, c.want_splits) << what;
    EXPECT_EQ(plan.split_positions, c.want_positions) << what;
    PagedDecodeParams dense = p;
    dense.selection = KvSelection::kDense;
    PagedDecodePlan dense_plan;
    CUDA_OK(PagedDecodePlanFor(dense, &dense_plan));
    EXPECT_EQ(plan.ctas_per_sm, dense_plan.ctas_per_sm) << what;
    for (int forced : {kMaskSplitPositions, MaskLongSplitPositions(c.head_dim)}) {
      p.mask_split_positions = forced;
      CUDA_OK(PagedDecodePlanFor(p, &plan));
      EXPECT_EQ(plan.mask_long_splits, forced != kMaskSplitPositions) << what;
      EXPECT_LE(plan.split_positions, forced) << what;
      EXPECT_GE(static_cast<int64_t>(plan.split_positions) * plan.num_splits, c.stride) << what;
    }
  }
  PagedDecodeParams p = MaskParamsForChecks(1, 32, 8);
  p.mask_stride = 64;
  p.mask_split_positions = 8192;  // only at head_dim 64
  EXPECT_STREQ(PagedDecodeCheck(p),
               "mask_split_positions must be 0, kMaskSplitPositions or "
               "MaskLongSplitPositions(head_dim)");
  p.head_dim = 64;
  EXPECT_EQ(PagedDecodeCheck(p), nullptr);
}

// The CPU reference's keep-mask selection is the token-list selection of the mask's kept positions
// (ascending, positions past the sequence dropped): identical float64 results. No device needed.
TEST(PagedDecodeReference, KeepMaskEqualsTokenListOfItsKeptPositions) {
  const PagedBatch pb(AttnDType::kBFloat16, 8, 2, 64, {40, 1, 0, 77}, 5u);
  const Selection mask = MakeSelection(pb, Mode::kMaskRandom, 17u);
  Selection list;
  list.kind = KvSelection::kToken;
  list.indptr.push_back(0);
  for (int b = 0; b < pb.batch(); ++b) {
    for (int h = 0; h < pb.num_kv_heads; ++h) {
      const uint8_t* m =
          mask.mask.data() + static_cast<size_t>(b * pb.num_kv_heads + h) * mask.mask_stride;
      for (int t = 0; t < pb.seq_lens[b]; ++t) {
        if (m[t] != 0) list.indices.push_back(t);
      }
      list.indptr.push_back(static_cast<int32_t>(list.indices.size()));
    }
  }
  ASSERT_GT(list.indices.size(), 10u);
  const Reference from_mask = ComputeReference(pb, mask);
  const Reference from_list = ComputeReference(pb, list);
  EXPECT_EQ(from_mask.out, from_list.out);
  EXPECT_EQ(from_mask.lse, from_list.lse);
}

// ---- keep-mask -> CSR ----------------------------------------------------------------------------

class IndexListsTest : public ::testing::TestWithParam<std::tuple<int, int, double>> {};

TEST_P(IndexListsTest, CompactsExactly) {
  SKIP_WITHOUT_DEVICE();
  const auto [rows, stride, density] = GetParam();
  std::mt19937 rng(rows * 31 + stride);
  std::bernoulli_distribution keep(density);
  std::uniform_int_distribution<int> byte(1, 255);
  std::vector<uint8_t> mask(static_cast<size_t>(rows) * stride, 0);
  std::vector<int32_t> want_indptr{0}, want_indices;
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < stride; ++i) {
      if (keep(rng)) {
        mask[static_cast<size_t>(r) * stride + i] = static_cast<uint8_t>(byte(rng));
        want_indices.push_back(i);
      }
    }
    want_indptr.push_back(static_cast<int32_t>(want_indices.size()));
  }
  DeviceBuffer d_mask, d_counts(rows * 4 + 16), d_indptr((rows + 1) * 4),
      d_indices(std::max<size_t>(mask.size() * 4, 16));
  d_mask.Upload(mask);
  d_indptr.Poison();
  d_indices.Poison();
  CUDA_OK(BuildIndexListsFromMask(d_mask.get<uint8_t>(), rows, stride, d_counts.get<int32_t>(),
                                  d_indptr.get<int32_t>(), d_indices.get<int32_t>(), nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(d_indptr.Download<int32_t>(rows + 1), want_indptr);
  EXPECT_EQ(d_indices.Download<int32_t>(want_indices.size()), want_indices);
}

INSTANTIATE_TEST_SUITE_P(Shapes, IndexListsTest,
                         ::testing::Combine(::testing::Values(1, 3, 300),
                                            ::testing::Values(16, 4112, 16384 + 16),
                                            ::testing::Values(0.0, 0.01, 0.5, 1.0)));

TEST(IndexLists, RejectsBadStride) {
  EXPECT_EQ(BuildIndexListsFromMask(nullptr, 2, 15, nullptr, nullptr, nullptr, nullptr),
            cudaErrorInvalidValue);
}

}  // namespace
}  // namespace prehoc::kernels
