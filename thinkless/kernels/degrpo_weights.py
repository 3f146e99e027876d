"""The DeGRPO loss apart from any backend: its options, its normalisers, and the weights that turn per-token sums
into the loss.

The loss is a sum of per-token terms whose weights depend only on token counts (`Normalizers`), which the masks
give before any log-prob is known. The Triton kernels (`degrpo_triton.py`), the native ops (`_native.py`) and the
fused linear loss (`fused_linear.py`) all take their weights from here; `reference.degrpo_loss` gives the formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from thinkless.kernels import _checks, reference

KL_TYPES = ("k1", "k2", "k3")
LOSS_AGGS = reference.LOSS_AGGS


def _option(default, check, help_text: str):
    """An option of the loss: its default, the check of a value the user passes (name, value -> value), its help."""
    return field(default=default, metadata={"check": check, "help": help_text})


def _at_least_0(name: str, value) -> float:
    return _checks.number(name, value, low=0.0)


def _optional(check):
    return lambda name, value: None if value is None else check(name, value)


def _one_of(options: tuple[str, ...]):
    return lambda name, value: _checks.choice(name, value, options)


@dataclass(frozen=True)
class DeGRPOParams:
    """The options of the loss that are not tensors, declared here once: each one's default, check and meaning.

    The public losses (`degrpo_loss`, `fused_linear_degrpo_loss`) take them as keywords with these defaults
    (`LOSS_DEFAULTS`) and check them with `checked`; the trainer's `algo.*` settings of the same names start from
    them (`thinkless.train.config.AlgoConfig`) and reach the loss by name (`thinkless.train.policy_loss.loss_options`).
    The autograd.Functions take the checked options as this one object."""

    alpha: float = _option(1e-3, _at_least_0, "DeGRPO weight of the control-token loss (the paper: 1e-3)")
    clip_low: float = _option(0.2, _at_least_0, "PPO clip range: ratio >= 1 - clip_low")
    clip_high: float = _option(0.2, _at_least_0, "PPO clip range: ratio <= 1 + clip_high")
    kl_coef: float = _option(0.0, _at_least_0, "weight of the KL term to the reference (needs ref_logp when > 0)")
    kl_type: str = _option("k3", _one_of(KL_TYPES), "KL estimator: k1, k2 or k3")
    kl_clamp: float | None = _option(
        None, _optional(_at_least_0), "clamp each token's KL estimate to [-kl_clamp, kl_clamp] (low_var_kl: 10)"
    )
    decoupled: bool = _option(
        True, lambda name, value: bool(value), "DeGRPO; false gives vanilla GRPO (one token-mean, for comparisons)"
    )
    loss_agg: str = _option(
        "token_mean",
        _one_of(LOSS_AGGS),
        "aggregation of the response term: token_mean, seq_mean_token_mean (per-sequence 1/T_i) or "
        "seq_mean_token_sum_norm (Dr. GRPO: the sequences' sums / (sequences x loss_agg_norm))",
    )
    loss_agg_norm: float | None = _option(
        None, _optional(_checks.number), "seq_mean_token_sum_norm: the constant token count"
    )

    @property
    def kl_code(self) -> int:
        """kl_type as the kernels take it (a constexpr / an int argument): 1, 2, 3 for k1, k2, k3."""
        return KL_TYPES.index(self.kl_type) + 1

    @property
    def kl_bound(self) -> float:
        """kl_clamp as the kernels take it: inf when off."""
        return math.inf if self.kl_clamp is None else self.kl_clamp

    @classmethod
    def checked(cls, *, has_ref: bool, **options) -> DeGRPOParams:
        """The options, each checked by its own rule (a ValueError names it; an unknown option is a TypeError);
        kl_coef > 0 needs reference log-probs (`has_ref`), seq_mean_token_sum_norm a loss_agg_norm."""
        declared = _DECLARED  # (looked up once: this runs on every call of a loss)
        if not declared.keys() >= options.keys():
            raise TypeError(f"unknown DeGRPO option(s): {', '.join(sorted(options.keys() - declared.keys()))}")
        params = cls(**{name: check(name, options.get(name, default)) for name, (default, check) in declared.items()})
        if params.kl_coef > 0 and not has_ref:
            raise ValueError("ref_logp is required when kl_coef > 0 (the KL term compares against the reference)")
        if params.loss_agg == "seq_mean_token_sum_norm" and not (params.loss_agg_norm or 0) > 0:
            norm = options.get("loss_agg_norm")
            raise ValueError(f"loss_agg='seq_mean_token_sum_norm' needs loss_agg_norm > 0 (tokens), got {norm!r}")
        return params


LOSS_DEFAULTS = DeGRPOParams()  # the public functions' keyword defaults
_DECLARED = {f.name: (f.default, f.metadata["check"]) for f in fields(DeGRPOParams)}


@dataclass(frozen=True)
class Normalizers:
    """The counts that divide the loss's terms, taken over a whole mini-batch (on every rank) before it is cut into
    micro-batches: then the micro-batches' losses add up to the mini-batch's, whatever the cut.

    control_tokens: the control tokens (one per sequence with a response);
    response_tokens: all response tokens, control tokens included;
    sequences: the sequences with a response.
    """

    control_tokens: float
    response_tokens: float
    sequences: float

    @classmethod
    def count(cls, response_mask: Tensor, control_mask: Tensor | None = None) -> Normalizers:
        """The counts of a padded [B, T] batch (or a packed one with its control_mask)."""
        response_mask = response_mask.bool()
        control = reference.first_response_token_mask(response_mask) if control_mask is None else control_mask.bool()
        n_control = int((control & response_mask).sum())
        return cls(n_control, int(response_mask.sum()), n_control)

    def __add__(self, other: Normalizers) -> Normalizers:
        return Normalizers(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.control_tokens, self.response_tokens, self.sequences)


NORMALIZER_NAMES = ("control_tokens", "response_tokens", "sequences")


def check_normalizers(normalizers, device: torch.device) -> Tensor | None:
    """float64 [3] (control tokens, response tokens, sequences) from a `Normalizers`, a mapping or None."""
    if normalizers is None:
        return None
    names = NORMALIZER_NAMES
    try:
        values = [reference.normalizer(normalizers, name) for name in names]
    except (KeyError, AttributeError):
        raise ValueError(
            f"normalizers must be a Normalizers or a mapping with {', '.join(names)}; got {normalizers!r}"
        ) from None
    values = [float(v) if isinstance(v, Tensor) else v for v in values]
    counts = [_checks.number(f"normalizers.{name}", v, low=0.0) for name, v in zip(names, values, strict=True)]
    if counts[0] > counts[1]:
        raise ValueError(f"normalizers: control_tokens ({counts[0]:g}) cannot exceed response_tokens ({counts[1]:g})")
    return torch.tensor(counts, dtype=torch.float64, device=device)


def loss_from_totals(totals: Tensor, p: DeGRPOParams, counts: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Loss, the statistics in `reference.STAT_NAMES` order, and the backward weights, from the batch totals and
    the normalisers `counts` ([3]: control tokens, response tokens, sequences; None: this batch's own)."""
    control_sum, response_sum, n_control, n_rest, n_clipped, kl_sum, ratio_sum, w_control_sum, w_response_sum = (
        totals.unbind()
    )
    n_all = n_control + n_rest
    if counts is None:
        counts = torch.stack((n_control, n_all, n_control))  # one control token per sequence
    weights = loss_weights(*counts.to(totals.dtype).unbind(), p)
    w_control, w_control_weighted, w_response, w_kl = weights.unbind()
    loss = w_control * control_sum + w_control_weighted * w_control_sum + w_response * w_response_sum
    if p.kl_coef != 0.0:  # skipped when off, so an infinite estimate on a stray token cannot turn 0 * inf to NaN
        loss = loss + w_kl * kl_sum
    N_control, N_response, _ = (n.clamp(min=1) for n in counts.to(totals.dtype).unbind())
    N_rest = (counts[1] - counts[0]).to(totals.dtype).clamp(min=1)
    stats = torch.stack(
        (
            control_sum / N_control,
            response_sum / N_rest,
            n_clipped / N_response,
            kl_sum / N_response,
            ratio_sum / N_response,
            n_control,
            n_all,
        )
    )
    return loss, stats, weights


