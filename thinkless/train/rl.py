"""RL with DeGRPO: sample, reward, group-relative advantages, then the decoupled PPO loss on the policy.

One step: `trainer.batch_size` prompts -> `rollout.n` samples each (HF generate, compiled or not, or vLLM) ->
rewards from the mode and the \\boxed{} answer -> `group_advantages` by prompt -> old-policy (unless on-policy,
see `on_policy`) and reference log-probs by `token_logprobs` -> `algo.ppo_epochs` passes of
`fused_linear_degrpo_loss` over mini-batches of prompts, micro-batches of sequences.

Unlike vanilla GRPO, the control token's loss is normalised on its own and weighted by `algo.alpha`, so the
thousands of tokens of a long answer no longer drown the one token that picks the mode (Fang et al., 2025).
The counts that normalise each term (control tokens, response tokens, sequences) are taken over the whole
mini-batch before it is cut into micro-batches (`Normalizers`), so the micro-batches' losses add up to the
mini-batch's loss: `algo.micro_batch_size`, `padding_free` and the number of ranks cannot change the update.

    thinkless-train rl model.path=runs/sft data.train_files=[deepscaler.json] rollout.n=8 trainer.output_dir=runs/rl
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from thinkless.kernels import (
    Normalizers,
    fused_linear_degrpo_loss,
    group_advantages,
    sequence_token_weights,
    token_logprobs,
)
from thinkless.train import packing
from thinkless.train.config import ConfigError
from thinkless.train.data import DataError, load_problems
from thinkless.train.dist import Dist, shard_model
from thinkless.train.eval import validate, validation_examples
from thinkless.train.model import ModelError, check_model_path, hidden_states, lm_head, load_model, load_tokenizer
from thinkless.train.packing import pack
from thinkless.train.rewards import score
from thinkless.train.rollout import Rollouts, generate, merge_rollouts
from thinkless.train.run import Run, batch_indices, resolve_model_path, start_run


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work: CUDA runs ahead of Python, and a phase's time must hold its
    kernels, not the next phase's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _peak_memory(device: torch.device) -> dict:
    """The step's peak of allocated GPU memory (the caching allocator's view; reset at each step's start)."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def micro_batches(ro: Rollouts, rows: list[int], algo) -> list[list[int]]:
    """The micro-batches of these rollout rows (`thinkless.train.packing.micro_batches`, lengths in tokens)."""
    return packing.micro_batches(rows, ro.attention_mask.sum(1).tolist(), algo)


@torch.no_grad()
def sequence_logprobs(model, ro: Rollouts, temperature: float, algo, rows=None, d: Dist | None = None):
    """[S, L-1] log-probs of every next token under `model`, chunked, without autograd (old policy, reference).
    Only `rows` (default: all) are filled; with a sharded model pass `d`, and every rank runs as many passes."""
    was_training = model.training
    if was_training:  # (eval() walks every module: worth skipping for a reference, which never trains)
        model.eval()  # no dropout: the old policy's log-probs are a constant of the step
    S, L = ro.input_ids.shape
    out = torch.zeros(S, L - 1, dtype=torch.float32, device=ro.input_ids.device)
    rows = list(range(S)) if rows is None else rows
    batches = micro_batches(ro, rows, algo)
    for idx in d.aligned(batches) if d is not None else batches:
        if idx is None:  # a pass that only keeps this rank's collectives in step with the others
            hidden_states(model, ro.input_ids[:1, :-1], ro.attention_mask[:1, :-1])
            continue
        if algo.padding_free:
            p = pack(ro.input_ids, ro.attention_mask, None, idx)
            hidden = hidden_states(model, p.input_ids, None, p.position_ids)
            weight, bias = lm_head(model)  # after the forward: gathered there when sharded
            logp = token_logprobs(hidden, weight, p.target_ids, bias=bias, temperature=temperature)
            out[p.rows, p.cols] = logp.reshape(-1).float()
        else:
            ids, attention = ro.input_ids[idx], ro.attention_mask[idx]
            hidden = hidden_states(model, ids[:, :-1], attention[:, :-1])
            weight, bias = lm_head(model)
            out[idx] = token_logprobs(hidden, weight, ids[:, 1:], bias=bias, temperature=temperature).float()
    if was_training:
        model.train()
    return out


