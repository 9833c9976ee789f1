// bf16 instantiations of the paged decode attention kernels (paged_decode.cuh).
#include "worker/kernels/paged_decode.cuh"

PREHOC_INSTANTIATE_PAGED_DECODE(__nv_bfloat16)
