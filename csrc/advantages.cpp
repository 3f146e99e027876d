// Group-relative advantages: A_i = r_i - mean(r over its group), optionally / (unbiased std + eps).
//
// Samples are grouped by id (runs, a counting sort or a stable sort; see below), then each group is reduced on its
// own (in double, in sample order), so the result does not depend on the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace thinkless {

at::Tensor group_advantages(const at::Tensor& rewards, const at::Tensor& group_ids, bool normalize_std, double eps) {
  check_cpu(rewards, "rewards");
  check_cpu(group_ids, "group_ids");
  check_dtype(rewards, "rewards", {at::kFloat, at::kDouble});
  check_dtype(group_ids, "group_ids", {at::kLong});
  TORCH_CHECK_VALUE(rewards.dim() == 1, "thinkless._C: rewards must be 1-D [N], got ", rewards.dim(), "-D");
  check_shape(group_ids, "group_ids", rewards.sizes(), "rewards");
  TORCH_CHECK_VALUE(!normalize_std || eps > 0, "thinkless._C: eps must be > 0 with normalize_std, got ", eps);

  const int64_t n = rewards.numel();
  auto out = at::empty({n}, rewards.options().dtype(at::kFloat));
  if (n == 0) return out;
  const auto r = rewards.to(at::kDouble).contiguous();
  const auto ids = group_ids.contiguous();
  const double* rp = r.data_ptr<double>();
  const int64_t* gp = ids.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();

  // `order`: positions grouped by id, in sample order inside each group (a stable sort by id); `starts`: where
  // each group begins in it, then n.
  std::vector<int64_t> order(n);
  std::vector<int64_t> starts;
  if (std::is_sorted(gp, gp + n)) {  // the trainer's layout, prompt by prompt: the groups are runs
    std::iota(order.begin(), order.end(), 0);
  } else if (const auto [lo, hi] = std::minmax_element(gp, gp + n);
             static_cast<uint64_t>(*hi) - static_cast<uint64_t>(*lo) < static_cast<uint64_t>(4 * n)) {
    // Dense ids (any order): a counting sort, linear in n. On the 2-core EPYC, 8192 shuffled ids: 0.06 ms, against
    // 0.41 ms with the stable sort below and 0.31 ms for torch's unique + index_add.
    const int64_t range = *hi - *lo + 1;
    std::vector<int64_t> next(range + 1, 0);
    for (int64_t i = 0; i < n; ++i) ++next[gp[i] - *lo + 1];
    for (int64_t k = 0; k < range; ++k) next[k + 1] += next[k];
    for (int64_t k = 0; k < range; ++k) {
      if (next[k + 1] > next[k]) starts.push_back(next[k]);
    }
    for (int64_t i = 0; i < n; ++i) order[next[gp[i] - *lo]++] = i;
  } else {  // sparse ids: a stable sort of the positions
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [gp](int64_t a, int64_t b) { return gp[a] < gp[b]; });
  }
  if (starts.empty()) {
    for (int64_t i = 0; i < n; ++i) {
      if (i == 0 || gp[order[i]] != gp[order[i - 1]]) starts.push_back(i);
    }
  }
  starts.push_back(n);

  const int64_t groups = static_cast<int64_t>(starts.size()) - 1;
  at::parallel_for(0, groups, 64, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t begin = starts[g], end = starts[g + 1], size = end - begin;
      if (size == 1) {  // no baseline to compare against
        op[order[begin]] = 0.0f;
        continue;
      }
      double sum = 0.0;
      for (int64_t i = begin; i < end; ++i) sum += rp[order[i]];
      const double mean = sum / static_cast<double>(size);
      double scale = 1.0;
      if (normalize_std) {
        double sq = 0.0;
        for (int64_t i = begin; i < end; ++i) {
          const double d = rp[order[i]] - mean;
          sq += d * d;
        }
        scale = 1.0 / (std::sqrt(sq / static_cast<double>(size - 1)) + eps);
      }
      for (int64_t i = begin; i < end; ++i) op[order[i]] = static_cast<float>((rp[order[i]] - mean) * scale);
    }
  });
  return out;
}

}  // namespace thinkless
