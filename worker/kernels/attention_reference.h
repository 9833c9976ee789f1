// CPU float64 reference for paged decode attention (paged_decode.h), for tests and benchmarks.
// Same tensor contract as PagedDecodeParams, with host pointers; fp16/bf16 elements are given as
// their raw 16-bit patterns.
#ifndef PREHOC_WORKER_KERNELS_ATTENTION_REFERENCE_H_
#define PREHOC_WORKER_KERNELS_ATTENTION_REFERENCE_H_

#include <cstdint>
#include <vector>

#include "worker/kernels/paged_decode.h"

namespace prehoc::kernels {

struct HostDecodeArgs {
  AttnDType dtype = AttnDType::kFloat16;
  KvSelection selection = KvSelection::kDense;
  int batch = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int page_size = 16;
  const uint16_t* q = nullptr;       // [batch][num_q_heads][head_dim]
  const uint16_t* k_pool = nullptr;  // [num_pages][num_kv_heads][page_size][head_dim]
  const uint16_t* v_pool = nullptr;
  const int32_t* page_indptr = nullptr;
  const int32_t* page_indices = nullptr;
  const int32_t* seq_lens = nullptr;
  const int32_t* index_indptr = nullptr;
  const int32_t* index_indices = nullptr;
  const uint8_t* mask = nullptr;  // kTokenMask: [batch * num_kv_heads][mask_stride]
  int mask_stride = 0;
  float scale = 0.f;  // 0 = 1/sqrt(head_dim)
};

// Converts one element to double (exact).
double HalfBitsToDouble(uint16_t bits, AttnDType dtype);
// Rounds to the nearest representable element (ties to even).
uint16_t DoubleToHalfBits(double v, AttnDType dtype);

// out [batch * num_q_heads * head_dim] and lse [batch * num_q_heads] in float64, following the
// contract of paged_decode.h exactly (out-of-range sparse entries ignored, empty set -> out 0,
// lse -inf). Inputs are read in their stored precision; all arithmetic is float64.
void ReferencePagedDecode(const HostDecodeArgs& a, std::vector<double>* out,
                          std::vector<double>* lse);

}  // namespace prehoc::kernels

#endif  // PREHOC_WORKER_KERNELS_ATTENTION_REFERENCE_H_
