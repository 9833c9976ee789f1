// SPA-Cache's singular proxy: a rank-r projection of a layer's value projection W_v, computed once
// from the weights (no calibration data), in float64, with no external linear-algebra library.
//
// For W = U Σ Vᵀ ([out, in], singular values descending), the proxy matrix is
//   P = Σ_r V_rᵀ  ([r, in]; row i = σ_i v_iᵀ = u_iᵀ W)
// so P·h are the coordinates of W·h along its top-r left singular directions: ‖P·h‖ ≤ ‖W·h‖, and
// cos(P·h, P·h') tracks how much the value vector of a row moved, at r/out of the cost.
#ifndef PREHOC_WORKER_DLM_SINGULAR_PROXY_H_
#define PREHOC_WORKER_DLM_SINGULAR_PROXY_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/thread_pool.h"

namespace prehoc::dlm {

// Eigen-decomposition of a symmetric n×n matrix `a` (row-major; only symmetric input is
// meaningful) by the cyclic Jacobi method with threshold, until every off-diagonal element is below
// 1e-15 relative to the Frobenius norm (or max_sweeps sweeps). Returns eigenvalues descending in
// *values and the matching unit eigenvectors as rows of *vectors ([n, n], row i ↔ values[i]).
// Cost O(n³) per sweep; used for n up to a few hundred.
void JacobiEigenSymmetric(std::vector<double> a, int n, std::vector<double>* values,
                          std::vector<double>* vectors, int max_sweeps = 100);

struct SvdOptions {
  // min(out, in) up to this size: exact (Jacobi on the smaller Gram matrix). Above: randomised
  // subspace iteration (Halko–Martinsson–Tropp) with `oversample` extra columns and
  // `power_iterations` passes, then Rayleigh–Ritz with Jacobi on the small matrix.
  int exact_max_dim = 512;
  int oversample = 8;
  int power_iterations = 6;
  uint64_t seed = 1234;
};

struct SingularProxy {
  int rank = 0;
  int in_dim = 0;
  std::vector<float> proj;               // [rank, in_dim], row i = σ_i v_iᵀ
  std::vector<double> singular_values;   // the top `rank` σ_i, descending
  // Fraction of ‖W‖_F² the proxy keeps: Σ_{i<r} σ_i² / ‖W‖_F².
  double energy = 0;
};

// Computes the rank-`rank` proxy of `w` ([out_dim, in_dim] row-major float32). `pool` (may be
// null) parallelises the large products. INVALID_ARGUMENT naming `proxy_rank` unless
// 1 <= rank <= min(out_dim, in_dim); INVALID_ARGUMENT for non-positive dims.
absl::StatusOr<SingularProxy> ComputeSingularProxy(const float* w, int out_dim, int in_dim, int rank,
                                                   ThreadPool* pool, const SvdOptions& options = {});

}  // namespace prehoc::dlm

#endif  // PREHOC_WORKER_DLM_SINGULAR_PROXY_H_
