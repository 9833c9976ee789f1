// Rotary position embedding frequencies (Hugging Face convention, "rotate_half" layout: element i
// of the first half pairs with element i + head_dim/2).
#ifndef PREHOC_WORKER_ROPE_H_
#define PREHOC_WORKER_ROPE_H_

#include <vector>

#include "common/model_config.h"

namespace prehoc {

// Returns inv_freq[i] for i in [0, head_dim/2), including `rope_scaling` (linear: divided by
// factor; llama3: the wavelength-dependent blend of transformers' _compute_llama3_parameters).
// inv_freq[i] = 1 / theta^(2i / head_dim) before scaling.
std::vector<float> RopeInvFrequencies(const ModelConfig& config);

// Rotates `x` ([num_heads, head_dim], contiguous) in place for position `pos`:
//   x'[i]      = x[i] cos(pos f_i) - x[i+h] sin(pos f_i)
//   x'[i + h]  = x[i+h] cos(pos f_i) + x[i] sin(pos f_i),   h = head_dim / 2.
void ApplyRope(float* x, int num_heads, int head_dim, int pos, const std::vector<float>& inv_freq);

}  // namespace prehoc

#endif  // PREHOC_WORKER_ROPE_H_