def function_outputs(ctx, loss: Tensor, stats: Tensor, logp_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """What the loss's autograd.Functions return: the loss and its stats in the log-probs' precision (fp32 at
    least), the stats marked as carrying no gradient."""
    out_dtype = torch.promote_types(logp_dtype, torch.float32)
    stats = stats.to(out_dtype)
    ctx.mark_non_differentiable(stats)
    return loss.to(out_dtype), stats


def loss_weights(n_control: Tensor, n_response: Tensor, n_sequences: Tensor, p: DeGRPOParams) -> Tensor:
    """[4]: dL/d(token loss) of a control token (plain, and times its token weight), of another response token
    (times its token weight), and dL/d(token KL), from the normalisers.

    The loss is a weighted sum of per-token terms whose weights depend only on counts, which the masks give before
    any log-prob is known; that is what lets the fused linear loss finish each chunk's gradient at once.
    Without token weights a token's weight is 1 (seq_mean_token_mean passes 1/T_i).
    """
    per_control, per_response = 1 / n_control.clamp(min=1), 1 / n_response.clamp(min=1)
    n_sequences = n_sequences.clamp(min=1)
    if p.loss_agg == "token_mean":
        divisor = (n_response - n_control).clamp(min=1) if p.decoupled else n_response.clamp(min=1)
    elif p.loss_agg == "seq_mean_token_mean":
        divisor = n_sequences
    else:  # seq_mean_token_sum_norm
        divisor = n_sequences * p.loss_agg_norm
    zero = torch.zeros_like(per_control)
    if p.decoupled:
        w_control, w_control_weighted = p.alpha * per_control, zero
    else:  # the control token is one response token among the others
        w_control, w_control_weighted = zero, 1 / divisor
    return torch.stack((w_control, w_control_weighted, 1 / divisor, p.kl_coef * per_response))


def sequence_token_weights(response_mask: Tensor, *, decoupled: bool = True, control_mask: Tensor | None = None):
    """seq_mean_token_mean's token weights of a padded [B, T] batch (one sequence per row): 1/T_i on the tokens of
    the response term of row i (decoupled: its response tokens after the control token), 0 elsewhere. Computed on
    the padded rows, then packed alongside the other per-token tensors, they carry each sequence's 1/T_i into a
    packed row."""
    response_mask = response_mask.bool()
    control = reference.first_response_token_mask(response_mask) if control_mask is None else control_mask.bool()
    term = response_mask & ~control if decoupled else response_mask
    return term.double() / term.sum(dim=1, keepdim=True).clamp(min=1)


def resolve_token_weights(p: DeGRPOParams, token_weights, response_mask, control) -> Tensor | None:
    """The given token weights (0 off the response term: a decoupled control token or padding may hold anything,
    NaN included, and must not reach a product), or seq_mean_token_mean's 1/T_i from the rows (one sequence per
    row); None: 1."""
    if token_weights is not None:
        term = response_mask & ~control if p.decoupled else response_mask
        return torch.where(term, token_weights, torch.zeros((), dtype=token_weights.dtype, device=term.device))
    if p.loss_agg != "seq_mean_token_mean":
        return None
    return sequence_token_weights(response_mask, decoupled=p.decoupled, control_mask=control)
