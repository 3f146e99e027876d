// The DeGRPO token loss on [B, T] log-probs: forward (nine batch totals) and backward (dL/dlogp).
//
// Memory-bound like its Triton twin, so the per-token arithmetic is plain double: it costs nothing here and keeps
// k3 = exp(-d) + d - 1 exact at the small log-ratios of real training. Rows are independent; each row's sums are
// kept apart and added in row order at the end, so the totals do not depend on the thread count.
#include <ATen/Parallel.h>

#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace thinkless {
namespace {

// control loss, response loss, control count, response count, clipped, kl, ratio, and the two losses again with
// each token's weight (equal to the first two without token weights)
constexpr int kNumStats = 9;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// max / clamp that propagate NaN, as torch.maximum and torch.clamp do.
inline double nan_max(double a, double b) { return (std::isnan(a) || std::isnan(b)) ? kNaN : (a > b ? a : b); }
inline double nan_clamp(double x, double lo, double hi) { return std::isnan(x) ? kNaN : (x < lo ? lo : (x > hi ? hi : x)); }

struct Inputs {
  int64_t B, T;
  at::ScalarType dtype;
  at::Tensor logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights;
  bool has_ref, has_control, adv_per_token, has_weights;
};

Inputs check_inputs(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                    const at::Tensor& response_mask, const c10::optional<at::Tensor>& ref_logp,
                    const c10::optional<at::Tensor>& control_mask,
                    const c10::optional<at::Tensor>& token_weights) {
  check_cpu(logp, "logp");
  check_rows(logp, "logp");
  check_dtype(logp, "logp", {at::kFloat, at::kDouble});
  Inputs in{logp.size(0),       logp.size(1),        logp.scalar_type(),       logp,
            old_logp,           advantages,          response_mask,            at::Tensor(),
            at::Tensor(),       at::Tensor(),        ref_logp.has_value(),     control_mask.has_value(),
            advantages.dim() == 2, token_weights.has_value()};
  const char* float_name = logp.scalar_type() == at::kFloat ? "float32 (the dtype of logp)" : "float64 (the dtype of logp)";
  auto check_like = [&](const at::Tensor& t, const char* name) {
    check_cpu(t, name);
    check_rows(t, name);
    check_shape(t, name, logp.sizes(), "logp");
    TORCH_CHECK_VALUE(t.scalar_type() == logp.scalar_type(), "thinkless._C: ", name, " must be ", float_name,
                      ", got ", t.scalar_type());
  };
  check_like(old_logp, "old_logp");
  if (in.adv_per_token) {
    check_like(advantages, "advantages");
  } else {
    check_cpu(advantages, "advantages");
    TORCH_CHECK_VALUE(advantages.dim() == 1 && advantages.size(0) == in.B, "thinkless._C: advantages must be [B]=[",
                      in.B, "] or [B, T], got shape ", advantages.sizes());
    TORCH_CHECK_VALUE(advantages.scalar_type() == logp.scalar_type(), "thinkless._C: advantages must be ", float_name);
    in.advantages = advantages.contiguous();
  }
  auto check_mask = [&](const at::Tensor& t, const char* name) {
    check_cpu(t, name);
    check_rows(t, name);
    check_shape(t, name, logp.sizes(), "logp");
    check_dtype(t, name, {at::kBool, at::kByte});
  };
  check_mask(response_mask, "response_mask");
  if (in.has_ref) {
    check_like(*ref_logp, "ref_logp");
    in.ref_logp = *ref_logp;
  }
  if (in.has_control) {
    check_mask(*control_mask, "control_mask");
    in.control_mask = *control_mask;
  }
  if (in.has_weights) {
    check_like(*token_weights, "token_weights");
    in.token_weights = *token_weights;
  }
  return in;
}

// The per-token PPO terms shared by forward and backward.
struct Token {
  bool resp, ctrl;
  double logp, adv, ratio, unclipped, clipped, weight;  // weight: the token weight, 1 without token_weights
};

template <typename scalar_t>
struct Rows {
  const Inputs& in;
  double clip_low, clip_high;

  const uint8_t* mask_row(const at::Tensor& m, int64_t b) const {
    return reinterpret_cast<const uint8_t*>(m.data_ptr()) + b * m.stride(0);
  }
  const scalar_t* row(const at::Tensor& t, int64_t b) const { return t.data_ptr<scalar_t>() + b * t.stride(0); }

  // Index of the row's first response token (its control token), T if none.
  int64_t first_response(const uint8_t* resp) const {
    for (int64_t t = 0; t < in.T; ++t)
      if (resp[t]) return t;
    return in.T;
  }