def all_logprobs(model, ro: Rollouts, temperature: float, algo, d: Dist, sharded: bool) -> torch.Tensor:
    """[S, L-1] log-probs, each rank computing its contiguous share of the rows, then gathered."""
    if d.world == 1:
        return sequence_logprobs(model, ro, temperature, algo)
    rows = d.shard(list(range(ro.input_ids.shape[0])))
    part = sequence_logprobs(model, ro, temperature, algo, rows, d if sharded else None)
    return torch.cat([p.to(ro.input_ids.device) for p in d.gather(part[rows].cpu())])


def _to_cpu(ro: Rollouts) -> Rollouts:
    moved = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in vars(ro).items()}
    return Rollouts(**moved)


def loss_options(config) -> dict:
    """The options of `fused_linear_degrpo_loss` that come from the settings."""
    algo = config.algo
    return dict(
        temperature=config.rollout.temperature, alpha=algo.alpha, clip_low=algo.clip_low, clip_high=algo.clip_high,
        kl_coef=algo.kl_coef, kl_type=algo.kl_type, kl_clamp=algo.kl_clamp or None, decoupled=algo.decoupled,
        loss_agg=algo.loss_agg, loss_agg_norm=float(algo.loss_agg_norm or config.rollout.max_new_tokens),
        entropy_coef=algo.entropy_coef,
    )  # fmt: skip


def mini_batch_normalizers(ro: Rollouts, rows: list[int]) -> Normalizers:
    """The loss's counts over a whole mini-batch, before it is cut into micro-batches (or shared among ranks).
    Every rank holds the gathered rollouts, so each counts the same without a collective."""
    return Normalizers.count(ro.response_mask[rows, 1:])


def policy_loss(
    model, ro: Rollouts, idx: list[int], old_logp, ref_logp, advantages, config, normalizers=None, logp_out=None
):
    """The DeGRPO loss and metrics of one micro-batch of sequences, padded or packed (`algo.padding_free`), with
    the mini-batch's `normalizers` (default: the micro-batch's own counts). `old_logp` None: on-policy (the old
    log-probs are those of this forward, detached). `logp_out` [S, L-1]: receives this forward's log-probs."""
    algo = config.algo
    options = loss_options(config)
    if algo.padding_free:
        p = pack(ro.input_ids, ro.attention_mask, ro.response_mask, idx)
        hidden = hidden_states(model, p.input_ids, None, p.position_ids)
        weight, bias = lm_head(model)  # after the forward: gathered there when sharded
        # A packed row holds several sequences: their 1/T_i come from the padded rows.
        token_weights = None
        if algo.loss_agg == "seq_mean_token_mean":
            token_weights = p.gather(sequence_token_weights(ro.response_mask[:, 1:], decoupled=algo.decoupled))
        packed = lambda x: p.gather(x) if x is not None else None  # noqa: E731
        loss, metrics = fused_linear_degrpo_loss(
            hidden, weight, p.target_ids, packed(old_logp), _packed_advantages(p, advantages, idx), p.loss_mask,
            bias=bias, ref_logp=packed(ref_logp), control_mask=p.control_mask, normalizers=normalizers,
            token_weights=token_weights, **options,
        )  # fmt: skip
        if logp_out is not None:
            logp_out[p.rows, p.cols] = metrics["logp"].detach().reshape(-1).float()
        return loss, metrics
    hidden = hidden_states(model, ro.input_ids[idx, :-1], ro.attention_mask[idx, :-1])
    weight, bias = lm_head(model)
    loss, metrics = fused_linear_degrpo_loss(
        hidden, weight, ro.input_ids[idx, 1:], old_logp[idx] if old_logp is not None else None, advantages[idx],
        ro.response_mask[idx, 1:], bias=bias, ref_logp=ref_logp[idx] if ref_logp is not None else None,
        normalizers=normalizers, **options,
    )  # fmt: skip
    if logp_out is not None:
        logp_out[idx] = metrics["logp"].detach().float()
    return loss, metrics


