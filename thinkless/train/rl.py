"""RL with DeGRPO: sample, reward, group-relative advantages, then the decoupled PPO loss on the policy.

One step (`rl_step`) is these named steps, in order:

    sample          `trainer.batch_size` prompts -> `rollout.n` samples each (HF generate, compiled or not, or vLLM)
    score           the reward of each sample from its mode and its \\boxed{} answer; gathered from every rank
    advantages      `group_advantages` by prompt; `algo.filter_groups` drops the groups whose rewards all agree
    log-probs       the old policy's (unless `on_policy`) and the reference's, by `token_logprobs`; the importance
                    correction with `algo.is_correction` (`thinkless.train.logprobs`)
    update          `algo.ppo_epochs` passes over mini-batches of prompts: `fused_linear_degrpo_loss` over
                    micro-batches of sequences, then one optimizer step each (`thinkless.train.policy_loss`)
    log, save       one metrics.jsonl row (`run.metrics`); a checkpoint when due (`run.end_step`)

Unlike vanilla GRPO, the control token's loss is normalised on its own and weighted by `algo.alpha`, so the
thousands of tokens of a long answer no longer drown the one token that picks the mode (Fang et al., 2025).

    thinkless-train rl model.path=runs/sft data.train_files=[deepscaler.json] rollout.n=8 trainer.output_dir=runs/rl
"""

from __future__ import annotations

import contextlib
import time

import torch
from tqdm import tqdm

from thinkless.kernels import group_advantages
from thinkless.modes import HEADLINE, legacy_names, mode_statistics
from thinkless.train.config import AlgoConfig, Config, ConfigError
from thinkless.train.data import fitting_prompts, load_problems
from thinkless.train.dist import Dist, shard_model
from thinkless.train.eval import validate, validation_examples
from thinkless.train.logprobs import all_logprobs, importance_correction, logp_diff, logp_diff_metric
from thinkless.train.model import ModelError, check_model_path, load_model, load_tokenizer
from thinkless.train.policy_loss import LOSS_METRICS, mini_batch_backward, on_policy
from thinkless.train.rewards import Score, score
from thinkless.train.rollout import Rollouts, generate, merge_rollouts
from thinkless.train.run import Run, batch_indices, resolve_model_path, start_run


def run_rl(config: Config) -> Run:
    """The RL stage: from the run's next step (a resumed one's) to `trainer.total_steps`."""
    examples, val_examples, ref_path = _inputs(config)  # a bad row stops the run before any model loads
    run = start_run(config, "rl")
    if config.trainer.batch_size < run.dist.world:
        raise ConfigError(f"trainer.batch_size={config.trainer.batch_size} gives some of the {run.dist.world} ranks "
                          "no prompt")  # fmt: skip
    reference = None
    if ref_path is not None:
        reference = load_model(ref_path, run.tokenizer, config, run.device, trainable=False, what="model.ref_path")
        reference = shard_model(reference, run.dist)
    with _vllm_engine(config, run) as engine, run.preemption:
        run.ready()
        shortcut = on_policy(config, run.model)  # the same for every step
        if val_examples and run.step == 0:  # the authors' val_before_train: where the curves start
            run.metrics.log(0, _validation(run, config, 0, val_examples, engine))
        total = config.trainer.total_steps
        bar = tqdm(range(run.step + 1, total + 1), initial=run.step, total=total, desc="rl",
                   disable=not run.dist.is_main)  # fmt: skip
        for step in bar:
            metrics = rl_step(run, config, step, examples, reference, engine, shortcut)
            val = {}
            if val_examples and (step % config.trainer.val_every == 0 or step == total):
                val = _validation(run, config, step, val_examples, engine)
            row = run.metrics.log(step, {**val, **metrics, **_peak_memory(run.device)})
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", think=f"{row['think_ratio']:.2f}")
            if run.end_step(step):
                break
        run.metrics.close()
    return run


