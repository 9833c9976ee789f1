#include "worker/rope.h"

#include <cmath>

namespace prehoc {

std::vector<float> RopeInvFrequencies(const ModelConfig& config) {
  const int d = config.head_dim;
  std::vector<float> inv(d / 2);
  for (int i = 0; i < d / 2; ++i) {
    // Same float32 rounding as transformers: base ** (2i/d) in float, then reciprocal.
    const float expo = static_cast<float>(2 * i) / static_cast<float>(d);
    inv[i] = 1.0f / std::pow(static_cast<float>(config.rope_theta), expo);
  }
  const RopeScaling& rs = config.rope_scaling;
  if (rs.type == RopeScaling::Type::kLinear) {
    for (float& f : inv) f = f / static_cast<float>(rs.factor);
  } else if (rs.type == RopeScaling::Type::kLlama3) {
    const float factor = static_cast<float>(rs.factor);
    const float low = static_cast<float>(rs.low_freq_factor);
    const float high = static_cast<float>(rs.high_freq_factor);
    const float old_ctx = static_cast<float>(rs.original_max_position_embeddings);
    const float low_freq_wavelen = old_ctx / low;
    const float high_freq_wavelen = old_ctx / high;
    for (float& f : inv) {
      const float wavelen = 2.0f * static_cast<float>(M_PI) / f;
      float scaled = wavelen > low_freq_wavelen ? f / factor : f;
      const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
      if (medium) {
        const float smooth = (old_ctx / wavelen - low) / (high - low);
        scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
      }
      f = scaled;
    }
  }
  return inv;
}

void ApplyRope(float* x, int num_heads, int head_dim, int pos, const std::vector<float>& inv_freq) {
  const int h = head_dim / 2;
  for (int i = 0; i < h; ++i) {
    const float angle = static_cast<float>(pos) * inv_freq[i];
    const float c = std::cos(angle);
    const float s = std::sin(angle);
    for (int head = 0; head < num_heads; ++head) {
      float* v = x + static_cast<size_t>(head) * head_dim;
      const float a = v[i];
      const float b = v[i + h];
      v[i] = a * c - b * s;
      v[i + h] = b * c + a * s;
    }
  }
}

}  // namespace prehoc
