// Row work of the fused linear loss on one chunk of logits: logsumexp, target log-prob and entropy (row_stats),
// then dL/dlogits = g * (onehot(target) - softmax) written over the logits (row_grad_).
//
// The chunk is a [n, V] view of a contiguous [V, n] buffer: the layout in which the chunk GEMM h W^T runs fastest
// on CPU. Consecutive rows are then adjacent in memory, so a SIMD vector holds one vocabulary entry of several rows
// and every reduction over the vocabulary is a plain element-wise max / add, with no horizontal step. A block of
// rows fills one 64-byte cache line per vocabulary entry; its V lines stay in cache across the two passes.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "checks.h"
#include "ops.h"

namespace thinkless {
namespace {

using at::vec::Vectorized;

// Sums over the vocabulary are cascaded: partial sums over kCascade entries, then their total, so the rounding
// error grows with kCascade + V / kCascade rather than with V.
constexpr int64_t kCascade = 256;

template <typename scalar_t>
struct Block {
  using Vec = Vectorized<scalar_t>;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kLanes = std::max<int64_t>(kVec, 64 / static_cast<int64_t>(sizeof(scalar_t)));
  static constexpr int64_t kNumVec = kLanes / kVec;

  int64_t r0, n;  // first row of the block, rows in the chunk (the row stride of the [V, n] buffer)

  int64_t count(int64_t j) const { return std::clamp<int64_t>(n - r0 - j * kVec, 0, kVec); }
  Vec load(const scalar_t* z, int64_t v, int64_t j) const {
    const scalar_t* p = z + v * n + r0 + j * kVec;
    const int64_t c = count(j);
    return c == kVec ? Vec::loadu(p) : Vec::loadu(p, c);
  }
  void store(scalar_t* z, int64_t v, int64_t j, const Vec& x) const {
    scalar_t* p = z + v * n + r0 + j * kVec;
    const int64_t c = count(j);
    c == kVec ? x.store(p) : x.store(p, c);
  }
  Vec load_rows(const scalar_t* per_row, int64_t j) const {  // a vector of per-row values
    const int64_t c = count(j);
    return c == kVec ? Vec::loadu(per_row + r0 + j * kVec) : Vec::loadu(per_row + r0 + j * kVec, c);
  }
  void store_rows(scalar_t* per_row, int64_t j, const Vec& x) const {
    const int64_t c = count(j);
    c == kVec ? x.store(per_row + r0 + j * kVec) : x.store(per_row + r0 + j * kVec, c);
  }
};

template <typename scalar_t>
void row_stats_impl(const scalar_t* z, const int64_t* target, int64_t n, int64_t V, scalar_t inv_temp,
                    bool want_entropy, scalar_t* lse, scalar_t* logp, scalar_t* entropy) {
  using B = Block<scalar_t>;
  using Vec = typename B::Vec;
  const int64_t blocks = (n + B::kLanes - 1) / B::kLanes;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const B block{blk * B::kLanes, n};
      const Vec it(inv_temp);
      for (int64_t j = 0; j < B::kNumVec; ++j) {
        if (block.count(j) == 0) break;
        // Pass 1: the row maximum. Pass 2: s = sum exp(x - m) and sz = sum exp(x - m) (x - m), cascaded.
        Vec m(-std::numeric_limits<scalar_t>::infinity());
        for (int64_t v = 0; v < V; ++v) m = at::vec::maximum(m, block.load(z, v, j) * it);
        Vec s(0), sz(0);
        for (int64_t v0 = 0; v0 < V; v0 += kCascade) {
          Vec ps(0), psz(0);
          const int64_t v1 = std::min(V, v0 + kCascade);
          for (int64_t v = v0; v < v1; ++v) {
            const Vec d = block.load(z, v, j) * it - m;
            const Vec e = d.exp();
            ps = ps + e;
            if (want_entropy) psz = at::vec::fmadd(e, d, psz);
          }
          s = s + ps;
          sz = sz + psz;
        }
        const Vec log_s = s.log();
        block.store_rows(lse, j, m + log_s);
        if (want_entropy) block.store_rows(entropy, j, log_s - sz / s);
      }
      for (int64_t r = block.r0; r < std::min(n, block.r0 + B::kLanes); ++r)
        logp[r] = z[target[r] * n + r] * inv_temp - lse[r];
    }
  });
}

template <typename scalar_t>
void row_grad_impl(scalar_t* z, const int64_t* target, const scalar_t* lse, const scalar_t* grad, int64_t n,
                   int64_t V, scalar_t inv_temp) {
  using B = Block<scalar_t>;
  using Vec = typename B::Vec;
  const int64_t blocks = (n + B::kLanes - 1) / B::kLanes;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const B block{blk * B::kLanes, n};
      const Vec it(inv_temp);
      for (int64_t j = 0; j < B::kNumVec; ++j) {
        if (block.count(j) == 0) break;
        const Vec l = block.load_rows(lse, j);
        const Vec minus_g = Vec(0) - block.load_rows(grad, j);
        for (int64_t v = 0; v < V; ++v) block.store(z, v, j, minus_g * (block.load(z, v, j) * it - l).exp());
      }
      for (int64_t r = block.r0; r < std::min(n, block.r0 + B::kLanes); ++r) z[target[r] * n + r] += grad[r];
    }
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
               double inv_temp) {
  check_chunk(logits, targets);
  check_per_row(lse, "lse", logits);
  check_per_row(grad, "grad", logits);
  const int64_t n = logits.size(0), V = logits.size(1);
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "row_grad_", [&] {
    row_grad_impl<scalar_t>(logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), lse.data_ptr<scalar_t>(),
                            grad.data_ptr<scalar_t>(), n, V, static_cast<scalar_t>(inv_temp));
  });
}

}  // namespace thinkless
