#include "worker/dlm/singular_proxy.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"

namespace prehoc::dlm {
namespace {

// c[m, n] = a[m, k] · b[n, k]ᵀ in float64, parallel over rows of c.
void GemmNT(const double* a, int64_t m, int64_t k, const double* b, int64_t n, double* c,
            ThreadPool* pool) {
  auto run = [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const double* ai = a + i * k;
      for (int64_t j = 0; j < n; ++j) {
        const double* bj = b + j * k;
        double s = 0;
        for (int64_t t = 0; t < k; ++t) s += ai[t] * bj[t];
        c[i * n + j] = s;
      }
    }
  };
  if (pool != nullptr && m * n * k > (int64_t{1} << 18)) {
    pool->ParallelFor(m, 1, run);
  } else {
    run(0, m);
  }
}

// Orthonormalises the rows of q ([rows, dim]) in place (modified Gram–Schmidt, twice for
// stability). A row that becomes numerically zero is replaced by a fresh random direction.
void OrthonormalizeRows(std::vector<double>* q, int rows, int64_t dim, std::mt19937_64* rng) {
  std::normal_distribution<double> nd;
  for (int pass = 0; pass < 2; ++pass) {
    for (int i = 0; i < rows; ++i) {
      double* qi = q->data() + i * dim;
      for (int attempt = 0; attempt < 4; ++attempt) {
        for (int j = 0; j < i; ++j) {
          const double* qj = q->data() + j * dim;
          double d = 0;
          for (int64_t t = 0; t < dim; ++t) d += qi[t] * qj[t];
          for (int64_t t = 0; t < dim; ++t) qi[t] -= d * qj[t];
        }
        double nrm = 0;
        for (int64_t t = 0; t < dim; ++t) nrm += qi[t] * qi[t];
        nrm = std::sqrt(nrm);
        if (nrm > 1e-12) {
          for (int64_t t = 0; t < dim; ++t) qi[t] /= nrm;
          break;
        }
        for (int64_t t = 0; t < dim; ++t) qi[t] = nd(*rng);
      }
    }
  }
}

}  // namespace

void JacobiEigenSymmetric(std::vector<double> a, int n, std::vector<double>* values,
                          std::vector<double>* vectors, int max_sweeps) {
  // v accumulates the rotations: A = V diag(λ) Vᵀ with eigenvectors as the columns of V.
  std::vector<double> v(static_cast<size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i) v[static_cast<size_t>(i) * n + i] = 1.0;
  double fro = 0;
  for (double x : a) fro += x * x;
  fro = std::sqrt(fro);
  const double tol = 1e-15 * std::max(fro, 1e-300);
  auto A = [&](int i, int j) -> double& { return a[static_cast<size_t>(i) * n + j]; };
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    double off = 0;
    for (int i = 0; i < n; ++i) {
      for (int j = i + 1; j < n; ++j) off += A(i, j) * A(i, j);
    }
    if (std::sqrt(2 * off) <= tol) break;
    for (int p = 0; p < n; ++p) {
      for (int q = p + 1; q < n; ++q) {
        const double apq = A(p, q);
        if (std::abs(apq) <= tol / n) continue;
        // Rotation that zeroes A(p, q): tan(2θ) = 2 apq / (aqq − app).
        const double theta = (A(q, q) - A(p, p)) / (2 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (int k = 0; k < n; ++k) {  // columns p, q
          const double akp = A(k, p), akq = A(k, q);
          A(k, p) = c * akp - s * akq;
          A(k, q) = s * akp + c * akq;
        }
        for (int k = 0; k < n; ++k) {  // rows p, q
          const double apk = A(p, k), aqk = A(q, k);
          A(p, k) = c * apk - s * aqk;
          A(q, k) = s * apk + c * aqk;
        }
        for (int k = 0; k < n; ++k) {
          double& vkp = v[static_cast<size_t>(k) * n + p];
          double& vkq = v[static_cast<size_t>(k) * n + q];
          const double x = vkp, y = vkq;
          vkp = c * x - s * y;
          vkq = s * x + c * y;
        }
      }
    }
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return A(x, x) > A(y, y); });
  values->resize(n);
  vectors->assign(static_cast<size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i) {
    (*values)[i] = A(order[i], order[i]);
    for (int k = 0; k < n; ++k) {
      (*vectors)[static_cast<size_t>(i) * n + k] = v[static_cast<size_t>(k) * n + order[i]];
    }
  }
}

