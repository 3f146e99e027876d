// Row work of the fused linear loss on one chunk of logits: logsumexp, target log-prob and entropy (row_stats),
// then dL/dlogits = g * (onehot(target) - softmax), plus the entropy's gradient when asked, written over the logits
// (row_grad_).
//
// The chunk is a [n, V] view of a contiguous [V, n] buffer: the layout in which the chunk GEMM h W^T runs fastest
// on CPU. Consecutive rows are then adjacent in memory, so a SIMD vector holds one vocabulary entry of several rows
// and every reduction over the vocabulary is a plain element-wise max / add, with no horizontal step.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace thinkless {
namespace {

using at::vec::Vectorized;

// The vocabulary is walked in tiles of kTile entries. A thread owns a contiguous run of rows (whole SIMD vectors),
// so each tile it reads is kTile runs of contiguous memory, small enough to stay in L1/L2 while each of its vectors
// makes its two passes (tile max, then exp-sum against it); DRAM sees every logit once. Tiling also cascades the
// sums: partial sums over kTile entries, then their total.
constexpr int64_t kTile = 64;

// exp is the bulk of the arithmetic: two per logit. exp_u20 (a degree-5 polynomial, <= 20 ulp, ~2e-6 relative in
// fp32; exact Sleef exp for fp64) is what torch's own CPU softmax uses; the sums and the gradient stay within
// 1e-5 of the float64 truth. The running-max rescale keeps the accurate exp: it is one per tile, not per logit.

template <typename scalar_t>
struct Lanes {
  using Vec = Vectorized<scalar_t>;
  static constexpr int64_t kVec = Vec::size();
  const scalar_t* z;
  int64_t n;  // rows in the chunk: the row stride of the [V, n] buffer

  int64_t count(int64_t j) const { return std::clamp<int64_t>(n - j * kVec, 0, kVec); }
  Vec load(const scalar_t* base, int64_t v, int64_t j) const {
    const scalar_t* p = base + v * n + j * kVec;
    const int64_t c = count(j);
    return c == kVec ? Vec::loadu(p) : Vec::loadu(p, c);
  }
  void store(scalar_t* base, int64_t v, int64_t j, const Vec& x) const {
    scalar_t* p = base + v * n + j * kVec;
    const int64_t c = count(j);
    c == kVec ? x.store(p) : x.store(p, c);
  }
  Vec load_rows(const scalar_t* per_row, int64_t j) const { return load(per_row, 0, j); }
  void store_rows(scalar_t* per_row, int64_t j, const Vec& x) const { store(per_row, 0, j, x); }
};

template <typename scalar_t>
void row_stats_impl(const scalar_t* z, const int64_t* target, int64_t n, int64_t V, scalar_t inv_temp,
                    bool want_entropy, scalar_t* lse, scalar_t* logp, scalar_t* entropy) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  const L lanes{z, n};
  const int64_t vectors = (n + L::kVec - 1) / L::kVec;
  at::parallel_for(0, vectors, 1, [&](int64_t j0, int64_t j1) {
    const Vec it(inv_temp);
    // Running max m, sum s of exp(x - m) and sum sz of exp(x - m) (x - m), per vector of rows.
    std::vector<Vec> m(j1 - j0), s(j1 - j0), sz(j1 - j0);
    for (int64_t v0 = 0; v0 < V; v0 += kTile) {
      const int64_t v1 = std::min(V, v0 + kTile);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t k = j - j0;
        Vec tile_max = lanes.load(z, v0, j) * it;
        for (int64_t v = v0 + 1; v < v1; ++v) tile_max = at::vec::maximum(tile_max, lanes.load(z, v, j) * it);
        const Vec m_new = v0 == 0 ? tile_max : at::vec::maximum(m[k], tile_max);
        Vec ts(0), tsz(0);
        for (int64_t v = v0; v < v1; ++v) {
          const Vec d = lanes.load(z, v, j) * it - m_new;
          const Vec e = d.exp_u20();
          ts = ts + e;
          if (want_entropy) tsz = at::vec::fmadd(e, d, tsz);
        }
        if (v0 == 0) {
          s[k] = ts;
          sz[k] = tsz;
        } else {  // move the running sums to the new max: x - m_new = (x - m) + (m - m_new)
          const Vec shift = m[k] - m_new;
          const Vec scale = shift.exp();
          if (want_entropy) sz[k] = at::vec::fmadd(scale, at::vec::fmadd(s[k], shift, sz[k]), tsz);
          s[k] = at::vec::fmadd(s[k], scale, ts);
        }
        m[k] = m_new;
      }
    }
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t k = j - j0;
      const Vec log_s = s[k].log();
      lanes.store_rows(lse, j, m[k] + log_s);
      if (want_entropy) lanes.store_rows(entropy, j, log_s - sz[k] / s[k]);
    }
    for (int64_t r = j0 * L::kVec; r < std::min(n, j1 * L::kVec); ++r)
      logp[r] = z[target[r] * n + r] * inv_temp - lse[r];
  });
}

