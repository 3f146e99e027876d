"""Padding-free micro-batches: the sequences of a micro-batch packed into one row, positions restarting at 0.

A padded micro-batch of short `<short>` answers and long `<think>` ones spends most of its compute on padding.
Packed, every token is real: the rows are concatenated into [1, total], `position_ids` restart for each sequence,
and the attention mask is left out, so that `transformers` builds a block-diagonal causal mask from the positions
(SDPA, eager) or calls flash-attn's varlen kernel (flash_attention_2). The loss sees the same tokens with the same
targets, masks, advantages and log-probs; each sequence's first response token is its control token.

    packs = token_budget_batches(lengths, rows, max_tokens)       # dynamic micro-batches by a token budget
    p = pack(input_ids, attention_mask, response_mask, rows)      # [1, total] inputs, targets, masks, positions
    old = p.gather(old_logp)                                      # any [S, L-1] per-token tensor, packed alike
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from thinkless.train.config import AlgoConfig


@dataclass
class Packed:
    input_ids: torch.Tensor  # [1, N] the real tokens of the sequences, one after the other (each but its last)
    position_ids: torch.Tensor  # [1, N] 0, 1, ... restarting at each sequence
    target_ids: torch.Tensor  # [1, N] the next token within the same sequence
    loss_mask: torch.Tensor  # bool [1, N] targets that are response tokens
    control_mask: torch.Tensor  # bool [1, N] each sequence's first response target (its control token)
    rows: torch.Tensor  # int64 [N] the padded row of each packed token
    cols: torch.Tensor  # int64 [N] its column in the shifted ([S, L-1]) layout
    sequence: torch.Tensor  # int64 [N] which of the packed sequences (0..len(rows)-1) it belongs to

    def gather(self, per_token: torch.Tensor) -> torch.Tensor:
        """A padded, shifted [S, L-1] tensor (old or reference log-probs) in the packed layout, [1, N]."""
        return per_token[self.rows, self.cols].unsqueeze(0)

    def per_sequence(self, values: torch.Tensor) -> torch.Tensor:
        """A per-sequence [len(rows)] tensor (advantages) spread over its tokens, [1, N]."""
        return values[self.sequence].unsqueeze(0)

    def scatter(self, packed: torch.Tensor, shape: tuple[int, int], fill: float = 0.0) -> torch.Tensor:
        """The inverse of `gather`: a [1, N] tensor back in the padded, shifted [S, L-1] layout."""
        out = torch.full(shape, fill, dtype=packed.dtype, device=packed.device)
        out[self.rows, self.cols] = packed.reshape(-1)
        return out


def pack(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor | None, rows: list[int]
) -> Packed:
    """Pack rows of a padded batch (`input_ids` [S, L], any padding side) into one row of real tokens.

    Position t of a row is kept as an input when both it and t + 1 are real tokens, so that its target (t + 1) is
    in the same sequence; `response_mask` [S, L] marks the targets that count (None: every kept target counts).
    """
    device = input_ids.device
    idx = torch.as_tensor(rows, dtype=torch.long, device=device)
    real = attention_mask[idx].bool()
    keep = real[:, :-1] & real[:, 1:]  # [R, L-1]: an input whose target is a real token of the same sequence
    r, c = keep.nonzero(as_tuple=True)  # row-major: each sequence's tokens in order, sequences one after another
    positions = (real.long().cumsum(1) - 1)[:, :-1]
    counted = response_mask[idx][:, 1:].bool() if response_mask is not None else keep
    loss_mask = counted[r, c] & keep[r, c]
    # The control token is each sequence's first counted target.
    first = torch.zeros_like(loss_mask)
    seq_of_first = torch.full((len(rows),), -1, dtype=torch.long, device=device)
    hit = loss_mask.nonzero(as_tuple=True)[0]
    if hit.numel():
        seq_hits = r[hit]
        is_first = torch.ones_like(seq_hits, dtype=torch.bool)
        is_first[1:] = seq_hits[1:] != seq_hits[:-1]
        first[hit[is_first]] = True
        seq_of_first[seq_hits[is_first]] = hit[is_first]
    return Packed(
        input_ids=input_ids[idx][r, c].unsqueeze(0),
        position_ids=positions[r, c].unsqueeze(0),
        target_ids=input_ids[idx][:, 1:][r, c].unsqueeze(0),
        loss_mask=loss_mask.unsqueeze(0),
        control_mask=first.unsqueeze(0),
        rows=idx[r],
        cols=c,
        sequence=r,
    )


def token_budget_batches(lengths: list[int], rows: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive micro-batches of `rows` whose token counts (`lengths[row]`) sum to at most `max_tokens` (a
    sequence longer than the budget gets a micro-batch of its own). Order is kept, so results do not depend on it."""
    out, current, used = [], [], 0
    for row in rows:
        n = int(lengths[row])
        if current and used + n > max_tokens:
            out.append(current)
            current, used = [], 0
        current.append(row)
        used += n
    if current:
        out.append(current)
    return out


def micro_batches(rows: list[int], lengths, algo: AlgoConfig) -> list[list[int]]:
    """The micro-batches of `rows`: `algo.micro_batch_size` each, or with `padding_free` and `micro_batch_tokens`,
    as many as fit that many tokens (`lengths[row]`; dynamic micro-batches: short answers take fewer passes)."""
    if algo.padding_free and algo.micro_batch_tokens > 0:
        return token_budget_batches(lengths, rows, algo.micro_batch_tokens)
    size = max(1, algo.micro_batch_size)
    return [rows[i : i + size] for i in range(0, len(rows), size)]
