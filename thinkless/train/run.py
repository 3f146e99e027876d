"""What every training stage shares: the output folder, resuming, the model, the optimizer, the data order.

`start_run` resumes by itself when the output folder already holds a checkpoint: model, tokenizer, optimizer,
scheduler, RNG states and step all come from it, and `metrics.jsonl` is cut back to that step.
"""

from __future__ import annotations

import copy
import math
import random
import signal
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from thinkless.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from thinkless.train.config import ConfigError
from thinkless.train.dist import (
    Dist,
    full_model_state,
    full_optimizer_state,
    init_distributed,
    load_optimizer_state,
    shard_model,
)
from thinkless.train.gguf import GGUFError, convert_gguf, is_gguf
from thinkless.train.metrics import MetricsLog, NullLog
from thinkless.train.model import ModelError, load_model, load_tokenizer, resolve_device
from thinkless.train.preemption import Preemption

if TYPE_CHECKING:
    from thinkless.train.config import AlgoConfig, Config


def resolve_model_path(path: str) -> str:
    """A run folder (with checkpoint-<step>/ inside and no model of its own) stands for its latest checkpoint; a
    llama.cpp `.gguf` file for its Hugging Face conversion (`thinkless.train.gguf`, made once, then cached)."""
    if is_gguf(path):
        try:
            return str(convert_gguf(path))
        except GGUFError as err:
            raise ModelError(str(err)) from None
    folder = Path(path).expanduser()
    if folder.is_dir() and not (folder / "config.json").exists():
        latest = latest_checkpoint(folder)
        if latest is not None:
            return str(latest)
    return path