  template <typename F>
  void for_each_token(int64_t b, F&& f) const {
    const uint8_t* resp = mask_row(in.response_mask, b);
    const uint8_t* ctrl = in.has_control ? mask_row(in.control_mask, b) : nullptr;
    const int64_t first = in.has_control ? -1 : first_response(resp);
    const scalar_t* lp = row(in.logp, b);
    const scalar_t* old = row(in.old_logp, b);
    const scalar_t* adv = in.adv_per_token ? row(in.advantages, b) : nullptr;
    const double adv_row = in.adv_per_token ? 0.0 : static_cast<double>(in.advantages.data_ptr<scalar_t>()[b]);
    const scalar_t* tw = in.has_weights ? row(in.token_weights, b) : nullptr;
    for (int64_t t = 0; t < in.T; ++t) {
      if (!resp[t]) continue;  // padding may hold -inf: never read into any arithmetic
      Token k;
      k.resp = true;
      k.ctrl = in.has_control ? ctrl[t] != 0 : t == first;
      k.logp = static_cast<double>(lp[t]);
      k.adv = adv ? static_cast<double>(adv[t]) : adv_row;
      k.ratio = std::exp(k.logp - static_cast<double>(old[t]));
      k.unclipped = -k.adv * k.ratio;
      k.clipped = -k.adv * nan_clamp(k.ratio, 1.0 - clip_low, 1.0 + clip_high);
      k.weight = tw ? static_cast<double>(tw[t]) : 1.0;
      f(t, k);
    }
  }
};

// k(d) and dk/dlogp for d = logp - ref: k1 = d, k2 = d^2/2, k3 = exp(-d) + d - 1; k clamped to [-c, c] with a zero
// gradient outside (torch.clamp; c = inf when off). NaN compares false and stays NaN.
inline std::array<double, 2> kl_terms(double d, int64_t kl_type, double c) {
  std::array<double, 2> k;
  if (kl_type == 1) {
    k = {d, 1.0};
  } else if (kl_type == 2) {
    k = {0.5 * d * d, d};
  } else {
    k = {std::exp(-d) + d - 1.0, -std::expm1(-d)};
  }
  if (k[0] > c) return {c, 0.0};
  if (k[0] < -c) return {-c, 0.0};
  return k;
}

}  // namespace

at::Tensor degrpo_forward(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                          const at::Tensor& response_mask, const c10::optional<at::Tensor>& ref_logp,
                          const c10::optional<at::Tensor>& control_mask,
                          const c10::optional<at::Tensor>& token_weights, double clip_low, double clip_high,
                          int64_t kl_type, double kl_clamp) {
  const Inputs in = check_inputs(logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights);
  TORCH_CHECK_VALUE(kl_type >= 1 && kl_type <= 3, "thinkless._C: kl_type must be 1, 2 or 3 (k1, k2, k3), got ", kl_type);
  std::vector<double> per_row(in.B * kNumStats, 0.0);
  AT_DISPATCH_FLOATING_TYPES(in.dtype, "degrpo_forward", [&] {
    const Rows<scalar_t> rows{in, clip_low, clip_high};
    at::parallel_for(0, in.B, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double* s = per_row.data() + b * kNumStats;
        const scalar_t* ref = in.has_ref ? rows.row(in.ref_logp, b) : nullptr;
        rows.for_each_token(b, [&](int64_t t, const Token& k) {
          const double loss = nan_max(k.unclipped, k.clipped);
          s[k.ctrl ? 0 : 1] += loss;
          s[k.ctrl ? 2 : 3] += 1.0;
          s[4] += k.clipped > k.unclipped ? 1.0 : 0.0;
          if (ref) s[5] += kl_terms(k.logp - static_cast<double>(ref[t]), kl_type, kl_clamp)[0];
          s[6] += k.ratio;
          s[k.ctrl ? 7 : 8] += k.weight * loss;
        });
      }
    });
  });
  auto totals = at::zeros({kNumStats}, logp.options().dtype(at::kDouble));
  double* out = totals.data_ptr<double>();
  for (int64_t b = 0; b < in.B; ++b)
    for (int i = 0; i < kNumStats; ++i) out[i] += per_row[b * kNumStats + i];
  return totals;
}

at::Tensor degrpo_backward(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                           const at::Tensor& response_mask, const c10::optional<at::Tensor>& ref_logp,
                           const c10::optional<at::Tensor>& control_mask,
                           const c10::optional<at::Tensor>& token_weights, const at::Tensor& weights,
                           double clip_low, double clip_high, int64_t kl_type, double kl_clamp, bool has_kl) {
  const Inputs in = check_inputs(logp, old_logp, advantages, response_mask, ref_logp, control_mask, token_weights);
  check_cpu(weights, "weights");
  TORCH_CHECK_VALUE(weights.numel() == 4,
                    "thinkless._C: weights must hold 4 numbers (control, weighted control, response, kl), got ",
                    weights.numel());
  TORCH_CHECK_VALUE(!has_kl || in.has_ref, "thinkless._C: has_kl needs ref_logp");
  const auto w = weights.to(at::kDouble).contiguous();
  const double* wp = w.data_ptr<double>();
  const double w_control = wp[0], w_control_weighted = wp[1], w_response = wp[2], w_kl = wp[3];
  auto dlogp = at::zeros({in.B, in.T}, logp.options());
  AT_DISPATCH_FLOATING_TYPES(in.dtype, "degrpo_backward", [&] {
    const Rows<scalar_t> rows{in, clip_low, clip_high};
    at::parallel_for(0, in.B, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t* out = dlogp.data_ptr<scalar_t>() + b * in.T;
        const scalar_t* ref = has_kl ? rows.row(in.ref_logp, b) : nullptr;
        rows.for_each_token(b, [&](int64_t t, const Token& k) {
          // A strictly larger clipped branch is constant in logp; ties go to the unclipped side (torch.maximum
          // splits them, and both halves equal -A * ratio there).
          const double dtoken = k.clipped > k.unclipped ? 0.0 : -k.adv * k.ratio;
          double g = (k.ctrl ? w_control + w_control_weighted * k.weight : w_response * k.weight) * dtoken;
          if (ref) g += w_kl * kl_terms(k.logp - static_cast<double>(ref[t]), kl_type, kl_clamp)[1];
          out[t] = static_cast<scalar_t>(g);
        });
      }
    });
  });
  return dlogp;
}

}  // namespace thinkless