def rl_step(run: Run, config: Config, step: int, examples: list, reference, engine, shortcut: bool) -> dict:
    """One RL step through the named steps (see the module's doc); its metrics row, validation aside."""
    algo, d, clock = config.algo, run.dist, _Clock(run.device)
    trainer = config.trainer
    batch = [examples[i] for i in batch_indices(len(examples), trainer.batch_size, step, trainer.seed)]
    # Each rank samples for its share of the prompts; the rollouts and their scores are then gathered, so that
    # every rank holds the whole batch and the group advantages are exact.
    mine = d.shard(batch)
    ro, sampler = sample(run, config, [e.prompt for e in mine], engine)
    clock.split("sample")  # the generation alone; the rollout phase also scores (math-verify) and filters
    ro, scores = score_samples(ro, mine, config, d, run.device)
    rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32)
    advantages = group_advantages(rewards, ro.prompt_index.cpu(), normalize_std=algo.normalize_std).to(run.device)
    keep = group_filter(ro, rewards, algo.filter_groups)
    clock.lap("rollout")
    old_logp, ref_logp = old_and_ref_logprobs(run, config, ro, sampler, reference, shortcut)
    loss_advantages, is_stats = importance_correction(ro, advantages, old_logp, algo)
    clock.lap("logprob")
    # On-policy with engine log-probs: the training forward's log-probs, for the rollout_logp_diff figure.
    seen_logp = torch.full_like(ro.rollout_logp, torch.nan) if shortcut and ro.rollout_logp is not None else None
    updated = update(run, config, ro, keep, old_logp, ref_logp, loss_advantages, step, seen_logp)
    clock.lap("update")
    return {
        **updated.pop("losses"),
        "logprob_path": "on_policy" if shortcut else "separate",  # where the old log-probs came from
        **rollout_metrics(ro, scores, rewards),
        **(tag_metrics(ro, scores, [e.tag for e in batch]) if config.data.tag_key else {}),
        **is_stats,
        **updated,
        "lr": run.optimizer.param_groups[0]["lr"],  # the rate in force (also when no update ran)
        **clock.metrics(int(ro.attention_mask.sum())),
    }


def sample(run: Run, config: Config, prompts: list[str], engine) -> tuple[Rollouts, torch.nn.Module]:
    """This rank's samples of its prompts, and the model that drew them (the old policy: the policy itself, its
    plain rollout copy under torchrun, or with vLLM the policy whose weights the engine copied)."""
    if engine is None:
        sampler = run.sync_rollout_model()
        return generate(sampler, run.tokenizer, prompts, config.rollout), sampler
    # vLLM: its own copy of the weights, synced inside; the trainer's log-probs come from the policy.
    return engine.generate(run.model, run.tokenizer, prompts), run.model


def score_samples(ro: Rollouts, mine: list, config: Config, d: Dist, device) -> tuple[Rollouts, list[Score]]:
    """The score of each of this rank's samples (`mine`: its examples), then every rank's rollouts and scores
    gathered into one batch, in rank order."""
    scores = [
        score(t, mine[p].answer, m, config.rewards)
        for t, m, p in zip(ro.texts, ro.modes, ro.prompt_index.tolist(), strict=True)
    ]
    if d.world == 1:
        return ro, scores
    parts = d.gather((_to_cpu(ro), scores, len(mine)))
    return merge_rollouts([p[0] for p in parts], [p[2] for p in parts], device), [s for p in parts for s in p[1]]


def group_filter(ro: Rollouts, rewards: torch.Tensor, filter_groups: bool) -> torch.Tensor:
    """[S] bool: the samples the update keeps. `algo.filter_groups`: a group whose rewards all agree (or of one
    sample) teaches nothing, all its advantages are 0, so it is left out of the mini-batches and their counts."""
    keep = torch.ones(len(rewards), dtype=torch.bool)
    if filter_groups:
        for g in ro.prompt_index.unique().cpu():
            members = ro.prompt_index.cpu() == g
            keep[members] = bool(rewards[members].std() > 0) if members.sum() > 1 else False
    return keep


def old_and_ref_logprobs(run: Run, config: Config, ro: Rollouts, sampler, reference, shortcut: bool):
    """The old policy's [S, L-1] log-probs (None on-policy: the training forward's own, detached) from the sampler
    (the same weights; no collective in a plain copy), and the reference's (None without the KL term)."""
    temperature, algo, d = config.rollout.temperature, config.algo, run.dist
    old_logp = None
    if not shortcut:
        old_logp = all_logprobs(sampler, ro, temperature, algo, d, sharded=sampler is run.model)
    ref_logp = all_logprobs(reference, ro, temperature, algo, d, sharded=True) if reference else None
    return old_logp, ref_logp