@dataclass(kw_only=True)
class Run:
    config: object
    stage: str
    device: torch.device
    output_dir: Path
    tokenizer: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: object
    step: int  # the last completed step (0 for a fresh run)
    metrics: MetricsLog | None
    resumed_from: Path | None = None
    rng: dict | None = None  # the checkpoint's RNG states, restored by ready()
    dist: Dist = field(default_factory=Dist)
    rollout_model: torch.nn.Module | None = None  # several ranks: a plain copy of the policy for generation
    skipped_in_a_row: int = 0  # optimizer updates skipped for a non-finite loss or gradient, consecutively
    preemption: Preemption = field(default_factory=Preemption)  # SIGTERM / SIGINT: save at the step's end

    def end_step(self, step: int) -> bool:
        """Save when due (`trainer.save_every`, the last step) or when a signal asked to stop, which every rank
        learns here at the same step. True: the run stops now."""
        t = self.config.trainer
        stopping = self.preemption.stop(self.dist)
        if stopping or step % t.save_every == 0 or step == t.total_steps:
            self.save(step)
        if stopping:
            self.stopped_at(step)
        return stopping

    def stopped_at(self, step: int) -> None:
        if self.dist.is_main:
            signal_name = signal.Signals(self.preemption.received).name if self.preemption.received else "a signal"
            saved = self.output_dir / f"checkpoint-{step}"
            print(f"thinkless: stopped by {signal_name} after step {step}, saved as {saved}; run the same command "
                  "to resume", file=sys.stderr)  # fmt: skip

    def update(self, loss: float, step: int) -> tuple[float, bool]:
        """Clip the gradients and apply them, unless the loss or the gradient norm is not finite (on any rank):
        then the gradients are dropped, nothing is applied (weights, optimizer moments, schedule all stay), and a
        warning names the step and the term. After `trainer.max_skipped_updates` skipped updates in a row the run
        stops (TrainingError) before anything else is saved. Returns (grad norm, skipped)."""
        algo = self.config.algo
        norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), algo.max_grad_norm))
        bad = [name for name, value in (("loss", loss), ("grad_norm", norm)) if not math.isfinite(value)]
        code = self.dist.max(int(bool(bad)) + 2 * int("loss" in bad))  # every rank skips together
        if code == 0:
            self.optimizer.step()
            self.scheduler.step()
            self.skipped_in_a_row = 0
            return norm, False
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_in_a_row += 1
        term = "loss" if code >= 2 else "grad_norm"
        limit = self.config.trainer.max_skipped_updates
        if self.dist.is_main:
            warnings.warn(f"step {step}: non-finite {term}; this update is skipped ({self.skipped_in_a_row} in a row, "
                          f"trainer.max_skipped_updates={limit})", stacklevel=2)  # fmt: skip
        if self.skipped_in_a_row >= limit:
            last = latest_checkpoint(self.output_dir, verify=False)
            raise TrainingError(
                f"step {step}: {self.skipped_in_a_row} updates in a row skipped for a non-finite loss or gradient "
                f"(trainer.max_skipped_updates={limit}); the last checkpoint, "
                f"{last.name if last is not None else 'none yet'}, is as it was. Lower algo.lr, check the data"
            )
        return norm, True

    def sync_rollout_model(self) -> torch.nn.Module:
        """The model that generates: the policy itself, or with several ranks its plain copy, refreshed from the
        sharded policy (generation runs a different number of forwards per rank: no collective may run there)."""
        if self.rollout_model is None:
            return self.model
        self.rollout_model.load_state_dict(full_model_state(self.model, self.dist))
        return self.rollout_model

    def ready(self) -> None:
        """Call once every model is loaded (loading a reference can draw random numbers): a resumed run gets the
        checkpoint's RNG states back here, so it samples exactly what the uninterrupted run would have."""
        if self.rng is not None:
            set_rng_state(self.rng)
            self.rng = None
        elif self.dist.world > 1:
            # Models load with the same seed on every rank (new embedding rows must agree); rollouts then differ.
            # (A rank that a resumed run did not have also lands here.)
            seed_everything(self.config.trainer.seed + 1000 * self.dist.rank + self.step)

    def save(self, step: int) -> Path:
        """Every rank calls it (the states are gathered); rank 0 writes. A non-finite weight is never written."""
        d = self.dist
        finite = all(bool(torch.isfinite(p.detach().to_local() if hasattr(p, "to_local") else p).all())
                     for p in self.model.parameters())  # fmt: skip
        if d.max(int(not finite)):
            raise TrainingError(f"step {step}: the model has a non-finite weight; checkpoint-{step} is not written")
        state = {"stage": self.stage, "data_position": step * self.config.trainer.batch_size}
        if self.optimizer is not None:
            state.update(
                optimizer=full_optimizer_state(self.model, self.optimizer, d), scheduler=self.scheduler.state_dict()
            )
        weights = full_model_state(self.model, d) if d.world > 1 else None
        state["rng_per_rank"] = d.gather(rng_state())
        path = self.output_dir / f"checkpoint-{step}"
        if d.is_main:
            path = save_checkpoint(
                self.output_dir, step, self.model, self.tokenizer, state, self.config.trainer.keep_last, weights
            )
        d.barrier()
        return path


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite updates, weights): the CLI prints it as one line (exit status 1)."""


def grad_norm_value(norm) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def start_run(config: Config, stage: str, *, train: bool = True) -> Run:
    """The model (from the latest checkpoint in output_dir, else model.path), optimizer, scheduler and step."""
    d = init_distributed(config.trainer.device)
    device = resolve_device(config.trainer.device)
    if d.world > 1 and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
    output_dir = Path(config.trainer.output_dir)
    checkpoint = resume_point(output_dir, d) if train else None
    state = load_state(checkpoint) if checkpoint is not None else None  # read once: the optimizer is in it
    if state is not None:
        check_stage(config, stage, checkpoint, state.get("stage", stage))
    source = str(checkpoint) if checkpoint is not None else resolve_model_path(config.model.path)
    seed_everything(config.trainer.seed)
    tokenizer = load_tokenizer(source)
    model = load_model(source, tokenizer, config, device, trainable=train)
    if train:
        algo = config.algo
        rollout_model = None
        if d.world > 1 and stage == "rl" and config.rollout.engine == "hf":
            rollout_model = copy.deepcopy(model).eval().requires_grad_(False)
        model = shard_model(model, d)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=algo.lr,
            weight_decay=algo.weight_decay,
            betas=tuple(algo.betas),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(algo, planned_updates(config, stage)))
        rng, step = None, 0
        if state is not None:
            load_optimizer_state(model, optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _apply_configured_rates(optimizer, scheduler, algo, d.is_main)
            step = int(state["step"])
            # Each rank its own RNG stream back; a rank the saved run did not have starts from its seed.
            per_rank = state.get("rng_per_rank") or [state["rng"]]
            rng = per_rank[d.rank] if d.rank < len(per_rank) else None
        if d.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            config.save(output_dir / "config.yaml")
        metrics = MetricsLog(output_dir, step, config.trainer.report_to) if d.is_main else NullLog()
        d.barrier()
        return Run(config=config, stage=stage, device=device, output_dir=output_dir, tokenizer=tokenizer, model=model,
                   optimizer=optimizer, scheduler=scheduler, step=step, metrics=metrics, resumed_from=checkpoint,
                   rng=rng, dist=d, rollout_model=rollout_model)  # fmt: skip
    return Run(config=config, stage=stage, device=device, output_dir=output_dir, tokenizer=tokenizer, model=model,
               optimizer=None, scheduler=None, step=0, metrics=None, dist=d)  # fmt: skip


def _apply_configured_rates(optimizer, scheduler, algo: AlgoConfig, report: bool) -> None:
    """The resumed run's algo.lr, weight_decay and betas, not the checkpoint's: the optimizer state and the
    scheduler bring back the rates the run started with, and a changed setting would be silently ignored. The
    schedule's position (its update count) is kept; the factor of that position is applied to the new base rate."""
    old = scheduler.base_lrs[0]
    if report and old != algo.lr:
        print(f"thinkless: algo.lr={algo.lr:g} replaces the checkpoint's {old:g} from the next update on")
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"], group["weight_decay"] = algo.lr, algo.lr * factor, algo.weight_decay
        group["betas"] = tuple(algo.betas)
    scheduler.base_lrs = [algo.lr] * len(optimizer.param_groups)


