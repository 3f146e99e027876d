"""An independent, loop-by-loop transcription of the original Thinkless code, to check `reference.py` against.

Source: VainF/Thinkless, `verl/verl/trainer/ppo/core_algos.py` (`compute_grpo_outcome_advantage`,
`compute_policy_loss` with `thinkless_alpha`) and `verl.utils.torch_functional.masked_mean`. Plain Python floats,
one token at a time, so it shares no code path with the vectorised reference.

Two deliberate departures, both fixed by the project's spec: a group of one sample gets advantage 0 (the
original keeps its raw score), and the KL term is added to the loss here (the original adds it elsewhere).
"""

import math
from collections import defaultdict


def masked_mean(values, mask):
    # verl: (values * mask).sum() / (mask.sum() + 1e-8)
    total = sum(v for v, m in zip(values, mask, strict=True) if m)
    return total / (sum(mask) + 1e-8)


def group_advantages(rewards, group_ids, normalize_std, eps):
    by_group = defaultdict(list)
    for r, g in zip(rewards, group_ids, strict=True):
        by_group[g].append(r)
    out = []
    for r, g in zip(rewards, group_ids, strict=True):
        scores = by_group[g]
        if len(scores) == 1:
            out.append(0.0)
            continue
        mean = sum(scores) / len(scores)
        if normalize_std:
            std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1))  # torch.std: unbiased
            out.append((r - mean) / (std + eps))
        else:
            out.append(r - mean)
    return out


def policy_loss(logp, old_logp, advantages, eos_mask, cliprange, alpha, ref_logp=None, kl_coef=0.0):
    """Right-padded rows whose response starts at column 0, as in verl; `alpha=None` is vanilla GRPO."""
    token_loss, cond_mask, resp_mask, all_mask, kl = [], [], [], [], []
    for b, row in enumerate(logp):
        for t, lp in enumerate(row):
            ratio = math.exp(lp - old_logp[b][t])
            a = advantages[b]
            pg1 = -a * ratio
            pg2 = -a * min(max(ratio, 1.0 - cliprange), 1.0 + cliprange)
            token_loss.append(max(pg1, pg2))
            m = bool(eos_mask[b][t])
            all_mask.append(m)
            cond_mask.append(m and t == 0)  # cond_mask[:, 1:] = 0
            resp_mask.append(m and t > 0)  # resp_mask[:, 0] = 0
            if ref_logp is not None:
                d = ref_logp[b][t] - lp  # low_var_kl, k3
                kl.append(math.exp(d) - d - 1)
    if alpha is not None:
        loss = alpha * masked_mean(token_loss, cond_mask) + masked_mean(token_loss, resp_mask)
    else:
        loss = masked_mean(token_loss, all_mask)
    if ref_logp is not None:
        loss += kl_coef * masked_mean(kl, all_mask)
    return loss