def prompt_mini_batches(ro: Rollouts, keep: torch.Tensor, algo: AlgoConfig) -> list[list[int]]:
    """The rollout rows of each mini-batch: `algo.mini_batch_size` prompts each (0: all), the kept samples only."""
    prompts = sorted(set(ro.prompt_index[keep.to(ro.prompt_index.device)].tolist()))
    per_mini = algo.mini_batch_size or len(prompts) or 1
    index = ro.prompt_index.tolist()
    out = []
    for m0 in range(0, len(prompts), per_mini):
        chosen = set(prompts[m0 : m0 + per_mini])
        out.append([i for i, p in enumerate(index) if p in chosen and keep[i]])
    return out


def update(run: Run, config: Config, ro: Rollouts, keep, old_logp, ref_logp, advantages, step: int, seen_logp=None):
    """`algo.ppo_epochs` passes over the mini-batches, one optimizer update each. Returns "losses" (the
    LOSS_METRICS, summed over ranks, mean over the updates), updates, skipped_updates, grad_norm (the last) and,
    given `seen_logp` (filled by the training forwards), rollout_logp_diff."""
    sums, n_updates, grad_norm, skipped = dict.fromkeys(LOSS_METRICS, 0.0), 0, 0.0, 0
    minis = prompt_mini_batches(ro, keep, config.algo)
    for _ in range(config.algo.ppo_epochs):
        for rows in minis:
            run.optimizer.zero_grad(set_to_none=True)
            part = mini_batch_backward(
                run.model, ro, rows, old_logp, ref_logp, advantages, config, run.dist, logp_out=seen_logp
            )
            for key in LOSS_METRICS:
                sums[key] += part[key]
            grad_norm, was_skipped = run.update(part["loss"], step)
            skipped += was_skipped
            n_updates += 1
    if seen_logp is not None:  # this rank's rows: summed over ranks with the loss metrics
        sums["diff_sum"], sums["diff_count"] = logp_diff(seen_logp, ro)
    sums = {k: sum(part[k] for part in run.dist.gather(sums)) for k in sums}  # one collective for all of them
    diff = logp_diff_metric(sums.pop("diff_sum", 0.0), sums.pop("diff_count", 0))
    losses = {k: v / max(n_updates, 1) for k, v in sums.items()}
    return {"losses": losses, **diff, "updates": n_updates, "skipped_updates": skipped, "grad_norm": grad_norm}


def rollout_metrics(ro: Rollouts, scores: list[Score], rewards: torch.Tensor) -> dict:
    """The step's samples: reward, the per-mode statistics (`thinkless.modes`), and the groups' outcomes."""
    correct = torch.tensor([s.correct for s in scores])
    stats = mode_statistics(ro.modes, correct.tolist(), ro.lengths.tolist())
    short = torch.tensor([m == "short" for m in ro.modes])
    think = torch.tensor([m == "think" for m in ro.modes])
    groups = ro.prompt_index.cpu()
    members = [groups == g for g in groups.unique()]
    return {
        "samples": len(scores),
        "reward_mean": rewards.mean().item(),
        **stats,
        **legacy_names(stats),
        "groups_all_correct": int(sum(bool(correct[m].all()) for m in members)),
        "groups_all_wrong": int(sum(not bool(correct[m].any()) for m in members)),
        # The authors' batch/all_correct_think and all_correct_short (ray_trainer.py): groups whose every sample is
        # right in one mode; early RL is mostly the first, a policy that learned to route turns them into the second.
        "groups_all_correct_think": int(sum(bool((correct[m] & think[m]).all()) for m in members)),
        "groups_all_correct_short": int(sum(bool((correct[m] & short[m]).all()) for m in members)),
        "groups_mixed_modes": int(sum(bool(think[m].any() and short[m].any()) for m in members)),
    }