def planned_updates(config: Config, stage: str) -> int:
    """Optimizer updates of the whole run (SFT: one per step; RL: ppo_epochs x mini-batches per step)."""
    t, a = config.trainer, config.algo
    if stage != "rl":
        return t.total_steps
    minis = -(-t.batch_size // (a.mini_batch_size or t.batch_size))
    return t.total_steps * a.ppo_epochs * minis


def lr_lambda(algo: AlgoConfig, total: int):
    """The learning-rate factor of update `s` (0-based): linear warmup, then constant, cosine or linear decay to 0
    at the run's last planned update."""
    warmup = max(0, algo.warmup_steps)

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if algo.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if algo.lr_scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def resume_point(output_dir: Path, d: Dist) -> Path | None:
    """The checkpoint a run resumes from: the newest whose files match their manifest. Rank 0 alone reads them (a
    CRC over every byte: gigabytes for a real model, once) while the other ranks wait for its answer (`d.from_main`:
    no collective timeout, however long that takes); an error there is raised on every rank (none hangs)."""
    found, error = None, None
    if d.is_main:
        try:
            found = latest_checkpoint(output_dir)
        except Exception as err:  # re-raised below, after every rank has heard of it
            error = err
    if d.world > 1:
        found, failure = d.from_main((found, None if error is None else f"{type(error).__name__}: {error}"))
        if failure is not None and error is None:
            raise CheckpointError(f"rank 0 could not read the checkpoints in {output_dir}: {failure}")
    if isinstance(error, OSError):  # the disk's error, not a bug: one line, as any checkpoint that cannot be read
        raise CheckpointError(f"cannot read the checkpoints in {output_dir}: {error}") from error
    if error is not None:
        raise error
    return found


def check_output_dir(config: Config, stage: str) -> None:
    """A run folder belongs to one stage: resuming an SFT run as RL (or the reverse) would mix their optimizers."""
    with warnings.catch_warnings():  # (a stage that resumes says which checkpoint is damaged when it resumes)
        warnings.simplefilter("ignore")
        checkpoint = latest_checkpoint(config.trainer.output_dir)
    if checkpoint is not None:
        check_stage(config, stage, checkpoint, load_state(checkpoint).get("stage", stage))


def check_stage(config: Config, stage: str, checkpoint: Path, found: str) -> None:
    """The ConfigError of a checkpoint that stage `found` wrote, when it is not this one (`check_output_dir`)."""
    if found != stage:
        raise ConfigError(
            f"trainer.output_dir={config.trainer.output_dir!r} holds a {found} run ({checkpoint.name}); "
            f"give {stage} its own output_dir (and model.path={config.trainer.output_dir} to start from it)"
        )


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of 1-based `step`: consecutive slices of a fresh seeded permutation per epoch, so the data
    position follows from the step alone and a resumed run sees exactly what it would have seen."""
    if n_examples == 0:
        raise ValueError("no training examples")
    out = []
    position = (step - 1) * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n_examples)
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(out), n_examples - offset)
        out.extend(order[offset : offset + take].tolist())
        position += take
    return out