absl::StatusOr<SingularProxy> ComputeSingularProxy(const float* w, int out_dim, int in_dim, int rank,
                                                   ThreadPool* pool, const SvdOptions& options) {
  if (out_dim <= 0 || in_dim <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("singular proxy: matrix dims must be positive, got ", out_dim, "x", in_dim));
  }
  const int s = std::min(out_dim, in_dim);
  if (rank < 1 || rank > s) {
    return absl::InvalidArgumentError(absl::StrCat("proxy_rank: ", rank, " must be in [1, ",
                                                   s, "] for a ", out_dim, "x", in_dim,
                                                   " value projection"));
  }
  const int64_t m = out_dim, n = in_dim;
  std::vector<double> wd(static_cast<size_t>(m * n));
  double fro2 = 0;
  for (int64_t i = 0; i < m * n; ++i) {
    wd[i] = w[i];
    fro2 += wd[i] * wd[i];
  }
  SingularProxy out;
  out.rank = rank;
  out.in_dim = in_dim;
  out.proj.assign(static_cast<size_t>(rank) * n, 0.0f);
  out.singular_values.resize(rank);

  // B ([k, n]) spans (approximately, or exactly) the top row space; the proxy rows are then the
  // top eigenvectors e_i of B Bᵀ mapped back: σ_i v_iᵀ = e_iᵀ B (when B = Qᵀ W with orthonormal Q)
  // or, on the exact path with B = W, e_iᵀ W = σ_i v_iᵀ directly (e_i = u_i).
  std::vector<double> b;
  int64_t k;
  if (s <= options.exact_max_dim && out_dim <= in_dim) {
    b = wd;  // exact: eigenvectors of W Wᵀ are u_i
    k = m;
  } else if (s <= options.exact_max_dim) {
    // out > in: eigenvectors of Wᵀ W ([n, n]) are v_i; σ_i v_iᵀ directly.
    std::vector<double> wt(static_cast<size_t>(n * m));
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) wt[j * m + i] = wd[i * n + j];
    }
    std::vector<double> g(static_cast<size_t>(n * n)), vals, vecs;
    GemmNT(wt.data(), n, m, wt.data(), n, g.data(), pool);
    JacobiEigenSymmetric(std::move(g), static_cast<int>(n), &vals, &vecs);
    for (int i = 0; i < rank; ++i) {
      const double sigma = std::sqrt(std::max(vals[i], 0.0));
      out.singular_values[i] = sigma;
      for (int64_t j = 0; j < n; ++j) out.proj[i * n + j] = static_cast<float>(sigma * vecs[i * n + j]);
    }
    double kept = 0;
    for (int i = 0; i < rank; ++i) kept += out.singular_values[i] * out.singular_values[i];
    out.energy = fro2 > 0 ? kept / fro2 : 0;
    return out;
  } else {
    // Randomised range finder on the row space: Z ([k, n]) ← orth(Ω); repeat: Y = Z Wᵀ ([k, m]),
    // orth, Z = Y W ([k, n]), orth. Then Q = orth(W Zᵀ) and B = Qᵀ W.
    k = std::min<int64_t>(rank + options.oversample, s);
    std::mt19937_64 rng(options.seed);
    std::normal_distribution<double> nd;
    std::vector<double> z(static_cast<size_t>(k * n)), y(static_cast<size_t>(k * m));
    for (double& x : z) x = nd(rng);
    OrthonormalizeRows(&z, static_cast<int>(k), n, &rng);
    std::vector<double> wt(static_cast<size_t>(n * m));
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) wt[j * m + i] = wd[i * n + j];
    }
    for (int it = 0; it <= options.power_iterations; ++it) {
      GemmNT(z.data(), k, n, wd.data(), m, y.data(), pool);  // y = z Wᵀ: [k, m]
      OrthonormalizeRows(&y, static_cast<int>(k), m, &rng);
      if (it == options.power_iterations) break;
      GemmNT(y.data(), k, m, wt.data(), n, z.data(), pool);  // z = y W: [k, n]
      OrthonormalizeRows(&z, static_cast<int>(k), n, &rng);
    }
    b.resize(static_cast<size_t>(k * n));
    GemmNT(y.data(), k, m, wt.data(), n, b.data(), pool);  // B = Qᵀ W with Q = yᵀ
  }
  std::vector<double> g(static_cast<size_t>(k * k)), vals, vecs;
  GemmNT(b.data(), k, n, b.data(), k, g.data(), pool);
  JacobiEigenSymmetric(std::move(g), static_cast<int>(k), &vals, &vecs);
  double kept = 0;
  for (int i = 0; i < rank; ++i) {
    out.singular_values[i] = std::sqrt(std::max(vals[i], 0.0));
    kept += out.singular_values[i] * out.singular_values[i];
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t t = 0; t < k; ++t) acc += vecs[i * k + t] * b[t * n + j];
      out.proj[i * n + j] = static_cast<float>(acc);
    }
  }
  out.energy = fro2 > 0 ? kept / fro2 : 0;
  return out;
}

}  // namespace prehoc::dlm
