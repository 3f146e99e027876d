"""Warm-up distillation (SFT): teach the model both modes before RL lets it choose.

Every example is a prompt and a response that opens with its control token; the loss is the token-mean
cross-entropy on the response tokens (and the closing EOS), through `fused_linear_cross_entropy`, so a long
chain of thought never materialises its [tokens x vocab] logits.

    thinkless-train sft model.path=Qwen/Qwen2.5-1.5B-Instruct data.train_files=[hybrid.jsonl] \
        trainer.output_dir=runs/sft
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from thinkless.kernels import fused_linear_cross_entropy
from thinkless.train.data import DataError, Example, load_sft
from thinkless.train.model import hidden_states, lm_head, load_tokenizer
from thinkless.train.packing import micro_batches, pack
from thinkless.train.run import Run, batch_indices, resolve_model_path, start_run

if TYPE_CHECKING:
    from thinkless.train.config import AlgoConfig, Config


def encode(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[bool]]:
    """Token ids of prompt + response + EOS, and which of them the loss counts (the response and EOS)."""
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + response)[:max_length]
    return ids, ([False] * len(prompt) + [True] * len(response))[:max_length]


def pad_right(rows: list[list], value) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def sft_loss(
    model, tokenizer, encoded: list[tuple[list[int], list[bool]]], device, padding_free: bool = False
) -> tuple[torch.Tensor, dict]:
    """Token-mean cross-entropy of one micro-batch; each position predicts the next token (packed into one row
    with `padding_free`)."""
    ids = pad_right([e[0] for e in encoded], tokenizer.pad_token_id).to(device)
    counted = pad_right([e[1] for e in encoded], False).to(device)
    attention = pad_right([[1] * len(e[0]) for e in encoded], 0).to(device)
    if padding_free:
        p = pack(ids, attention, counted, list(range(len(encoded))))
        hidden = hidden_states(model, p.input_ids, None, p.position_ids)
        weight, bias = lm_head(model)  # after the forward: gathered there when sharded
        return fused_linear_cross_entropy(hidden, weight, p.target_ids, p.loss_mask, bias=bias)
    hidden = hidden_states(model, ids[:, :-1], attention[:, :-1])
    weight, bias = lm_head(model)
    return fused_linear_cross_entropy(hidden, weight, ids[:, 1:], counted[:, 1:], bias=bias)


def sft_micro_batches(batch: list, algo: AlgoConfig) -> list[list]:
    """The micro-batches of these encoded examples (`thinkless.train.packing.micro_batches`, lengths in tokens)."""
    rows = micro_batches(list(range(len(batch))), [len(ids) for ids, _ in batch], algo)
    return [[batch[i] for i in r] for r in rows]


def run_sft(config: Config) -> Run:
    # Data first: a bad row must stop the run before any model is loaded.
    tokenizer = load_tokenizer(resolve_model_path(config.model.path))
    examples = load_sft(config.data.train_files, tokenizer, config)
    encoded = [encode(tokenizer, e, config.data.max_length) for e in examples]
    trainable = [e for e in encoded if any(e[1][1:])]  # a prompt that fills max_length leaves nothing to learn
    if len(trainable) < len(encoded):
        print(f"thinkless: dropped {len(encoded) - len(trainable)} of {len(encoded)} SFT examples whose prompt fills "
              f"data.max_length={config.data.max_length}")  # fmt: skip
    if not trainable:
        raise DataError(f"no SFT example has a response token within data.max_length={config.data.max_length}")
    encoded = trainable
    run = start_run(config, "sft")
    run.ready()
    trainer, algo, d = config.trainer, config.algo, run.dist
    bar = tqdm(range(run.step + 1, trainer.total_steps + 1), initial=run.step, total=trainer.total_steps, desc="sft",
               disable=not d.is_main)  # fmt: skip
    with run.preemption:
        for step in bar:
            start = time.perf_counter()
            batch = [encoded[i] for i in batch_indices(len(encoded), trainer.batch_size, step, trainer.seed)]
            n_tokens = sum(sum(counted[1:]) for _, counted in batch)  # the whole batch's: every rank knows it
            mine = d.shard(batch)
            run.optimizer.zero_grad(set_to_none=True)
            loss_sum, entropy_sum = 0.0, 0.0
            for micro in d.aligned(sft_micro_batches(mine, algo)):
                loss, metrics = sft_loss(run.model, run.tokenizer, micro or batch[:1], run.device, algo.padding_free)
                # Token-mean over the whole batch; a None micro-batch only keeps FSDP's collectives in step.
                share = 0.0 if micro is None else metrics["tokens"].item() / max(n_tokens, 1)
                (loss * share * d.loss_scale).backward()
                loss_sum += loss.item() * share
                entropy_sum += metrics["entropy"].item() * share
            loss_sum, entropy_sum = d.sum(loss_sum), d.sum(entropy_sum)
            grad_norm, skipped = run.update(loss_sum, step)
            seconds = time.perf_counter() - start
            row = run.metrics.log(
                step,
                {
                    "loss": loss_sum,
                    "entropy": entropy_sum,
                    "grad_norm": grad_norm,
                    "skipped_updates": int(skipped),
                    "lr": run.optimizer.param_groups[0]["lr"],
                    "tokens": n_tokens,
                    "tokens_per_s": n_tokens / seconds,
                    "step_seconds": seconds,
                },
            )
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if run.end_step(step):
                break
    run.metrics.close()
    return run