def on_policy(config, model) -> bool:
    """Whether the step's samples are on-policy when the loss sees them: one update per step (one PPO epoch over one
    mini-batch), no importance correction (it needs the old log-probs first) and no dropout (the training forward
    must be the old policy's). Then the old log-probs are the training forward's own, detached: the ratio is exactly
    1 and no separate pass runs (as TRL and verl do). Otherwise they come from a pass of their own."""
    algo = config.algo
    one_update = algo.ppo_epochs == 1 and (
        algo.mini_batch_size == 0 or algo.mini_batch_size >= config.trainer.batch_size
    )
    return one_update and not algo.is_correction and not has_dropout(model)


def has_dropout(model) -> bool:
    """A dropout layer or a config rate above 0: a training forward that is not the old policy's."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    # Dropout rates that models apply functionally, and MoE routers' training-time jitter.
    rates = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
             "activation_dropout", "layerdrop", "hidden_dropout_prob", "attention_probs_dropout_prob",
             "residual_dropout", "embedding_dropout", "router_jitter_noise", "input_jitter_noise")  # fmt: skip
    return any(float(getattr(config, name, 0) or 0) > 0 for name in rates)


def _packed_advantages(p, advantages: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """Per-sequence [S] or per-token [S, L-1] advantages (importance-weighted) in the packed layout."""
    return p.gather(advantages) if advantages.dim() == 2 else p.per_sequence(advantages[idx])


def importance_weights(old_logp, rollout_logp, response: torch.Tensor, cap: float) -> tuple[torch.Tensor, dict]:
    """Truncated importance sampling (TIS): w = min(exp(old - rollout log-prob), cap) per token, 1 off the responses.

    The rollout engine samples from its own numerics (vLLM's kernels, a bf16 KV cache); the PPO ratio is taken
    against the trainer's old log-probs. w re-weights each token towards the distribution the loss assumes, and the
    cap bounds the variance. As w > 0 multiplies the clipped PPO term of its token, it is folded into a per-token
    advantage: max(-wA r, -wA clip(r)) = w max(-A r, -A clip(r)). The KL term is not weighted.

    With rollout.top_p < 1 the engine's log-probs are those of the renormalised nucleus while the trainer's are the
    full softmax at the temperature: w then also carries the nucleus mass (<= 1), as in verl and TRL."""
    log_ratio = (old_logp - rollout_logp).double()
    ratio = log_ratio.exp()
    weights = torch.where(response, ratio.clamp(max=cap), torch.ones_like(ratio)).to(old_logp.dtype)
    n = response.sum().clamp(min=1)
    stats = {
        "is_weight_mean": float((weights.double() * response).sum() / n),  # the weights applied, truncated
        "is_truncated_frac": float(((ratio > cap) & response).sum() / n),
    }
    return weights, stats


def tag_metrics(ro: Rollouts, scores, tags: list[str]) -> dict:
    """think_ratio, acc and response_tokens of each tag's samples (`data.tag_key`), as `think_ratio/<tag>`."""
    out = {}
    sample_tags = [tags[p] for p in ro.prompt_index.tolist()]
    for tag in sorted(set(sample_tags)):
        rows = [i for i, t in enumerate(sample_tags) if t == tag]
        out[f"think_ratio/{tag}"] = sum(ro.modes[i] == "think" for i in rows) / len(rows)
        out[f"acc/{tag}"] = sum(scores[i].correct for i in rows) / len(rows)
        out[f"response_tokens/{tag}"] = sum(int(ro.lengths[i]) for i in rows) / len(rows)
    return out


def rollout_metrics(ro: Rollouts, scores, rewards: torch.Tensor) -> dict:
    modes = ro.modes
    lengths = ro.lengths.float().cpu()
    correct = torch.tensor([s.correct for s in scores])
    short = torch.tensor([m == "short" for m in modes])
    think = torch.tensor([m == "think" for m in modes])
    groups = ro.prompt_index.cpu()
    members = [groups == g for g in groups.unique()]
    per_group = [correct[m] for m in members]
    mean = lambda x, m: x[m].float().mean().item() if m.any() else 0.0  # noqa: E731
    return {
        "samples": len(scores),
        "reward_mean": rewards.mean().item(),
        "think_ratio": think.float().mean().item(),
        "acc": correct.float().mean().item(),
        "acc_short": mean(correct, short),
        "acc_think": mean(correct, think),
        "format_errors": int(sum(m is None for m in modes)),
        "response_tokens_mean": lengths.mean().item(),
        "response_tokens_short": mean(lengths, short),
        "response_tokens_think": mean(lengths, think),
        "groups_all_correct": int(sum(bool(c.all()) for c in per_group)),
        "groups_all_wrong": int(sum(not bool(c.any()) for c in per_group)),
        # The authors' batch/all_correct_think and all_correct_short (ray_trainer.py): groups whose every sample is
        # right in one mode; early RL is mostly the first, a policy that learned to route turns them into the second.
        "groups_all_correct_think": int(sum(bool((correct[m] & think[m]).all()) for m in members)),
        "groups_all_correct_short": int(sum(bool((correct[m] & short[m]).all()) for m in members)),
        "groups_mixed_modes": int(sum(bool(think[m].any() and short[m].any()) for m in members)),
    }


def algo_needs_reference(config) -> bool:
    return config.algo.kl_coef > 0  # the frozen reference is loaded only when the KL term is on


def fitting_prompts(examples: list, tokenizer, config) -> list:
    """The examples whose prompt fits `data.max_prompt_tokens`; the others are dropped, with a count."""
    limit = config.data.max_prompt_tokens
    kept = [e for e in examples if len(tokenizer(e.prompt, add_special_tokens=False)["input_ids"]) <= limit]
    if len(kept) < len(examples):
        print(f"thinkless: dropped {len(examples) - len(kept)} of {len(examples)} prompts longer than {limit} tokens")
    if not kept:
        raise DataError(f"no training prompt fits data.max_prompt_tokens={limit} (files: {config.data.train_files})")
    return kept


LOSS_METRICS = ("loss", "control_loss", "response_loss", "clip_frac", "kl", "entropy")


def mini_batch_backward(
    model, ro: Rollouts, rows: list[int], old_logp, ref_logp, advantages, config, d: Dist, logp_out=None
):
    """Forward and backward of one mini-batch (rollout `rows`): this rank's share of it, cut into micro-batches,
    adds its gradient to `model`'s .grad. Returns this rank's sums of the LOSS_METRICS; over ranks they add up to
    the mini-batch's values. `old_logp` None: on-policy; `logp_out`: as in `policy_loss`.

    Every micro-batch is normalised by the mini-batch's counts, so its loss is its exact share of the mini-batch
    loss, and the sum does not depend on how the rows were cut (micro_batch_size, token budget, padding_free,
    ranks)."""
    normalizers = mini_batch_normalizers(ro, rows)
    sums = dict.fromkeys(LOSS_METRICS, 0.0)
    for idx in d.aligned(micro_batches(ro, d.shard(rows), config.algo)):
        dummy = idx is None  # a pass that keeps FSDP's collectives in step: zero weight
        loss, metrics = policy_loss(
            model, ro, idx or rows[:1], old_logp, ref_logp, advantages, config, normalizers, None if dummy else logp_out
        )
        share = 0.0 if dummy else 1.0
        # FSDP averages the ranks' gradients; loss_scale (= world) makes that average the sum.
        (loss * share * d.loss_scale).backward()
        metrics["loss"] = loss.detach()
        for key in LOSS_METRICS:
            sums[key] += metrics[key].item() * share
    return sums


def _validation(run: Run, config, step: int, examples: dict, engine) -> dict:
    """`trainer.val_files` scored with the policy after `step` updates (eval/step-<step>/), and its time."""
    start = time.perf_counter()
    metrics = validate(run, config, step, examples=examples, engine=engine)
    return {**metrics, "val_seconds": time.perf_counter() - start}


def run_rl(config) -> Run:
    # Data first: a bad row must stop the run before any model is loaded.
    tokenizer = load_tokenizer(resolve_model_path(config.model.path))
    examples = fitting_prompts(load_problems(config.data.train_files, tokenizer, config), tokenizer, config)
    val_examples = validation_examples(config, tokenizer) if config.trainer.val_every else {}
    ref_path = resolve_model_path(config.model.ref_path or config.model.path) if algo_needs_reference(config) else None
    if ref_path is not None:
        check_model_path(ref_path, "model.ref_path")
        ref_vocab = load_tokenizer(ref_path).get_vocab()
        if ref_vocab != tokenizer.get_vocab():  # the KL term compares the two models' log-probs of the same ids
            raise ModelError(f"model.ref_path={ref_path!r} has another vocabulary ({len(ref_vocab)} tokens) than "
                             f"model.path ({len(tokenizer)}): the reference must share its tokens")  # fmt: skip
    run = start_run(config, "rl")
    trainer, rollout, d = config.trainer, config.rollout, run.dist
    if trainer.batch_size < d.world:
        raise ConfigError(f"trainer.batch_size={trainer.batch_size} gives some of the {d.world} ranks no prompt")
    reference = None
    if ref_path is not None:
        reference = load_model(ref_path, run.tokenizer, config, run.device, trainable=False, what="model.ref_path")
        reference = shard_model(reference, d)
    engine = None
    if rollout.engine == "vllm":
        from thinkless.train.vllm_rollout import VLLMRollout

        engine = VLLMRollout(str(run.resumed_from or resolve_model_path(config.model.path)), run)
    try:
        with run.preemption:
            _train(run, config, examples, val_examples, reference, engine)
    except BaseException:
        if engine is not None:
            try:
                engine.close()
            except Exception as err:  # the training error is the one to see
                print(f"thinkless: the vLLM engine did not shut down cleanly: {err}")
        raise
    if engine is not None:
        engine.close()
    return run


def _train(run: Run, config, examples: list, val_examples: dict, reference, engine) -> None:
    """The RL steps from the run's next one to trainer.total_steps."""
    trainer, algo, rollout, d = config.trainer, config.algo, config.rollout, run.dist
    run.ready()
    shortcut = on_policy(config, run.model)  # the same for every step
    if val_examples and run.step == 0:  # the authors' val_before_train: where the curves start
        run.metrics.log(0, _validation(run, config, 0, val_examples, engine))
    bar = tqdm(range(run.step + 1, trainer.total_steps + 1), initial=run.step, total=trainer.total_steps, desc="rl",
               disable=not d.is_main)  # fmt: skip
    for step in bar:
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        start = _clock(run.device)
        batch = [examples[i] for i in batch_indices(len(examples), trainer.batch_size, step, trainer.seed)]
        # Each rank samples for its share of the prompts; the rollouts and their scores are then gathered, so
        # that every rank holds the whole batch and the group advantages are exact.
        mine = d.shard(batch)
        if engine is None:
            sampler = run.sync_rollout_model()
            ro = generate(sampler, run.tokenizer, [e.prompt for e in mine], rollout)
        else:  # vLLM: its own copy of the weights, synced inside; the trainer's log-probs come from the policy
            sampler = run.model
            ro = engine.generate(run.model, run.tokenizer, [e.prompt for e in mine])
        scores = [
            score(t, mine[p].answer, m, config.rewards)
            for t, m, p in zip(ro.texts, ro.modes, ro.prompt_index.tolist(), strict=True)
        ]
        if d.world > 1:
            parts = d.gather((_to_cpu(ro), scores, len(mine)))
            ro = merge_rollouts([p[0] for p in parts], [p[2] for p in parts], run.device)
            scores = [s for p in parts for s in p[1]]
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32)
        advantages = group_advantages(rewards, ro.prompt_index.cpu(), normalize_std=algo.normalize_std).to(run.device)
        rolled = _clock(run.device)
        keep = torch.ones(len(scores), dtype=torch.bool)
        if algo.filter_groups:  # zero-variance groups teach nothing: all their advantages are 0
            for g in ro.prompt_index.unique().cpu():
                members = ro.prompt_index.cpu() == g
                keep[members] = bool(rewards[members].std() > 0) if members.sum() > 1 else False
        # The old policy's log-probs: on-policy, the training forward's own; else from the sampler (the same
        # weights; no collective in a plain copy).
        old_logp = None
        if not shortcut:
            old_logp = all_logprobs(sampler, ro, rollout.temperature, algo, d, sharded=sampler is run.model)
        ref_logp = all_logprobs(reference, ro, rollout.temperature, algo, d, sharded=True) if reference else None
        scored = _clock(run.device)
        loss_advantages, is_stats = advantages, {}
        if ro.rollout_logp is not None and old_logp is not None:
            response = ro.response_mask[:, 1:]
            known = response & ~ro.rollout_logp.isnan()  # an engine may leave a token's log-prob out: weight 1
            rollout_logp = torch.where(known, ro.rollout_logp, old_logp)
            diff = (old_logp - rollout_logp).abs()[known]
            if diff.numel():  # no known token: no figure (0 would read as perfect agreement)
                is_stats["rollout_logp_diff"] = float(diff.mean())
            if algo.is_correction:
                weights, stats = importance_weights(old_logp, rollout_logp, response, algo.is_cap)
                loss_advantages = advantages[:, None] * weights
                is_stats.update(stats)

        prompts = sorted(set(ro.prompt_index[keep.to(ro.prompt_index.device)].tolist()))
        per_mini = algo.mini_batch_size or len(prompts) or 1
        keys = LOSS_METRICS
        sums, n_updates, grad_norm, skipped = dict.fromkeys(keys, 0.0), 0, 0.0, 0
        # On-policy with engine log-probs: the training forward's log-probs, for the rollout_logp_diff figure.
        seen_logp = torch.full_like(ro.rollout_logp, torch.nan) if shortcut and ro.rollout_logp is not None else None
        for _ in range(algo.ppo_epochs):
            for m0 in range(0, len(prompts), per_mini):
                chosen = set(prompts[m0 : m0 + per_mini])
                rows = [i for i, p in enumerate(ro.prompt_index.tolist()) if p in chosen and keep[i]]
                run.optimizer.zero_grad(set_to_none=True)
                part = mini_batch_backward(
                    run.model, ro, rows, old_logp, ref_logp, loss_advantages, config, d, logp_out=seen_logp
                )
                for key in keys:
                    sums[key] += part[key]
                grad_norm, was_skipped = run.update(part["loss"], step)
                skipped += was_skipped
                n_updates += 1
        if seen_logp is not None:  # this rank's rows: summed over ranks with the loss metrics
            keys = (*keys, "diff_sum", "diff_count")
            known = ro.response_mask[:, 1:] & ~ro.rollout_logp.isnan() & ~seen_logp.isnan()
            sums["diff_sum"] = float((seen_logp - ro.rollout_logp).abs()[known].sum())
            sums["diff_count"] = int(known.sum())
        sums = {k: sum(part[k] for part in d.gather(sums)) for k in keys}  # one collective for all of them
        diff_sum, diff_count = sums.pop("diff_sum", 0.0), sums.pop("diff_count", 0)
        if diff_count:  # no known token: no figure (0 would read as perfect agreement)
            is_stats["rollout_logp_diff"] = diff_sum / diff_count
        end = _clock(run.device)
        seconds = end - start
        tokens = int(ro.attention_mask.sum())
        val = {}
        if val_examples and (step % trainer.val_every == 0 or step == trainer.total_steps):
            val = _validation(run, config, step, val_examples, engine)
        row = run.metrics.log(
            step,
            {
                **val,
                **{k: v / max(n_updates, 1) for k, v in sums.items()},
                "logprob_path": "on_policy" if shortcut else "separate",  # where the old log-probs came from
                **rollout_metrics(ro, scores, rewards),
                **(tag_metrics(ro, scores, [e.tag for e in batch]) if config.data.tag_key else {}),
                **is_stats,
                "updates": n_updates,
                "skipped_updates": skipped,
                "grad_norm": grad_norm,
                "lr": run.optimizer.param_groups[0]["lr"],  # the rate in force (also when no update ran)
                "tokens_per_s": tokens / seconds,
                "step_seconds": seconds,
                # Where the step's time goes (rank 0's clock; the phases end in collectives, so ranks agree).
                "rollout_seconds": rolled - start,
                "logprob_seconds": scored - rolled,
                "update_seconds": end - scored,
                **_peak_memory(run.device),
            },
        )
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", think=f"{row['think_ratio']:.2f}")
        if run.end_step(step):
            break
    run.metrics.close()
