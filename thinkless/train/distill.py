"""The warm-up data (`thinkless-train distill`): each problem answered in both modes, verified, as SFT rows.

    thinkless-train distill data.train_files=[problems.json] data.val_files=[math500.json] \\
        distill.think_model=deepseek-ai/DeepSeek-R1-Distill-Qwen-7B distill.short_model=Qwen/Qwen2.5-Math-7B-Instruct \\
        rollout.engine=vllm trainer.output_dir=runs/hybrid
    thinkless-train sft data.train_files=[runs/hybrid/hybrid.jsonl] ...

The authors released the result of this stage (Hybrid-OpenThoughts2-1M-1.5B), not its code. What it does here:

1. **Problems**: `data.train_files` with reference answers, read as RL reads them (`data.problem_key`, ...); rows
   without an answer are skipped (counted). Identical problems (the same text up to whitespace) are merged, the
   first kept. A problem that is also in `data.val_files` or `trainer.val_files` is dropped before anything is
   generated: the contamination guard.
2. **Answers** (`thinkless.train.distill_teacher`): `distill.think_model` samples `think_n` answers per problem, or
   `distill.think_file` gives existing long responses keyed by problem (OpenThoughts-style); `distill.short_model`
   samples `short_n`. Each model uses its own chat template; a prompt longer than `data.max_prompt_tokens` (in that
   model's tokens) is not sampled (counted). Their tags become ours (`think_response`, `short_response`).
3. **Verification**: `rewards.score`, the RL reward's own code path (`verdict`): a think answer is read after
   `</think>` and one without it is rejected, as is a response cut off by its max tokens or a short one that thinks.
   The first `distill.keep_per_mode` correct answers per problem and mode are kept. A problem correct in one mode
   keeps that mode alone, unless `distill.require_both`.
4. **Output** in `trainer.output_dir`:

       think/, short/                        every judged sample, by shard (`thinkless.train.distill_store`):
                                             written when a shard is done, the work a rerun resumes from
       data/part-<k>.jsonl                   the SFT rows of shard k (problems k*shard_size ...), once both of its
                                             sides are done
       hybrid.jsonl (or .parquet)            every SFT row: {"problem", "response"}, what `sft` reads
       report.json, report.md, lengths.png   accuracy of each model, rows kept per mode, problems with both, one or
                                             neither mode, token lengths per mode (`thinkless.train.distill_report`)

A rerun skips the shards that are done and samples the rest with the same seeds (per shard; per request on vLLM),
so a killed run ends with exactly the rows of an uninterrupted one. When the problem list changed (a larger
`distill.limit`, more rows), the samples of the problems already answered are reused and only the others are
generated. A side's settings (model, sampling, template, engine, seed, ...) are recorded; a run with others stops,
naming the key. The rows and report are rebuilt from the samples on every run (changing `require_both`,
`keep_per_mode` or `format` costs no generation).

Several processes (torchrun, or any launcher that sets RANK and WORLD_SIZE; LOCAL_RANK picks the GPU) share the
shards: rank r takes shards r, r + world, ...; no process group is formed. The last process to finish writes the
hybrid file and the report.

Generation goes through the RL engines (`rollout.engine`: hf `generate`, `trainer.batch_size` prompts per call; or
vLLM, one call per shard, each engine in its own process).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from thinkless.train.config import ConfigError
from thinkless.train.data import DataError, Problem, read_problem_texts, read_problems
from thinkless.train.distill_store import (
    SIDES,
    RowWriter,
    SideStore,
    problem_id,
    remove_stale_tmp,
    sft_rows,
    shard_digest,
    write_rows,
)
from thinkless.train.distill_teacher import (
    Teacher,
    check_context,
    problem_key,
    read_think_file,
    teacher_path,
    teacher_prompt,
    teacher_tokenizer,
    template_args,
    trace_problem_key,
    verdict,
)
from thinkless.train.model import resolve_device, resolve_dtype

if TYPE_CHECKING:
    from thinkless.train.config import Config


SEED_STRIDE = 1_000_003  # shard k of side s samples from seed + s * SEED_STRIDE**2 + k * SEED_STRIDE (+ request)
_PART = re.compile(r"^part-(\d+)\.(jsonl|parquet)$")


# -- problems -------------------------------------------------------------------------------------------------


def gather_problems(config: Config) -> tuple[list[Problem], dict]:
    """The problems to distill, in file order: deduplicated, decontaminated, `distill.limit`; and their counts."""
    unanswered: list[str] = []
    read = read_problems(config.data.train_files, config.data, unanswered=unanswered)
    if unanswered:
        print(f"thinkless distill: skipped {len(unanswered)} problems without a reference answer (nothing to verify "
              f"them against): {', '.join(unanswered[:3])}{', ...' if len(unanswered) > 3 else ''}")  # fmt: skip
    unique: dict[str, Problem] = {}
    conflicts = 0
    for p in read:
        first = unique.setdefault(problem_key(p.problem), p)
        if first is not p and first.answer.strip() != p.answer.strip():
            conflicts += 1
            if conflicts <= 3:
                print(f"thinkless distill: {p.source} repeats {first.source} with another answer "
                      f"({p.answer!r} against {first.answer!r}); the first is kept")  # fmt: skip
    guarded = list(dict.fromkeys([*config.data.val_files, *config.trainer.val_files]))
    seen: dict[str, str] = {}
    for file in guarded:
        try:
            texts = read_problem_texts([file], config.data, "data.val_files")
        except DataError:  # a benchmark in its own layout (data.problem_key names the training files' column)
            texts = read_problem_texts([file], dataclasses.replace(config.data, problem_key="auto"), "data.val_files")
        for _, text in texts:
            seen.setdefault(problem_key(text), file)
    contaminated = {file: 0 for file in guarded}
    kept = []
    for key, p in unique.items():
        if key in seen:
            contaminated[seen[key]] += 1
        else:
            kept.append(p)
    if config.distill.limit:
        kept = kept[: config.distill.limit]
    counts = {
        "read": len(read) + len(unanswered), "without_answer": len(unanswered),
        "duplicates_merged": len(read) - len(unique), "duplicate_answer_conflicts": conflicts,
        "contaminated": contaminated, "used": len(kept),
    }  # fmt: skip
    if not kept:
        raise DataError(f"no problem left to distill in {config.data.train_files} ({counts})")
    return kept, counts


# -- settings -------------------------------------------------------------------------------------------------


IDENTITY = ("model", "template_args", "n", "temperature", "top_p", "max_tokens", "max_prompt_tokens", "engine",
            "seed", "shard_size", "batch_size", "instruction", "instruction_position", "think_file", "bytes",
            "mtime_ns", "think_problem_key", "think_response_key")  # fmt: skip


def side_settings(side: str, config: Config, device: torch.device, generating: bool) -> dict:
    """What a side's samples depend on: samples made with other settings are not this run's. The IDENTITY keys
    need nothing loaded; `generating` adds the template's digest, dtype and device (and checks the model's context
    length), which only samples still to be drawn depend on."""
    d, data = config.distill, config.data
    if side == "think" and d.think_file:
        from thinkless.train.distill_teacher import think_files

        files = [Path(f) for f in think_files(d.think_file)] if generating else []
        return {"think_file": str(Path(d.think_file).resolve()), "instruction": data.instruction,
                "think_problem_key": d.think_problem_key, "think_response_key": d.think_response_key,
                **({"bytes": sum(f.stat().st_size for f in files),
                    "mtime_ns": max(f.stat().st_mtime_ns for f in files)} if generating else {})}  # fmt: skip
    model = getattr(d, f"{side}_model")
    local = Path(model).expanduser()
    settings = {
        "model": str(local.resolve()) if local.exists() else model, "template_args": template_args(config, side),
        "n": getattr(d, f"{side}_n"), "temperature": getattr(d, f"{side}_temperature"),
        "top_p": getattr(d, f"{side}_top_p"), "max_tokens": getattr(d, f"{side}_max_tokens"),
        "max_prompt_tokens": data.max_prompt_tokens, "engine": config.rollout.engine, "seed": config.trainer.seed,
        "shard_size": d.shard_size, "instruction": data.instruction, "instruction_position": data.instruction_position,
        **({"batch_size": config.trainer.batch_size} if config.rollout.engine == "hf" else {}),
    }  # fmt: skip
    if generating:
        path = teacher_path(config, side)
        check_context(path, config, side)
        tokenizer = teacher_tokenizer(path, f"distill.{side}_model")
        probe = teacher_prompt(tokenizer, "1 + 1 = ?", data, settings["template_args"])[0]
        settings.update(template=hashlib.sha256(probe.encode()).hexdigest()[:16], device=device.type,
                        dtype=str(resolve_dtype(config.model.dtype, device)))  # fmt: skip
    return settings


def _check(config: Config) -> None:
    """Settings that need nothing loaded, checked before anything is read or written."""
    from thinkless.train.model import check_model_path
    from thinkless.train.run import resolve_model_path

    d = config.distill
    if not d.short_model:
        raise ConfigError("distill.short_model is not set: the instruct model that writes the <short> answers")
    if bool(d.think_model) == bool(d.think_file):
        raise ConfigError("give one of distill.think_model (a reasoning model) or distill.think_file (its answers)")
    if config.rollout.engine == "vllm":
        for side in SIDES:
            t = getattr(d, f"{side}_temperature")
            if not 0.01 <= t <= 2.0:
                raise ConfigError(f"distill.{side}_temperature must be in [0.01, 2] with rollout.engine=vllm, got {t}")
    for side in SIDES:
        template_args(config, side)
    out = Path(config.trainer.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"trainer.output_dir={str(out)!r} is a file, not a folder")
    if config.model.path:  # only the report's token counts use it: a wrong path must not wait for the end
        check_model_path(resolve_model_path(config.model.path))


def _device(config: Config) -> torch.device:
    """This process's device: each process of a launcher (LOCAL_RANK) its own GPU, seen as the only one (a vLLM
    engine of one process uses the first visible GPU)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several and config.trainer.device != "cpu" and not torch.cuda.is_initialized():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        if local < len(ids):
            os.environ["CUDA_VISIBLE_DEVICES"] = ids[local]
    device = resolve_device(config.trainer.device)
    return torch.device("cuda", 0) if device.type == "cuda" else device