// With an entropy gradient gamma per row (dL/dH / temperature), dL/dx_v gains gamma * dH/dx_v = -gamma p_v (x_v -
// lse + H): the row's coefficient becomes -(g + gamma (H - lse)) - gamma x_v, one more multiply-add per logit.
template <typename scalar_t>
void row_grad_impl(scalar_t* z, const int64_t* target, const scalar_t* lse, const scalar_t* grad,
                   const scalar_t* entropy, const scalar_t* entropy_grad, int64_t n, int64_t V, scalar_t inv_temp) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  const L lanes{z, n};
  const int64_t vectors = (n + L::kVec - 1) / L::kVec;
  at::parallel_for(0, vectors, 1, [&](int64_t j0, int64_t j1) {
    const Vec it(inv_temp);
    std::vector<Vec> l(j1 - j0), minus_g(j1 - j0), minus_gamma(j1 - j0);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t k = j - j0;
      l[k] = lanes.load_rows(lse, j);
      minus_g[k] = Vec(0) - lanes.load_rows(grad, j);
      if (entropy_grad) {
        minus_gamma[k] = Vec(0) - lanes.load_rows(entropy_grad, j);
        minus_g[k] = at::vec::fmadd(minus_gamma[k], lanes.load_rows(entropy, j) - l[k], minus_g[k]);
      }
    }
    for (int64_t v = 0; v < V; ++v) {  // one pass, each vocabulary entry a contiguous run of this thread's rows
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t k = j - j0;
        const Vec x = lanes.load(z, v, j) * it;
        const Vec p = (x - l[k]).exp_u20();
        lanes.store(z, v, j, entropy_grad ? p * at::vec::fmadd(minus_gamma[k], x, minus_g[k]) : p * minus_g[k]);
      }
    }
    for (int64_t r = j0 * L::kVec; r < std::min(n, j1 * L::kVec); ++r) z[target[r] * n + r] += grad[r];
  });
}

void check_chunk(const at::Tensor& logits, const at::Tensor& targets) {
  check_cpu(logits, "logits");
  check_dtype(logits, "logits", {at::kFloat, at::kDouble});
  TORCH_CHECK_VALUE(logits.dim() == 2, "thinkless._C: logits must be 2-D [n, V], got ", logits.dim(), "-D");
  TORCH_CHECK_VALUE(logits.size(0) <= 1 || logits.t().is_contiguous(), "thinkless._C: logits must be a [n, V] view ",
                    "of a contiguous [V, n] buffer (logits.t().is_contiguous()), got strides ", logits.strides());
  check_cpu(targets, "targets");
  check_dtype(targets, "targets", {at::kLong});
  check_contiguous(targets, "targets");
  check_shape(targets, "targets", logits.sizes().slice(0, 1), "logits' first dimension");
  const int64_t V = logits.size(1);
  if (targets.numel()) {
    const auto [lo, hi] = at::aminmax(targets);
    TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < V, "thinkless._C: targets must lie in [0, ", V,
                      "), got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
}

void check_per_row(const at::Tensor& t, const char* name, const at::Tensor& logits) {
  check_cpu(t, name);
  check_contiguous(t, name);
  check_shape(t, name, logits.sizes().slice(0, 1), "logits' first dimension");
  TORCH_CHECK_VALUE(t.scalar_type() == logits.scalar_type(), "thinkless._C: ", name, " must have the dtype of logits (",
                    logits.scalar_type(), "), got ", t.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_stats(const at::Tensor& logits, const at::Tensor& targets,
                                                         double inv_temp, bool want_entropy) {
  check_chunk(logits, targets);
  const int64_t n = logits.size(0), V = logits.size(1);
  auto lse = at::empty({n}, logits.options());
  auto logp = at::empty({n}, logits.options());
  auto entropy = at::empty({want_entropy ? n : 0}, logits.options());
  if (n == 0) return {lse, logp, entropy};
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "row_stats", [&] {
    row_stats_impl<scalar_t>(logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), n, V,
                             static_cast<scalar_t>(inv_temp), want_entropy, lse.data_ptr<scalar_t>(),
                             logp.data_ptr<scalar_t>(), want_entropy ? entropy.data_ptr<scalar_t>() : nullptr);
  });
  return {lse, logp, entropy};
}

void row_grad_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& grad,
               double inv_temp, const c10::optional<at::Tensor>& entropy,
               const c10::optional<at::Tensor>& entropy_grad) {
  check_chunk(logits, targets);
  check_per_row(lse, "lse", logits);
  check_per_row(grad, "grad", logits);
  TORCH_CHECK_VALUE(entropy.has_value() == entropy_grad.has_value(),
                    "thinkless._C: entropy and entropy_grad go together (the gradient needs each row's entropy)");
  if (entropy_grad.has_value()) {
    check_per_row(*entropy, "entropy", logits);
    check_per_row(*entropy_grad, "entropy_grad", logits);
  }
  const int64_t n = logits.size(0), V = logits.size(1);
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "row_grad_", [&] {
    const bool has_entropy = entropy_grad.has_value();
    row_grad_impl<scalar_t>(logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), lse.data_ptr<scalar_t>(),
                            grad.data_ptr<scalar_t>(), has_entropy ? entropy->data_ptr<scalar_t>() : nullptr,
                            has_entropy ? entropy_grad->data_ptr<scalar_t>() : nullptr, n, V,
                            static_cast<scalar_t>(inv_temp));
  });
}

}  // namespace thinkless
