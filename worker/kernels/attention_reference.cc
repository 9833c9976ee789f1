#include "worker/kernels/attention_reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace prehoc::kernels {

namespace {

double DecodeF16(uint16_t h) {
  const int sign = (h >> 15) & 1;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  double v;
  if (exp == 0) {
    v = std::ldexp(static_cast<double>(mant), -24);
  } else if (exp == 31) {
    v = mant == 0 ? std::numeric_limits<double>::infinity()
                  : std::numeric_limits<double>::quiet_NaN();
  } else {
    v = std::ldexp(static_cast<double>(mant | 0x400), exp - 25);
  }
  return sign ? -v : v;
}

}  // namespace

double HalfBitsToDouble(uint16_t h, AttnDType dtype) {
  if (dtype == AttnDType::kBFloat16) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  static const std::vector<double>* table = [] {
    auto* t = new std::vector<double>(65536);
    for (int i = 0; i < 65536; ++i) (*t)[i] = DecodeF16(static_cast<uint16_t>(i));
    return t;
  }();
  return (*table)[h];
}

uint16_t DoubleToHalfBits(double v, AttnDType dtype) {
  if (dtype == AttnDType::kBFloat16) {
    const float f = static_cast<float>(v);  // double->float rounding first: fine for tests
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
  if (std::isnan(v)) return 0x7e00;
  const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  double a = std::fabs(v);
  if (a >= 65520.0) return sign | 0x7c00;  // rounds to Inf
  if (a < std::ldexp(1.0, -14)) {          // subnormal: units of 2^-24
    const double q = std::nearbyint(a * std::ldexp(1.0, 24));
    return sign | static_cast<uint16_t>(q);
  }
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  const double unit = std::ldexp(1.0, e - 11);
  double q = std::nearbyint(a / unit);  // 11 significant bits (ties to even)
  if (q >= 2048.0) {
    q /= 2;
    ++e;
  }
  const int biased = e - 1 + 15;
  if (biased >= 31) return sign | 0x7c00;
  return sign | static_cast<uint16_t>((biased << 10) | (static_cast<int>(q) & 0x3ff));
}

void ReferencePagedDecode(const HostDecodeArgs& a, std::vector<double>* out,
                          std::vector<double>* lse) {
  const int D = a.head_dim;
  const int P = a.page_size;
  const int group = a.num_q_heads / a.num_kv_heads;
  const double scale = a.scale > 0.f ? a.scale : 1.0 / std::sqrt(static_cast<double>(D));
  out->assign(static_cast<size_t>(a.batch) * a.num_q_heads * D, 0.0);
  lse->assign(static_cast<size_t>(a.batch) * a.num_q_heads,
              -std::numeric_limits<double>::infinity());
  std::vector<int> tokens;
  std::vector<double> s;
  for (int b = 0; b < a.batch; ++b) {
    const int seq_len = std::max(a.seq_lens[b], 0);
    const int num_pages = (seq_len + P - 1) / P;
    const int32_t* pages = a.page_indices + a.page_indptr[b];
    for (int h = 0; h < a.num_kv_heads; ++h) {
      tokens.clear();
      if (a.selection == KvSelection::kDense) {
        for (int t = 0; t < seq_len; ++t) tokens.push_back(t);
      } else if (a.selection == KvSelection::kTokenMask) {
        const uint8_t* m = a.mask + static_cast<size_t>(b * a.num_kv_heads + h) * a.mask_stride;
        for (int t = 0; t < std::min(seq_len, a.mask_stride); ++t) {
          if (m[t] != 0) tokens.push_back(t);
        }
      } else {
        const int r = b * a.num_kv_heads + h;
        for (int i = a.index_indptr[r]; i < a.index_indptr[r + 1]; ++i) {
          const int x = a.index_indices[i];
          if (a.selection == KvSelection::kToken) {
            if (x >= 0 && x < seq_len) tokens.push_back(x);
          } else if (x >= 0 && x < num_pages) {
            for (int t = x * P; t < std::min((x + 1) * P, seq_len); ++t) tokens.push_back(t);
          }
        }
      }
      auto row = [&](const uint16_t* pool, int t) {
        return pool + ((static_cast<size_t>(pages[t / P]) * a.num_kv_heads + h) * P + t % P) * D;
      };
      for (int g = 0; g < group; ++g) {
        const int hq = h * group + g;
        const uint16_t* q = a.q + (static_cast<size_t>(b) * a.num_q_heads + hq) * D;
        if (tokens.empty()) continue;
        s.assign(tokens.size(), 0.0);
        double m = -std::numeric_limits<double>::infinity();
        for (size_t j = 0; j < tokens.size(); ++j) {
          const uint16_t* k = row(a.k_pool, tokens[j]);
          double dot = 0.0;
          for (int d = 0; d < D; ++d) {
            dot += HalfBitsToDouble(q[d], a.dtype) * HalfBitsToDouble(k[d], a.dtype);
          }
          s[j] = dot * scale;
          m = std::max(m, s[j]);
        }
        double sum = 0.0;
        for (double& x : s) {
          x = std::exp(x - m);
          sum += x;
        }
        double* o = out->data() + (static_cast<size_t>(b) * a.num_q_heads + hq) * D;
        for (size_t j = 0; j < tokens.size(); ++j) {
          const uint16_t* v = row(a.v_pool, tokens[j]);
          const double p = s[j] / sum;
          for (int d = 0; d < D; ++d) o[d] += p * HalfBitsToDouble(v[d], a.dtype);
        }
        (*lse)[static_cast<size_t>(b) * a.num_q_heads + hq] = m + std::log(sum);
      }
    }
  }
}

}  // namespace prehoc::kernels