# -- the run ------------------------------------------------------------------------------------------------------


def run_distill(config: Config) -> dict | None:
    """Generate what is missing, then (the last process to finish) the hybrid file and the report."""
    from thinkless.train.run import check_output_dir

    _check(config)
    check_output_dir(config, "distill")
    problems, counts = gather_problems(config)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(config.trainer.output_dir)
    remove_stale_tmp([out, *(out / side for side in SIDES), out / "data"])
    size = config.distill.shard_size
    shards = [problems[i : i + size] for i in range(0, len(problems), size)]
    digests = [shard_digest(s) for s in shards]
    mine = list(range(rank, len(shards), world))
    device = _device(config)
    stores, todo = {}, {}
    for side in SIDES:
        todo[side] = [k for k in mine if not SideStore.exists(out, side, digests[k])]
        settings = side_settings(side, config, device, generating=bool(todo[side]))
        stores[side] = SideStore(out, side, settings, IDENTITY, generating=bool(todo[side]))  # checks them
    think_file = None
    if config.distill.think_file and todo["think"]:
        instruction = config.data.instruction
        wanted = {trace_problem_key(p.problem, instruction) for p in problems}
        think_file, in_file = read_think_file(config.distill.think_file, config, wanted)
        counts["think_file"] = {"problems": in_file, "matched": len(think_file)}
        if not think_file:
            raise DataError(f"{config.distill.think_file}: none of its {in_file} problems is one of "
                            f"data.train_files' (matched by text, whitespace and instruction aside)")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        config.save(out / "config.yaml")
    if any(todo.values()):  # the files built from the samples are rebuilt at the end: none stays stale meanwhile
        for stale in ("hybrid.jsonl", "hybrid.parquet", "report.json", "report.md", "lengths.png"):
            (out / stale).unlink(missing_ok=True)
    for s, side in enumerate(SIDES):
        if todo[side]:
            generate_side(config, side, s, stores, shards, digests, todo[side], think_file, device, rank)
    return finish(config, out, shards, digests, stores, counts)


