// GPU tests of the model ops (model_ops.h) and the generic paged attention
// (prefill_attention.h) against CPU references. Skipped when no CUDA device is present.
//
// Tolerances: outputs written as bf16 are compared with the float reference rounded the same way,
// |gpu - ref| <= 8e-3·|ref| + 1e-5 (one bf16 ulp is 2^-8..2^-7 relative; the fp32 sums differ only
// in order). Attention (double reference over the bf16 inputs): 8e-3·|ref| + 2e-3. Index outputs
// (argmax) match exactly. Every output buffer is poisoned with NaN first; slots that must not be
// written are checked to still hold the poison.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "worker/backends/cpu/cpu_ops.h"
#include "worker/kernels/model_ops.h"
#include "worker/kernels/prefill_attention.h"
#include "worker/rope.h"
#include "worker/testing/gpu_test_util.h"

namespace prehoc::kernels {
namespace {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void Resize(size_t bytes) {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = std::max<size_t>(bytes, 16);
    if (cudaMalloc(&ptr_, bytes_) != cudaSuccess) ptr_ = nullptr;
    Poison();
  }
  template <typename T>
  void Upload(const std::vector<T>& v) {
    Resize(v.size() * sizeof(T));
    if (!v.empty()) cudaMemcpy(ptr_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  template <typename T>
  std::vector<T> Download(size_t n) const {
    std::vector<T> v(n);
    if (n > 0) cudaMemcpy(v.data(), ptr_, n * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }
  void Poison() {
    if (ptr_ != nullptr) cudaMemset(ptr_, 0xff, bytes_);  // NaN in bf16 and f32
  }
  template <typename T>
  T* get() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

float RoundBf16(float x) { return Bf16ToFloat(FloatToBf16(x)); }

std::vector<float> RandomVec(size_t n, float lo, float hi, std::mt19937* rng) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(*rng);
  return v;
}

std::vector<uint16_t> ToBf16(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = FloatToBf16(v[i]);
  return b;
}

// Expects every bf16 element close to the float reference (rounded to bf16).
void ExpectBf16Near(const std::vector<uint16_t>& got, const std::vector<float>& ref, float rtol,
                    float atol, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const float g = Bf16ToFloat(got[i]);
    const float r = RoundBf16(ref[i]);
    if (!(std::fabs(g - r) <= atol + rtol * std::fabs(r))) {
      if (++bad <= 5) ADD_FAILURE() << what << "[" << i << "]: got " << g << ", want " << r;
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

// ---- Embedding -------------------------------------------------------------------------------

TEST(ModelOpsTest, EmbeddingGather) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937 rng(1);
  for (int d : {1, 64, 4096, 1030}) {
    const int vocab = 37;
    const std::vector<float> table = RandomVec(static_cast<size_t>(vocab) * d, -1, 1, &rng);
    const std::vector<int32_t> tokens{0, 36, 5, 5, -1, 37, 12};
    DeviceBuffer dt, dtok, dx;
    dt.Upload(ToBf16(table));
    dtok.Upload(tokens);
    dx.Resize(tokens.size() * d * sizeof(float));
    CUDA_OK(EmbeddingGather(dt.get<uint16_t>(), dtok.get<int32_t>(), tokens.size(), d, vocab,
                            dx.get<float>(), nullptr));
    const std::vector<float> x = dx.Download<float>(tokens.size() * d);
    for (size_t r = 0; r < tokens.size(); ++r) {
      for (int j = 0; j < d; ++j) {
        const float g = x[r * d + j];
        if (tokens[r] < 0 || tokens[r] >= vocab) {
          ASSERT_TRUE(std::isnan(g)) << "row " << r;
        } else {
          ASSERT_EQ(g, RoundBf16(table[static_cast<size_t>(tokens[r]) * d + j])) << r << "," << j;
        }
      }
    }
  }
}

// ---- RMSNorm ---------------------------------------------------------------------------------

class RmsNormTest : public ::testing::TestWithParam<std::tuple<int, int, bool>> {};

TEST_P(RmsNormTest, MatchesCpu) {
  SKIP_WITHOUT_DEVICE();
  const auto [rows, d, gather] = GetParam();
  std::mt19937 rng(rows * 7919 + d);
  const int src_rows = rows + 3;
  const std::vector<float> x = RandomVec(static_cast<size_t>(src_rows) * d, -3, 3, &rng);
  const std::vector<float> w = RandomVec(d, 0.5, 1.5, &rng);
  std::vector<int32_t> sel(rows);
  for (int r = 0; r < rows; ++r) sel[r] = gather ? (r * 2 + 1) % src_rows : r;
  std::vector<float> ref(static_cast<size_t>(rows) * d);
  for (int r = 0; r < rows; ++r) {
    cpu::RmsNorm(x.data() + static_cast<size_t>(sel[r]) * d, 1, d, w.data(), 1e-5f,
                 ref.data() + static_cast<size_t>(r) * d);
  }
  DeviceBuffer dx, dw, ds, dy;
  dx.Upload(x);
  dw.Upload(w);
  ds.Upload(sel);
  dy.Resize(ref.size() * 2);
  CUDA_OK(RmsNormToBf16(dx.get<float>(), gather ? ds.get<int32_t>() : nullptr, rows, d,
                        dw.get<float>(), 1e-5f, dy.get<uint16_t>(), nullptr));
  ExpectBf16Near(dy.Download<uint16_t>(ref.size()), ref, 8e-3f, 1e-5f, "rmsnorm");
}

INSTANTIATE_TEST_SUITE_P(Shapes, RmsNormTest,
                         ::testing::Combine(::testing::Values(1, 5, 16),
                                            ::testing::Values(1, 64, 384, 1030, 4096),
                                            ::testing::Bool()));

// ---- RoPE + K/V append -----------------------------------------------------------------------

struct RopeCase {
  int rows, hq, hkv, hd, page_size;
  bool bias, llama3;
};

class RopeAppendTest : public ::testing::TestWithParam<RopeCase> {};

TEST_P(RopeAppendTest, MatchesCpu) {
  SKIP_WITHOUT_DEVICE();
  const RopeCase c = GetParam();
  std::mt19937 rng(c.rows * 31 + c.hd);
  ModelConfig cfg;
  cfg.head_dim = c.hd;
  cfg.rope_theta = c.llama3 ? 500000.0 : 10000.0;
  if (c.llama3) {
    cfg.rope_scaling.type = RopeScaling::Type::kLlama3;
    cfg.rope_scaling.factor = 8.0;
    cfg.rope_scaling.original_max_position_embeddings = 32;
  }
  const std::vector<float> inv_freq = RopeInvFrequencies(cfg);
  const int width = (c.hq + 2 * c.hkv) * c.hd;
  const std::vector<float> qkv = RandomVec(static_cast<size_t>(c.rows) * width, -2, 2, &rng);
  const std::vector<float> bias = RandomVec(width, -0.5, 0.5, &rng);
  const int num_pages = c.rows / c.page_size + 3;
  // Distinct random slots; the last row is not stored (slot -1).
  std::vector<int32_t> slots(num_pages * c.page_size);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);
  slots.resize(c.rows);
  slots.back() = -1;
  std::vector<int32_t> pos(c.rows);
  for (int r = 0; r < c.rows; ++r) pos[r] = (r * 977) % 8192;
  pos[0] = 0;

  const size_t pool_elems = static_cast<size_t>(num_pages) * c.hkv * c.page_size * c.hd;
  DeviceBuffer dqkv, dbias, dpos, dslot, dfreq, dq, dk, dv;
  dqkv.Upload(qkv);
  dbias.Upload(bias);
  dpos.Upload(pos);
  dslot.Upload(slots);
  dfreq.Upload(inv_freq);
  dq.Resize(static_cast<size_t>(c.rows) * c.hq * c.hd * 2);
  dk.Resize(pool_elems * 2);
  dv.Resize(pool_elems * 2);
  RopeAppendParams p;
  p.rows = c.rows;
  p.num_q_heads = c.hq;
  p.num_kv_heads = c.hkv;
  p.head_dim = c.hd;
  p.page_size = c.page_size;
  p.d_qkv = dqkv.get<float>();
  p.d_bias = c.bias ? dbias.get<float>() : nullptr;
  p.d_pos = dpos.get<int32_t>();
  p.d_slot = dslot.get<int32_t>();
  p.d_inv_freq = dfreq.get<float>();
  p.d_q_out = dq.get<uint16_t>();
  p.d_k_pool = dk.get<uint16_t>();
  p.d_v_pool = dv.get<uint16_t>();
  CUDA_OK(RopeAppendKv(p, nullptr));
  CUDA_OK(cudaDeviceSynchronize());

  std::vector<float> q_ref(static_cast<size_t>(c.rows) * c.hq * c.hd);
  std::vector<float> k_ref(pool_elems, NAN), v_ref(pool_elems, NAN);
  for (int r = 0; r < c.rows; ++r) {
    std::vector<float> row(qkv.begin() + static_cast<size_t>(r) * width,
                           qkv.begin() + static_cast<size_t>(r + 1) * width);
    if (c.bias) {
      for (int j = 0; j < width; ++j) row[j] += bias[j];
    }
    ApplyRope(row.data(), c.hq + c.hkv, c.hd, pos[r], inv_freq);  // q and k heads are adjacent
    std::copy_n(row.begin(), c.hq * c.hd, q_ref.begin() + static_cast<size_t>(r) * c.hq * c.hd);
    if (slots[r] < 0) continue;
    const int page = slots[r] / c.page_size, off = slots[r] % c.page_size;
    for (int kh = 0; kh < c.hkv; ++kh) {
      const size_t base = ((static_cast<size_t>(page) * c.hkv + kh) * c.page_size + off) * c.hd;
      for (int i = 0; i < c.hd; ++i) {
        k_ref[base + i] = row[(c.hq + kh) * c.hd + i];
        v_ref[base + i] = row[(c.hq + c.hkv + kh) * c.hd + i];
      }
    }
  }
  ExpectBf16Near(dq.Download<uint16_t>(q_ref.size()), q_ref, 8e-3f, 1e-4f, "q");
  const std::vector<uint16_t> k = dk.Download<uint16_t>(pool_elems);
  const std::vector<uint16_t> v = dv.Download<uint16_t>(pool_elems);
  int bad = 0;
  for (size_t i = 0; i < pool_elems; ++i) {
    for (int which = 0; which < 2; ++which) {
      const float ref = which == 0 ? k_ref[i] : v_ref[i];
      const float got = Bf16ToFloat(which == 0 ? k[i] : v[i]);
      const bool ok = std::isnan(ref) ? std::isnan(got)  // never written
                                      : std::fabs(got - RoundBf16(ref)) <=
                                            1e-4f + 8e-3f * std::fabs(RoundBf16(ref));
      if (!ok && ++bad <= 5) {
        ADD_FAILURE() << (which ? "v" : "k") << "[" << i << "]: got " << got << " want " << ref;
      }
    }
  }
  EXPECT_EQ(bad, 0);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RopeAppendTest,
    ::testing::Values(RopeCase{1, 1, 1, 2, 16, false, false}, RopeCase{7, 4, 2, 16, 16, true, false},
                      RopeCase{33, 4, 1, 32, 5, false, true}, RopeCase{20, 6, 2, 64, 16, false, false},
                      RopeCase{16, 32, 32, 128, 16, true, false},
                      RopeCase{9, 8, 2, 256, 3, false, true}));

// ---- SwiGLU and residual ---------------------------------------------------------------------

TEST(ModelOpsTest, SiluMulMatchesCpu) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937 rng(5);
  for (int rows : {1, 3, 17}) {
    for (int f : {1, 160, 11008}) {
      const std::vector<float> gu = RandomVec(static_cast<size_t>(rows) * 2 * f, -6, 6, &rng);
      std::vector<float> ref(static_cast<size_t>(rows) * f);
      for (int r = 0; r < rows; ++r) {
        cpu::SiluMul(gu.data() + static_cast<size_t>(r) * 2 * f,
                     gu.data() + static_cast<size_t>(r) * 2 * f + f, f,
                     ref.data() + static_cast<size_t>(r) * f);
      }
      DeviceBuffer dgu, dout;
      dgu.Upload(gu);
      dout.Resize(ref.size() * 2);
      CUDA_OK(SiluMulToBf16(dgu.get<float>(), rows, f, dout.get<uint16_t>(), nullptr));
      ExpectBf16Near(dout.Download<uint16_t>(ref.size()), ref, 8e-3f, 1e-5f,
                     "silu rows=" + std::to_string(rows) + " f=" + std::to_string(f));
    }
  }
}

TEST(ModelOpsTest, AddResidual) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937 rng(9);
  const int rows = 5, d = 1030;
  const std::vector<float> x = RandomVec(rows * d, -1, 1, &rng);
  const std::vector<float> y = RandomVec(rows * d, -1, 1, &rng);
  const std::vector<float> bias = RandomVec(d, -1, 1, &rng);
  for (int mode = 0; mode < 3; ++mode) {  // y, bias, y + bias
    DeviceBuffer dx, dy, db;
    dx.Upload(x);
    dy.Upload(y);
    db.Upload(bias);
    CUDA_OK(AddResidual(dx.get<float>(), mode != 1 ? dy.get<float>() : nullptr,
                        mode != 0 ? db.get<float>() : nullptr, rows, d, nullptr));
    const std::vector<float> got = dx.Download<float>(x.size());
    for (int i = 0; i < rows * d; ++i) {
      float add = mode != 1 ? y[i] : 0.0f;
      if (mode != 0) add += bias[i % d];
      ASSERT_EQ(got[i], x[i] + add) << "mode " << mode << " i " << i;
    }
  }
  EXPECT_EQ(AddResidual(nullptr, nullptr, nullptr, 1, 1, nullptr), cudaErrorInvalidValue);
}

// ---- Page copy (ETF) ---------------------------------------------------------------------------

// Exact against the CPU reference (a copy): the listed pages of dst equal src's, every other page
// of dst keeps its own contents. Both paths: 16-byte vectors (page_elems % 8 == 0) and elements
// (page_elems = 6, or a pool 2 bytes off 16-byte alignment).
TEST(ModelOpsTest, CopyPagesBf16MatchesCpu) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937 rng(13);
  const int num_pages = 40;
  for (const auto& [page_elems, offset] :
       std::vector<std::pair<int64_t, int>>{{2 * 16 * 64, 0}, {6, 0}, {8 * 16 * 128, 1}}) {
    SCOPED_TRACE(testing::Message() << "page_elems " << page_elems << " offset " << offset);
    const size_t n = static_cast<size_t>(num_pages) * page_elems + offset;
    std::vector<uint16_t> src(n), dst(n);
    for (uint16_t& x : src) x = static_cast<uint16_t>(rng());
    for (uint16_t& x : dst) x = static_cast<uint16_t>(rng());
    const std::vector<int32_t> pages = {7, 0, 39, 12, 13, 3};
    std::vector<uint16_t> want = dst;
    for (int32_t p : pages) {
      std::copy_n(src.begin() + offset + p * page_elems, page_elems,
                  want.begin() + offset + p * page_elems);
    }
    DeviceBuffer dsrc, ddst, dpages;
    dsrc.Upload(src);
    ddst.Upload(dst);
    dpages.Upload(pages);
    CUDA_OK(CopyPagesBf16(dsrc.get<uint16_t>() + offset, ddst.get<uint16_t>() + offset,
                          dpages.get<int32_t>(), static_cast<int>(pages.size()), page_elems,
                          nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    EXPECT_EQ(ddst.Download<uint16_t>(n), want);
    // No pages: nothing launched, dst unchanged.
    CUDA_OK(CopyPagesBf16(dsrc.get<uint16_t>(), ddst.get<uint16_t>(), dpages.get<int32_t>(), 0,
                          page_elems, nullptr));
    EXPECT_EQ(ddst.Download<uint16_t>(n), want);
  }
  EXPECT_EQ(CopyPagesBf16(nullptr, nullptr, nullptr, 1, 8, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(CopyPagesBf16(nullptr, nullptr, nullptr, -1, 8, nullptr), cudaErrorInvalidValue);
}

// ---- Argmax ----------------------------------------------------------------------------------

TEST(ModelOpsTest, ArgMaxMatchesSamplerArgMax) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937 rng(11);
  for (int vocab : {1, 2, 260, 32000, 32001}) {
    const int rows = 6;
    std::vector<float> logits = RandomVec(static_cast<size_t>(rows) * vocab, -5, 5, &rng);
    // Row 1: a tie between two late entries (the first must win); row 2: NaNs sprinkled in;
    // row 3: all -inf (-> 0); row 4: max at the last position.
    auto row = [&](int r) { return logits.data() + static_cast<size_t>(r) * vocab; };
    if (vocab > 2) {
      row(1)[vocab - 2] = 100.0f;
      row(1)[vocab / 2] = 100.0f;
      for (int j = 0; j < vocab; j += 7) row(2)[j] = NAN;
      row(2)[1] = 50.0f;
    }
    std::fill(row(3), row(3) + vocab, -INFINITY);
    row(4)[vocab - 1] = 1e30f;
    DeviceBuffer dl, dout;
    dl.Upload(logits);
    dout.Resize(rows * sizeof(int32_t));
    CUDA_OK(ArgMaxRows(dl.get<float>(), rows, vocab, dout.get<int32_t>(), nullptr));
    const std::vector<int32_t> got = dout.Download<int32_t>(rows);
    for (int r = 0; r < rows; ++r) {
      int32_t want = 0;  // first maximum, NaN never wins
      for (int j = 0; j < vocab; ++j) {
        if (row(r)[j] > row(r)[want] || (std::isnan(row(r)[want]) && !std::isnan(row(r)[j]))) {
          want = j;
        }
      }
      EXPECT_EQ(got[r], want) << "vocab " << vocab << " row " << r;
    }
  }
}

// ---- Generic paged attention -----------------------------------------------------------------

struct AttnCase {
  int hq, hkv, hd, page_size;
  bool causal;
};

// PSAW band per sequence (empty = no band): Engine::Step's prefill band, see prefill_attention.h.
struct Band {
  std::vector<double> fraction;
  std::vector<int32_t> sink;
};

// Key positions row (sequence b, position pos) attends to, in the CPU engine's order
// (worker/engine.cc: sinks, then [lo, pos]; the same double arithmetic for lo).
std::vector<int> RowKeys(bool causal, int len, int pos, const Band& band, int b) {
  const int n = causal ? pos + 1 : len;
  std::vector<int> keys;
  const double f = band.fraction.empty() ? 0.0 : band.fraction[b];
  const int64_t lo = static_cast<int64_t>(f * static_cast<double>(pos + 1));
  if (f > 0 && lo > band.sink[b]) {
    for (int t = 0; t < band.sink[b]; ++t) keys.push_back(t);
    for (int t = static_cast<int>(lo); t < n; ++t) keys.push_back(t);
  } else {
    for (int t = 0; t < n; ++t) keys.push_back(t);
  }
  return keys;
}

// One attention problem: sequences of lengths `lens` in shuffled pages; query rows are every
// position of the sequences except sequence 1 (its last position only) and sequence 3 (from
// position 2). With `band`, sequence 1's K/V at the positions its only row skips hold NaN (a
// load of a skipped key would poison the output), as do all unreferenced pool slots.
struct AttnProblem {
  AttnCase c;
  std::vector<int> lens;
  Band band;
  std::vector<int32_t> row_seq, row_pos, indptr{0}, indices, seq_lens;
  std::vector<uint16_t> q, k, v;

  size_t At(int b, int kh, int t) const {
    const int page = indices[indptr[b] + t / c.page_size];
    return ((static_cast<size_t>(page) * c.hkv + kh) * c.page_size + t % c.page_size) * c.hd;
  }

  void Build(uint32_t seed) {
    std::mt19937 rng(seed);
    for (int b = 0; b < static_cast<int>(lens.size()); ++b) {
      for (int t = 0; t < lens[b]; ++t) {
        if (b == 1 && t != lens[b] - 1) continue;
        if (b == 3 && t < 2) continue;
        row_seq.push_back(b);
        row_pos.push_back(t);
      }
    }
    int total_pages = 0;
    for (int len : lens) {
      total_pages += (len + c.page_size - 1) / c.page_size;
      indptr.push_back(total_pages);
    }
    const int num_pages = total_pages + 2;
    std::vector<int32_t> perm(num_pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    indices.assign(perm.begin(), perm.begin() + total_pages);
    const size_t pool_elems = static_cast<size_t>(num_pages) * c.hkv * c.page_size * c.hd;
    k.assign(pool_elems, 0x7fc0);  // NaN
    v.assign(pool_elems, 0x7fc0);
    std::uniform_real_distribution<float> u(-1, 1);
    for (int b = 0; b < static_cast<int>(lens.size()); ++b) {
      const std::vector<int> kept =
          band.fraction.empty() || b != 1 ? std::vector<int>()
                                          : RowKeys(true, lens[b], lens[b] - 1, band, b);
      for (int kh = 0; kh < c.hkv; ++kh) {
        for (int t = 0; t < lens[b]; ++t) {
          const bool skipped = !kept.empty() && !std::binary_search(kept.begin(), kept.end(), t);
          for (int i = 0; i < c.hd; ++i) {
            const float kx = u(rng), vx = u(rng);
            k[At(b, kh, t) + i] = skipped ? 0x7fc0 : FloatToBf16(kx);
            v[At(b, kh, t) + i] = skipped ? 0x7fc0 : FloatToBf16(vx);
          }
        }
      }
    }
    q.resize(row_seq.size() * c.hq * c.hd);
    for (uint16_t& x : q) x = FloatToBf16(2.0f * u(rng));
    seq_lens.assign(lens.begin(), lens.end());
  }

  // Runs the kernel (band applied when `with_band`; the tiled tensor-core variant when `tiled`)
  // and returns the output.
  // `single_bf16_p`: the tiled kernel's earlier variant (P rounded to one bf16).
  std::vector<uint16_t> Run(bool with_band, bool tiled = false, bool single_bf16_p = false) const {
    DeviceBuffer dq, dout, dk, dv, dip, dix, dl, drs, drp, dbf, dbs, dt;
    dq.Upload(q);
    dk.Upload(k);
    dv.Upload(v);
    dip.Upload(indptr);
    dix.Upload(indices);
    dl.Upload(seq_lens);
    drs.Upload(row_seq);
    drp.Upload(row_pos);
    dout.Resize(q.size() * 2);
    PrefillAttentionParams p;
    p.rows = static_cast<int>(row_seq.size());
    p.num_q_heads = c.hq;
    p.num_kv_heads = c.hkv;
    p.head_dim = c.hd;
    p.page_size = c.page_size;
    p.causal = c.causal;
    p.d_q = dq.get<uint16_t>();
    p.d_out = dout.get<uint16_t>();
    p.d_k_pool = dk.get<uint16_t>();
    p.d_v_pool = dv.get<uint16_t>();
    p.d_page_indptr = dip.get<int32_t>();
    p.d_page_indices = dix.get<int32_t>();
    p.d_seq_lens = dl.get<int32_t>();
    p.d_row_seq = drs.get<int32_t>();
    p.d_row_pos = drp.get<int32_t>();
    p.tiled_single_bf16_p = single_bf16_p;
    if (with_band) {
      dbf.Upload(band.fraction);
      dbs.Upload(band.sink);
      p.d_band_fraction = dbf.get<double>();
      p.d_band_sink = dbs.get<int32_t>();
    }
    if (tiled) {
      const std::vector<int32_t> tiles =
          PrefillQueryTiles(row_seq.data(), row_pos.data(), static_cast<int>(row_seq.size()));
      dt.Upload(tiles);
      const int n = static_cast<int>(tiles.size() / 2);
      EXPECT_EQ(PrefillAttentionTiledCheck(p, n, dt.get<int32_t>()), nullptr);
      EXPECT_EQ(PrefillAttentionTiled(p, n, dt.get<int32_t>(), nullptr), cudaSuccess);
    } else {
      EXPECT_EQ(PrefillAttentionCheck(p), nullptr);
      EXPECT_EQ(PrefillAttention(p, nullptr), cudaSuccess);
    }
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    return dout.Download<uint16_t>(q.size());
  }

  // Error of an output against the float64 reference: the worst element's |got − ref| as a
  // fraction of the bound 8e-3·|ref| + 2e-3, and the relative RMS sqrt(Σ (got − ref)² / Σ ref²).
  struct Error {
    double worst_of_bound = 0, rel_rms = 0;
  };
  // Float64 reference over the bf16 inputs; 8e-3·|ref| + 2e-3 per element.
  Error ExpectMatchesReference(const std::vector<uint16_t>& out) const {
    Error e;
    double num = 0, den = 0;
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.hd));
    const int group = c.hq / c.hkv;
    int bad = 0;
    for (size_t r = 0; r < row_seq.size(); ++r) {
      const int b = row_seq[r];
      const std::vector<int> keys = RowKeys(c.causal, lens[b], row_pos[r], band, b);
      const size_t n = keys.size();
      for (int h = 0; h < c.hq; ++h) {
        const int kh = h / group;
        const uint16_t* qr = q.data() + (r * c.hq + h) * c.hd;
        std::vector<double> s(n);
        double mx = -INFINITY;
        for (size_t j = 0; j < n; ++j) {
          double dot = 0;
          for (int i = 0; i < c.hd; ++i) {
            dot += double(Bf16ToFloat(qr[i])) * Bf16ToFloat(k[At(b, kh, keys[j]) + i]);
          }
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (double& x : s) sum += (x = std::exp(x - mx));
        for (int i = 0; i < c.hd; ++i) {
          double o = 0;
          for (size_t j = 0; j < n; ++j) o += s[j] / sum * Bf16ToFloat(v[At(b, kh, keys[j]) + i]);
          const float got = Bf16ToFloat(out[(r * c.hq + h) * c.hd + i]);
          const double bound = 2e-3 + 8e-3 * std::fabs(o);
          e.worst_of_bound = std::max(e.worst_of_bound, std::fabs(got - o) / bound);
          num += (got - o) * (got - o);
          den += o * o;
          if (!(std::fabs(got - o) <= bound) && ++bad <= 5) {
            ADD_FAILURE() << "row " << r << " (seq " << b << " pos " << row_pos[r] << ") head "
                          << h << " dim " << i << ": got " << got << " want " << o;
          }
        }
      }
    }
    EXPECT_EQ(bad, 0);
    e.rel_rms = std::sqrt(num / std::max(den, 1e-300));
    return e;
  }
};

class PrefillAttentionTest : public ::testing::TestWithParam<AttnCase> {};

TEST_P(PrefillAttentionTest, MatchesDoubleReference) {
  SKIP_WITHOUT_DEVICE();
  AttnProblem pr{GetParam(), {1, 17, 40, 5}};
  pr.Build(pr.c.hd * 13 + pr.c.hq + pr.c.page_size);
  pr.ExpectMatchesReference(pr.Run(/*with_band=*/false));
  if (pr.c.hd == 64 || pr.c.hd == 128) {
    SCOPED_TRACE("tiled");
    pr.ExpectMatchesReference(pr.Run(/*with_band=*/false, /*tiled=*/true));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, PrefillAttentionTest,
    ::testing::Values(AttnCase{4, 2, 16, 16, true}, AttnCase{4, 1, 32, 16, false},
                      AttnCase{6, 2, 64, 16, true}, AttnCase{8, 8, 128, 16, false},
                      AttnCase{32, 8, 128, 16, true}, AttnCase{4, 4, 256, 7, true},
                      AttnCase{2, 1, 80, 5, false}, AttnCase{3, 3, 2, 1, true}));

// PSAW band: drop fraction f for sequences 0..2 and 0.5 for sequence 3 (per-sequence values),
// sink s; odd lengths; sequence 1's skipped keys are NaN (never loaded).
struct BandCase {
  int hq, hkv, hd, page_size;
  double fraction;
  int sink;
};

class PrefillBandTest : public ::testing::TestWithParam<BandCase> {};

TEST_P(PrefillBandTest, MatchesEngineBand) {
  SKIP_WITHOUT_DEVICE();
  const BandCase bc = GetParam();
  AttnProblem pr{{bc.hq, bc.hkv, bc.hd, bc.page_size, true}, {1, 77, 131, 45}};
  pr.band.fraction = {bc.fraction, bc.fraction, bc.fraction, 0.5};
  pr.band.sink.assign(4, bc.sink);
  pr.Build(static_cast<uint32_t>(bc.hd * 7 + bc.sink + bc.fraction * 100));
  pr.ExpectMatchesReference(pr.Run(/*with_band=*/true));
  if (bc.hd == 64 || bc.hd == 128) {
    SCOPED_TRACE("tiled");
    pr.ExpectMatchesReference(pr.Run(/*with_band=*/true, /*tiled=*/true));
  }
}

// Longer rows, so that whole 64-key tiles fall outside the band and are skipped by the tiled
// kernel (sequence 0: 700 rows in 11 query tiles; sequence 1: its last row only, whose skipped
// keys hold NaN), both kernels against the reference; the same problem without the band too.
TEST(PrefillBandTest, LongRowsBothKernels) {
  SKIP_WITHOUT_DEVICE();
  for (int hd : {64, 128}) {
    AttnProblem pr{{8, 2, hd, 16, true}, {700, 300, 3, 90}};
    pr.band.fraction = {0.9, 0.9, 0.3, 0.5};
    pr.band.sink = {8, 8, 0, 4};
    pr.Build(static_cast<uint32_t>(hd));
    SCOPED_TRACE(testing::Message() << "head_dim " << hd);
    pr.ExpectMatchesReference(pr.Run(/*with_band=*/true));
    pr.ExpectMatchesReference(pr.Run(/*with_band=*/true, /*tiled=*/true));
  }
}

// The tiled kernel's P = P_hi + P_lo split (the default) is as exact as the simple fp32 kernel:
// both differ from the float64 reference by the output's bf16 rounding (plus fp32 sums in
// another order), so their relative RMS errors agree within 2 % and the worst element stays
// under half the bound; the single-bf16 P variant is measured beside them (printed).
TEST(PrefillTiledTest, SplitPIsAsExactAsSimpleKernel) {
  SKIP_WITHOUT_DEVICE();
  for (int hd : {64, 128}) {
    for (bool band : {false, true}) {
      AttnProblem pr{{16, 4, hd, 16, true}, {900, 300, 3, 200}};
      if (band) {
        pr.band.fraction = {0.5, 0.3, 0.3, 0.9};
        pr.band.sink = {8, 4, 0, 8};
      }
      pr.Build(static_cast<uint32_t>(hd + band));
      SCOPED_TRACE(testing::Message() << "head_dim " << hd << " band " << band);
      const auto simple = pr.ExpectMatchesReference(pr.Run(band));
      const auto split = pr.ExpectMatchesReference(pr.Run(band, /*tiled=*/true));
      const auto single = pr.ExpectMatchesReference(pr.Run(band, true, /*single_bf16_p=*/true));
      std::printf("[prefill error] head_dim %d band %d: rel RMS simple %.4g, tiled split-P %.4g, "
                  "tiled bf16-P %.4g; worst element / bound: %.3f %.3f %.3f\n",
                  hd, band, simple.rel_rms, split.rel_rms, single.rel_rms, simple.worst_of_bound,
                  split.worst_of_bound, single.worst_of_bound);
      EXPECT_LE(split.rel_rms, 1.02 * simple.rel_rms);
      EXPECT_LE(split.worst_of_bound, 0.5);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, PrefillBandTest,
    ::testing::Values(BandCase{8, 2, 64, 16, 0.0, 8}, BandCase{8, 2, 64, 16, 0.3, 8},
                      BandCase{8, 2, 64, 16, 0.9, 0}, BandCase{32, 8, 128, 16, 0.3, 0},
                      BandCase{32, 8, 128, 16, 0.9, 8}, BandCase{4, 4, 128, 16, 0.0, 0},
                      BandCase{6, 1, 128, 7, 0.3, 8}, BandCase{4, 2, 16, 5, 0.9, 8}));

// Drop fraction 0, and a band whose lo never passes the sink, give bitwise the causal result.
TEST(PrefillBandTest, NoEffectiveBandIsBitwiseCausal) {
  SKIP_WITHOUT_DEVICE();
  for (double f : {0.0, 0.05}) {  // 0.05 · 160 = 8 <= sink: no row is banded
    AttnProblem pr{{32, 8, 128, 16, true}, {1, 17, 160, 45}};
    pr.band.fraction.assign(4, f);
    pr.band.sink.assign(4, 8);
    pr.Build(5);
    EXPECT_EQ(pr.Run(true), pr.Run(false)) << "fraction " << f;
    EXPECT_EQ(pr.Run(true, /*tiled=*/true), pr.Run(false, /*tiled=*/true)) << "fraction " << f;
  }
}

TEST(PrefillAttentionCheckTest, RejectsBadShapes) {
  PrefillAttentionParams p;
  p.num_q_heads = 4;
  p.num_kv_heads = 3;
  p.head_dim = 64;
  EXPECT_NE(PrefillAttentionCheck(p), nullptr);
  p.num_kv_heads = 2;
  p.head_dim = 258;
  EXPECT_NE(PrefillAttentionCheck(p), nullptr);
  p.head_dim = 63;
  EXPECT_NE(PrefillAttentionCheck(p), nullptr);
  p.head_dim = 64;
  EXPECT_EQ(PrefillAttentionCheck(p), nullptr);  // rows = 0: no pointers needed
  p.rows = 1;
  EXPECT_NE(PrefillAttentionCheck(p), nullptr);
  // The band needs causal attention and per-sequence sinks.
  p.rows = 0;
  const double f = 0.5;
  p.d_band_fraction = &f;
  p.causal = false;
  EXPECT_NE(PrefillAttentionCheck(p), nullptr);
  p.causal = true;
  EXPECT_EQ(PrefillAttentionCheck(p), nullptr);
  // The tiled variant: head_dim 64 / 128 and a tile list.
  EXPECT_EQ(PrefillAttentionTiledCheck(p, 0, nullptr), nullptr);
  p.head_dim = 80;
  EXPECT_NE(PrefillAttentionTiledCheck(p, 0, nullptr), nullptr);
  p.head_dim = 64;
  EXPECT_NE(PrefillAttentionTiledCheck(p, 1, nullptr), nullptr);
}

TEST(PrefillQueryTilesTest, SplitsBySequencePositionAndSize) {
  std::vector<int32_t> seq, pos;
  for (int i = 0; i < 130; ++i) {  // sequence 0: positions 0..129 -> tiles of 64, 64, 2
    seq.push_back(0);
    pos.push_back(i);
  }
  seq.insert(seq.end(), {1, 1, 2, 2});  // sequence 1: 5, 6; sequence 2: 9, then 3 (goes down)
  pos.insert(pos.end(), {5, 6, 9, 3});
  EXPECT_EQ(PrefillQueryTiles(seq.data(), pos.data(), static_cast<int>(seq.size())),
            (std::vector<int32_t>{0, 64, 64, 64, 128, 2, 130, 2, 132, 1, 133, 1}));
}

}  // namespace
}  // namespace prehoc::kernels
