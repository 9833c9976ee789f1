// GPU tests of the device sampler (sampling.h) against the CPU reference SampleWithUniform
// (worker/sampler.h). Skipped when no CUDA device is present (the argument checks still run).
//
// Exactness: with u supplied, the token and the candidate count equal the CPU's when u · mass
// and top_p · mass are not within ~vocab · 2^-44 of a prefix boundary (sampling.h); the tests
// put u in the middle of a token's CDF interval and keep top_p away from the boundaries, so they
// compare exactly. Distribution: a chi-square test of 20000 generator draws.
#include "worker/kernels/sampling.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "worker/sampler.h"
#include "worker/testing/gpu_test_util.h"

namespace prehoc::kernels {
namespace {

template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(const std::vector<T>& v) : n_(v.size()) {
    if (cudaMalloc(reinterpret_cast<void**>(&ptr_), std::max<size_t>(n_, 1) * sizeof(T)) !=
        cudaSuccess) {
      ptr_ = nullptr;
    }
    if (ptr_ != nullptr && n_ > 0) cudaMemcpy(ptr_, v.data(), n_ * sizeof(T), cudaMemcpyHostToDevice);
  }
  explicit DeviceArray(size_t n) : DeviceArray(std::vector<T>(n)) {}
  ~DeviceArray() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return ptr_; }
  std::vector<T> Download() const {
    std::vector<T> v(n_);
    if (n_ > 0) cudaMemcpy(v.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }

 private:
  T* ptr_ = nullptr;
  size_t n_;
};

struct DeviceResult {
  std::vector<int32_t> token, candidates;
};

// Samples rows of `logits` ([rows][vocab]) on the device with per-row options and, when
// `uniform` is non-empty, the given u per row.
DeviceResult RunDevice(const std::vector<float>& logits, int vocab,
                       const std::vector<SamplingRow>& rows, const std::vector<double>& uniform) {
  DeviceArray<float> dl(logits);
  DeviceArray<SamplingRow> dp(rows);
  DeviceArray<double> du(uniform);
  DeviceArray<int32_t> dout(rows.size()), dcand(rows.size());
  SampleRowsParams p;
  p.rows = static_cast<int>(rows.size());
  p.vocab = vocab;
  p.d_logits = dl.get();
  p.d_row_params = dp.get();
  p.d_uniform = uniform.empty() ? nullptr : du.get();
  p.d_out = dout.get();
  p.d_candidates = dcand.get();
  EXPECT_EQ(SampleRowsCheck(p), nullptr);
  EXPECT_EQ(SampleRows(p, nullptr), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return {dout.Download(), dcand.Download()};
}


SamplingRow RowOf(const SamplingOptions& o, uint64_t step = 0) {
  SamplingRow r;
  r.temperature = o.temperature;
  r.top_k = o.top_k;
  r.top_p = o.top_p;
  r.seed = o.seed;
  r.step = step;
  return r;
}

// The CPU's candidates in order and their unnormalised probabilities (Sampler's arithmetic).
struct Nucleus {
  std::vector<int32_t> order;
  std::vector<double> p;
  double mass = 0;
};

Nucleus CpuNucleus(const std::vector<float>& x, const SamplingOptions& o) {
  int32_t cand = 0;
  SampleWithUniform(x, o, 0.0, &cand);
  Nucleus n;
  n.order.resize(x.size());
  std::iota(n.order.begin(), n.order.end(), 0);
  std::stable_sort(n.order.begin(), n.order.end(), [&](int32_t a, int32_t b) { return x[a] > x[b]; });
  n.order.resize(cand);
  const double mx = x[n.order[0]];
  for (int32_t id : n.order) {
    n.p.push_back(std::exp((x[id] - mx) / static_cast<double>(o.temperature)));
    n.mass += n.p.back();
  }
  return n;
}

// For each of `picks` positions j of the CPU nucleus (all when picks >= its size), a row with u
// in the middle of token j's CDF interval: the device must return that token (and the CPU's
// SampleWithUniform too, which checks the test itself), with the CPU's candidate count.
void ExpectMidpointDraws(const std::vector<float>& x, const SamplingOptions& o, int picks,
                         uint32_t seed) {
  const Nucleus n = CpuNucleus(x, o);
  std::vector<size_t> js(n.order.size());
  std::iota(js.begin(), js.end(), 0);
  if (static_cast<size_t>(picks) < js.size()) {
    std::mt19937 rng(seed);
    std::shuffle(js.begin() + 1, js.end(), rng);
    js.resize(picks);  // always includes j = 0
  }
  std::vector<double> prefix(n.order.size() + 1, 0.0);
  for (size_t j = 0; j < n.order.size(); ++j) prefix[j + 1] = prefix[j] + n.p[j];
  std::vector<double> us;
  std::vector<int32_t> want;
  for (size_t j : js) {
    if (n.p[j] < 1e-7 * n.mass) continue;  // too narrow an interval to aim at
    us.push_back((prefix[j] + 0.5 * n.p[j]) / n.mass);
    want.push_back(n.order[j]);
    int32_t cand = 0;
    ASSERT_EQ(SampleWithUniform(x, o, us.back(), &cand), want.back()) << "test construction";
  }
  const int vocab = static_cast<int>(x.size());
  std::vector<float> logits;
  for (size_t r = 0; r < us.size(); ++r) logits.insert(logits.end(), x.begin(), x.end());
  const DeviceResult got =
      RunDevice(logits, vocab, std::vector<SamplingRow>(us.size(), RowOf(o)), us);
  int bad = 0;
  for (size_t r = 0; r < us.size(); ++r) {
    if (got.token[r] != want[r] && ++bad <= 5) {
      ADD_FAILURE() << "vocab " << vocab << " T " << o.temperature << " top_k " << o.top_k
                    << " top_p " << o.top_p << " u " << us[r] << ": got " << got.token[r]
                    << ", want " << want[r];
    }
    EXPECT_EQ(got.candidates[r], static_cast<int32_t>(n.order.size())) << "u " << us[r];
  }
  EXPECT_EQ(bad, 0);
}

std::vector<float> RandomLogits(int vocab, float scale, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> x(vocab);
  for (float& v : x) v = d(rng);
  return x;
}

TEST(SamplingTest, RandomLogitsMatchCpuInverseCdf) {
  SKIP_WITHOUT_DEVICE();
  for (int vocab : {1, 2, 7, 1000, 32001, 131072}) {
    const std::vector<float> x = RandomLogits(vocab, 3.0f, vocab);
    for (const SamplingOptions& o :
         {SamplingOptions{1.0f, 0, 1.0f}, SamplingOptions{0.7f, 0, 0.9f},
          SamplingOptions{1.3f, 50, 0.95f}, SamplingOptions{1.0f, 5, 1.0f},
          SamplingOptions{0.5f, 0, 0.3f}}) {
      SCOPED_TRACE(testing::Message() << "vocab " << vocab << " T " << o.temperature << " k "
                                      << o.top_k << " p " << o.top_p);
      ExpectMidpointDraws(x, o, 64, 3);
    }
  }
}

// Ties: groups of equal logits, nucleus boundaries falling inside a group (lower ids first),
// and −inf entries (no mass; never drawn). (NaN is left out here: Sampler's sort has no order
// for it; the device treats NaN as below −inf, see GreedyEdgeCases.)
TEST(SamplingTest, TiesAndNonFiniteMatchCpu) {
  SKIP_WITHOUT_DEVICE();
  const int vocab = 5000;
  std::vector<float> x(vocab, 0.0f);
  std::mt19937 rng(9);
  std::vector<int> ids(vocab);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  for (int i = 0; i < 10; ++i) x[ids[i]] = 8.0f;       // 10 tied leaders, scattered ids
  for (int i = 10; i < 110; ++i) x[ids[i]] = 6.0f;     // 100 tied next
  for (int i = 110; i < 130; ++i) x[ids[i]] = -INFINITY;
  // Temperature 1: a leader has e^8 ≈ 2981, the next group e^6 ≈ 403 each, the rest 1 each.
  // top_p 0.3 ends inside the leaders (8 of them), 0.6 inside the second group (48), 0.99 in the
  // tail (4229); the cumulative passes top_p by >= 2.8e-6 there (far above the 2^-44 units).
  for (float top_p : {0.3f, 0.6f, 0.99f, 1.0f}) {
    ExpectMidpointDraws(x, SamplingOptions{1.0f, 0, top_p}, 200, 5);
  }
  ExpectMidpointDraws(x, SamplingOptions{1.0f, 15, 1.0f}, 200, 6);   // top-k inside the 2nd group
  ExpectMidpointDraws(x, SamplingOptions{2.0f, 120, 0.8f}, 200, 7);  // k in the tail, then p
}

TEST(SamplingTest, GreedyEdgeCases) {
  SKIP_WITHOUT_DEVICE();
  const int vocab = 32000;
  std::vector<float> x = RandomLogits(vocab, 2.0f, 17);
  x[777] = 40.0f;
  x[31999] = 40.0f;  // tie: the lower id wins
  const std::vector<SamplingRow> rows = {
      RowOf(SamplingOptions{0.0f, 0, 1.0f}),       // greedy
      RowOf(SamplingOptions{0.0f, 10, 0.5f}),      // greedy ignores the cuts
      RowOf(SamplingOptions{1.0f, 1, 1.0f}),       // top-k 1
      RowOf(SamplingOptions{1.0f, 0, 1e-6f}),      // tiny top-p: the first token only
      RowOf(SamplingOptions{1e-3f, 0, 1.0f}),      // temperature -> 0: the two tied leaders
  };
  std::vector<float> logits;
  for (size_t r = 0; r < rows.size(); ++r) logits.insert(logits.end(), x.begin(), x.end());
  const DeviceResult got = RunDevice(logits, vocab, rows, std::vector<double>(rows.size(), 0.99));
  for (size_t r = 0; r < 4; ++r) {
    EXPECT_EQ(got.token[r], 777) << "row " << r;
    EXPECT_EQ(got.candidates[r], 1) << "row " << r;
  }
  // Temperature 1e-3: only the two tied leaders have mass; u = 0.99 takes the second.
  EXPECT_EQ(got.token[4], 31999);
  EXPECT_EQ(got.token[4], SampleWithUniform(x, SamplingOptions{1e-3f, 0, 1.0f}, 0.99));
  // top_p = 1 and no top-k: every token is a candidate.
  const DeviceResult all =
      RunDevice(x, vocab, {RowOf(SamplingOptions{1.0f, 0, 1.0f})}, std::vector<double>{0.5});
  EXPECT_EQ(all.candidates[0], vocab);
  // Greedy with NaN and −inf: NaN never wins; all −inf -> 0 (as ArgMaxRows).
  std::vector<float> y(8, -INFINITY);
  y[0] = NAN;
  y[5] = -1.0f;
  std::vector<float> z(8, -INFINITY);
  std::vector<float> yz = y;
  yz.insert(yz.end(), z.begin(), z.end());
  const DeviceResult nf = RunDevice(yz, 8, {RowOf(SamplingOptions{}), RowOf(SamplingOptions{1.0f, 0, 0.9f})},
                                    std::vector<double>{0.5, 0.5});
  EXPECT_EQ(nf.token[0], 5);
  EXPECT_EQ(nf.token[1], 0);  // all −inf: no finite maximum -> argmax (first)
}

// 20000 generator draws (seed fixed, step = draw index) on a small vocabulary: the frequencies
// follow the renormalised nucleus distribution (chi-square below the 0.1 % critical value), no
// token outside the nucleus is drawn, and the same (seed, step) gives the same token.
TEST(SamplingTest, DrawFrequenciesFollowTheNucleus) {
  SKIP_WITHOUT_DEVICE();
  const std::vector<float> x = {2.0f, 1.5f, 1.4f, 0.3f, -0.2f, 1.0f, -3.0f, 0.9f, 2.1f, -1.0f};
  const SamplingOptions o{0.8f, 0, 0.85f, 1234};
  const int draws = 20000;
  std::vector<SamplingRow> rows;
  std::vector<float> logits;
  for (int s = 0; s < draws; ++s) {
    rows.push_back(RowOf(o, s));
    logits.insert(logits.end(), x.begin(), x.end());
  }
  const DeviceResult got = RunDevice(logits, 10, rows, {});
  const DeviceResult again = RunDevice(logits, 10, rows, {});
  EXPECT_EQ(got.token, again.token);
  const Nucleus n = CpuNucleus(x, o);
  ASSERT_GE(n.order.size(), 4u);
  std::vector<int> count(10, 0);
  for (int32_t t : got.token) {
    ASSERT_GE(t, 0);
    ASSERT_LT(t, 10);
    ++count[t];
  }
  double chi2 = 0;
  int in_nucleus = 0;
  for (size_t j = 0; j < n.order.size(); ++j) {
    const double expected = draws * n.p[j] / n.mass;
    const double d = count[n.order[j]] - expected;
    chi2 += d * d / expected;
    in_nucleus += count[n.order[j]];
  }
  EXPECT_EQ(in_nucleus, draws) << "a token outside the nucleus was drawn";
  // 0.1 % critical values of chi-square with df = |nucleus| − 1 (df 3..9).
  const double crit[] = {0, 0, 0, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88};
  EXPECT_LT(chi2, crit[n.order.size() - 1]) << "nucleus size " << n.order.size();
  // The host's SamplingUniform is the device's: the CPU inverse CDF at it gives the same token.
  for (int s = 0; s < 200; ++s) {
    EXPECT_EQ(got.token[s], SampleWithUniform(x, o, SamplingUniform(o.seed, s))) << "step " << s;
  }
}

TEST(SamplingCheckTest, RejectsBadArguments) {
  SampleRowsParams p;
  p.vocab = 0;
  EXPECT_NE(SampleRowsCheck(p), nullptr);
  p.vocab = kMaxSamplingVocab + 1;
  EXPECT_NE(SampleRowsCheck(p), nullptr);
  p.vocab = 10;
  p.row_stride = 5;
  EXPECT_NE(SampleRowsCheck(p), nullptr);
  p.row_stride = 0;
  EXPECT_EQ(SampleRowsCheck(p), nullptr);  // rows = 0: no pointers needed
  p.rows = 1;
  EXPECT_NE(SampleRowsCheck(p), nullptr);
  EXPECT_EQ(SampleRows(p, nullptr), cudaErrorInvalidValue);
}

TEST(SamplingUniformTest, DeterministicAndInRange) {
  EXPECT_EQ(SamplingUniform(7, 3), SamplingUniform(7, 3));
  EXPECT_NE(SamplingUniform(7, 3), SamplingUniform(7, 4));
  EXPECT_NE(SamplingUniform(7, 3), SamplingUniform(8, 3));
  double mean = 0;
  for (uint64_t s = 0; s < 10000; ++s) {
    const double u = SamplingUniform(42, s);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    mean += u / 10000;
  }
  EXPECT_NEAR(mean, 0.5, 0.015);
}

}  // namespace
}  // namespace prehoc::kernels