def tag_metrics(ro: Rollouts, scores: list[Score], tags: list[str]) -> dict:
    """The headline statistics of each tag's samples (`data.tag_key`), as `<name>/<tag>` (think_ratio/Level 1)."""
    out = {}
    sample_tags = [tags[p] for p in ro.prompt_index.tolist()]
    samples = list(zip(ro.modes, [s.correct for s in scores], ro.lengths.tolist(), strict=True))
    for tag in sorted(set(sample_tags)):
        modes, correct, tokens = zip(*[x for x, t in zip(samples, sample_tags, strict=True) if t == tag], strict=True)
        stats = mode_statistics(list(modes), list(correct), list(tokens))
        out.update({f"{key}/{tag}": stats[key] for key in HEADLINE})
        out.update(legacy_names(stats, tag))
    return out


def _inputs(config: Config) -> tuple[list, dict, str | None]:
    """The training examples, the validation ones, and the reference model's path (None without the KL term),
    all checked before any model is loaded."""
    tokenizer = load_tokenizer(resolve_model_path(config.model.path))
    files, limit = config.data.train_files, config.data.max_prompt_tokens
    examples = fitting_prompts(load_problems(files, tokenizer, config), tokenizer, limit, f"data.train_files {files}")
    val_examples = validation_examples(config, tokenizer) if config.trainer.val_every else {}
    if config.algo.kl_coef <= 0:  # the frozen reference is loaded only when the KL term is on
        return examples, val_examples, None
    ref_path = resolve_model_path(config.model.ref_path or config.model.path)
    check_model_path(ref_path, "model.ref_path")
    ref_vocab = load_tokenizer(ref_path).get_vocab()
    if ref_vocab != tokenizer.get_vocab():  # the KL term compares the two models' log-probs of the same ids
        raise ModelError(f"model.ref_path={ref_path!r} has another vocabulary ({len(ref_vocab)} tokens) than "
                         f"model.path ({len(tokenizer)}): the reference must share its tokens")  # fmt: skip
    return examples, val_examples, ref_path


@contextlib.contextmanager
def _vllm_engine(config: Config, run: Run):
    """The colocated vLLM engine with `rollout.engine=vllm` (else None), shut down when the stage ends; when it ends
    in an error, a failing shutdown is only reported (the training error is the one to see)."""
    if config.rollout.engine != "vllm":
        yield None
        return
    from thinkless.train.vllm_rollout import VLLMRollout

    engine = VLLMRollout(str(run.resumed_from or resolve_model_path(config.model.path)), run)
    try:
        yield engine
    except BaseException:
        try:
            engine.close()
        except Exception as err:
            print(f"thinkless: the vLLM engine did not shut down cleanly: {err}")
        raise
    engine.close()


def _validation(run: Run, config: Config, step: int, examples: dict, engine) -> dict:
    """`trainer.val_files` scored with the policy after `step` updates (eval/step-<step>/), and its time."""
    start = time.perf_counter()
    metrics = validate(run, config, step, examples=examples, engine=engine)
    return {**metrics, "val_seconds": time.perf_counter() - start}


class _Clock:
    """A step's wall time by phase. Each reading waits for the device's queued work: CUDA runs ahead of Python, and
    a phase's time must hold its kernels, not the next phase's. The step's peak GPU memory is reset at the start."""

    def __init__(self, device: torch.device):
        self.device, self.laps = device, {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.start = self.last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, phase: str) -> None:
        now = self._now()
        self.laps[f"{phase}_seconds"], self.last = now - self.last, now

    def split(self, part: str) -> None:
        """The seconds of a first part of the running phase (`<part>_seconds`); the phase's lap still holds it."""
        self.laps[f"{part}_seconds"] = self._now() - self.last

    def metrics(self, tokens: int) -> dict:
        """tokens/s and the step's seconds, then the phases' (rank 0's clock; the phases end in collectives, so
        ranks agree)."""
        seconds = self.last - self.start
        return {"tokens_per_s": tokens / seconds, "step_seconds": seconds, **self.laps}


def _peak_memory(device: torch.device) -> dict:
    """The step's peak of allocated GPU memory, its validation included (the caching allocator's view; `_Clock`
    resets it when a step starts)."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def _to_cpu(ro: Rollouts) -> Rollouts:
    moved = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in vars(ro).items()}
    return Rollouts(**moved)
