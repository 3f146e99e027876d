// The native CPU ops of thinkless, registered as torch custom ops in ops.cpp (namespace `thinkless`).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace thinkless {

at::Tensor group_advantages(const at::Tensor& rewards, const at::Tensor& group_ids, bool normalize_std, double eps);

at::Tensor degrpo_forward(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                          const at::Tensor& response_mask, const c10::optional<at::Tensor>& ref_logp,
                          const c10::optional<at::Tensor>& control_mask,
                          const c10::optional<at::Tensor>& token_weights, double clip_low, double clip_high,
                          int64_t kl_type, double kl_clamp);

at::Tensor degrpo_backward(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                           const at::Tensor& response_mask, const c10::optional<at::Tensor>& ref_logp,
                           const c10::optional<at::Tensor>& control_mask,
                           const c10::optional<at::Tensor>& token_weights, const at::Tensor& weights,
                           double clip_low, double clip_high, int64_t kl_type, double kl_clamp, bool has_kl);

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_stats(const at::Tensor& logits, const at::Tensor& targets,
                                                         double inv_temp, bool want_entropy);

void row_grad_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& grad,
               double inv_temp, const c10::optional<at::Tensor>& entropy,
               const c10::optional<at::Tensor>& entropy_grad);

}  // namespace thinkless