def generate_side(config: Config, side, s, stores, shards, digests, todo, think_file, device, rank) -> None:
    """Sample and judge `side` for the shards in `todo`, writing each as it is done (and, on the short side, its
    SFT rows). Problems answered in shards of another problem list are taken from there, not sampled again."""
    store = stores[side]
    reuse = store.reusable(set(digests))
    teacher = None
    bar = tqdm(total=sum(len(shards[k]) for k in todo), desc=f"distill {side}", unit="problem", disable=rank != 0)
    solved = total = 0
    try:
        for k in todo:
            problems = shards[k]
            samples = [reuse.get(problem_id(p), ...) for p in problems]  # ...: not answered anywhere yet
            missing = [i for i, x in enumerate(samples) if x is ...]
            if missing and think_file is not None and side == "think":
                for i in missing:
                    traces = think_file.get(trace_problem_key(problems[i].problem, config.data.instruction), [])
                    samples[i] = [[r, verdict(r, problems[i].answer, True, config.rewards)] for r in traces]
            elif missing:
                teacher = teacher or Teacher(side, config, device)
                seed = config.trainer.seed + s * SEED_STRIDE**2 + k * SEED_STRIDE
                drawn = teacher.sample([problems[i] for i in missing], missing, seed)
                for i, per in zip(missing, drawn, strict=True):
                    samples[i] = None if per is None else [
                        [r, verdict(r, problems[i].answer, stopped, config.rewards)] for r, stopped in per
                    ]  # fmt: skip
            too_long = sum(x is None for x in samples)
            store.save(digests[k], problems, samples, too_long)
            if side == "short":  # both sides of shard k are done: its SFT rows
                think = stores["think"].load(digests[k], problems)
                if think is not None:
                    rows, _ = sft_rows(problems, think["samples"], samples, config.distill)
                    write_rows(Path(config.trainer.output_dir) / "data" / f"part-{k:05d}.{config.distill.format}",
                               rows, config.distill.format)  # fmt: skip
            solved += sum(any(v == "correct" for _, v in (per or [])) for per in samples)
            total += len(samples)
            bar.update(len(samples))
            bar.set_postfix(solved=f"{solved / max(total, 1):.2f}")
    finally:
        bar.close()
        if teacher is not None:
            teacher.close()


def finish(config: Config, out: Path, shards: list, digests: list, stores: dict, counts: dict) -> dict | None:
    """Once every shard of both sides is done: the SFT row shards, the hybrid file and the report, streamed from
    the samples alone (so that any process, or a rerun with other keep settings, rebuilds the same). None while some
    shard is not done."""
    from thinkless.train.distill_report import Tally

    missing = [f"{side}/{digests[k]}.json" for k in range(len(shards)) for side in SIDES
               if not SideStore.exists(out, side, digests[k])]  # fmt: skip
    if missing:
        print(f"thinkless distill: {len(missing)} shards are not done yet ({missing[0]}, ...: another process?); "
              "the last process to finish writes the hybrid file, or run the command again")  # fmt: skip
        return None
    fmt = config.distill.format
    tally = Tally(config)
    writer = RowWriter(out / f"hybrid.{fmt}", fmt)
    done = False
    try:
        for k, problems in enumerate(shards):
            think = stores["think"].load(digests[k], problems)
            short = stores["short"].load(digests[k], problems)
            for side, shard in (("think", think), ("short", short)):
                if shard is None:
                    bad = stores[side].set_aside(digests[k])
                    raise DataError(f"{bad.with_suffix('')} does not load (moved to {bad.name}); run the command "
                                    "again to generate it")  # fmt: skip
            rows, kept = sft_rows(problems, think["samples"], short["samples"], config.distill)
            write_rows(out / "data" / f"part-{k:05d}.{fmt}", rows, fmt)
            writer.write(rows)
            tally.add(think, short, kept, rows)
        done = True
    finally:
        writer.close(keep=done)
    for stale in (out / "data").glob("part-*"):  # shards of an earlier, larger run, or of the other format
        match = _PART.match(stale.name)
        if match and (int(match.group(1)) >= len(shards) or match.group(2) != fmt):
            stale.unlink(missing_ok=True)
    (out / f"hybrid.{'parquet' if fmt == 'jsonl' else 'jsonl'}").unlink(missing_ok=True)  # the other format's
    report = tally.write(out, counts)
    if not report["kept_rows"]["total"]:
        m = report["models"]
        long = (
            f" ({m['think']['prompts_too_long']} think and {m['short']['prompts_too_long']} short prompts were "
            "longer than data.max_prompt_tokens)"
        )
        raise DataError(
            f"no answer was verified correct: {out / f'hybrid.{fmt}'} is empty; see {out / 'report.md'}"
            + (long if m["think"]["prompts_too_long"] or m["short"]["prompts_too_long"] else "")
        )
    return report
