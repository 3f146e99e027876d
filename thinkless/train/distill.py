"""The warm-up data (`thinkless-train distill`): each problem answered in both modes, verified, as SFT rows.

    thinkless-train distill data.train_files=[problems.json] data.val_files=[math500.json] \\
        distill.think_model=deepseek-ai/DeepSeek-R1-Distill-Qwen-7B distill.short_model=Qwen/Qwen2.5-Math-7B-Instruct \\
        rollout.engine=vllm trainer.output_dir=runs/hybrid
    thinkless-train sft data.train_files=[runs/hybrid/hybrid.jsonl] ...

The authors released the result of this stage (Hybrid-OpenThoughts2-1M-1.5B), not its code. What it does here:

1. **Problems**: `data.train_files` with reference answers, read as RL reads them (`data.problem_key`, ...).
   Identical problems (the same text up to whitespace) are merged, the first kept. A problem that is also in
   `data.val_files` or `trainer.val_files` is dropped before anything is generated: the contamination guard.
2. **Think side**: `distill.think_model` samples `think_n` answers per problem with its own chat template, or
   `distill.think_file` gives existing long responses keyed by problem (OpenThoughts-style). A reasoning model's
   own tags become the control token: R1's template opens `<think>` in the prompt, so its text gets it back in
   front; OpenThoughts-114k's `<|begin_of_thought|>` / `<|end_of_thought|>` become `<think>` / `</think>`.
   **Short side**: `distill.short_model` samples `short_n` answers, each opened with `<short>` (an empty leading
   `<think></think>` block is removed; any other think tag rejects it).
3. **Verification**: `rewards.score`, the RL reward's own code path: a think answer is read after `</think>` and
   one without it is rejected, as is a response cut off by its max tokens. Only correct answers are kept: the first
   `distill.keep_per_mode` per problem and mode. A problem correct in one mode keeps that mode alone, unless
   `distill.require_both`.
4. **Output** in `trainer.output_dir`:

       think/part-<k>.json, short/part-<k>.json   every sample of shard k (problems k*shard_size ...) and its
                                                  verdict, written when the shard is done: the resumable work
       data/part-<k>.jsonl                        the SFT rows of shard k, once both of its sides are done
       hybrid.jsonl (or .parquet)                 every SFT row: {"problem", "response"}, what `sft` reads
       report.json, report.md, lengths.png        accuracy of each model, rows kept per mode, problems with both,
                                                  one or neither mode, token lengths per mode

A rerun skips the shards that are done and regenerates the rest with the same seeds (per shard, and per request
on vLLM), so a killed run ends with exactly the rows of an uninterrupted one. A shard written with other settings
(model, sampling, instruction, seed, engine) or other problems stops the run with the file's name: work is never
silently thrown away. The rows and report are rebuilt from the shards on every run (changing `require_both` or
`keep_per_mode` costs no generation).

Several processes (torchrun, or any launcher that sets RANK and WORLD_SIZE; LOCAL_RANK picks the GPU) share the
shards: rank r takes shards r, r + world, ...; no process group is formed. The last process to finish writes the
hybrid file and the report.

Generation goes through the RL engines (`rollout.engine`: hf `generate` or vLLM), batched by `trainer.batch_size`
prompts (vLLM: a shard per call). Token lengths in the report are counted with `model.path`'s tokenizer (the model
that `sft` will train, whose `data.max_length` cuts them) or, without it, the short model's.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from thinkless.train.config import ConfigError
from thinkless.train.data import DataError, Problem, iter_rows, read_problem_texts, read_problems, user_turn
from thinkless.train.model import check_model_path, load_model, resolve_device
from thinkless.train.rewards import SHORT, THINK, THINK_END, mode_of_text, score

SIDES = ("think", "short")
SEED_STRIDE = 1_000_003  # shard k of side s samples from seed + s * SEED_STRIDE**2 + k * SEED_STRIDE (+ request)
# OpenThoughts-114k (Bespoke-Stratos) marks its thinking and its solution with these.
THOUGHT_TAGS = {"<|begin_of_thought|>": THINK, "<|end_of_thought|>": THINK_END}
SOLUTION_TAGS = ("<|begin_of_solution|>", "<|end_of_solution|>")


def problem_key(text: str) -> str:
    """Problems that differ only in whitespace are the same problem (dedup and the contamination guard)."""
    return " ".join(text.split())


# -- problems -------------------------------------------------------------------------------------------------


def gather_problems(config) -> tuple[list[Problem], dict]:
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
        for _, text in read_problem_texts([file], config.data, "data.val_files"):
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


def problems_digest(problems: list[Problem]) -> str:
    text = json.dumps([[p.problem, p.answer] for p in problems], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- normalising responses ------------------------------------------------------------------------------------


def think_response(text: str, opened: str = "") -> str:
    """A reasoning model's answer with our `<think>` first. `opened`: what the chat template already wrote of it
    (R1's "<think>\\n", which the model then continues)."""
    text = opened + text
    for tag, ours in THOUGHT_TAGS.items():
        text = text.replace(tag, ours)
    for tag in SOLUTION_TAGS:
        text = text.replace(tag, "")
    text = text.strip()
    return text if text.startswith(THINK) else f"{THINK}\n{text}"


def short_response(text: str) -> str | None:
    """An instruct model's answer with `<short>` first; None when it thinks (a think tag in it)."""
    text = text.strip()
    if text.startswith(THINK) and THINK_END in text and not text[len(THINK) : text.index(THINK_END)].strip():
        text = text[text.index(THINK_END) + len(THINK_END) :].strip()  # an empty block (Qwen3 without thinking)
    if any(tag in text for tag in (SHORT, THINK, THINK_END)):
        return None
    return f"{SHORT}\n{text}"


def verdict(response: str | None, answer: str, stopped: bool, rewards) -> str:
    """correct, wrong, format_error (no answer where RL reads one, or a think tag in a short answer) or truncated
    (cut off by the max tokens: a box before the cut is no finished answer), by `rewards.score`, the RL reward."""
    if response is None:
        return "format_error"
    if not stopped:
        return "truncated"
    result = score(response, answer, mode_of_text(response), rewards)
    if result.correct:
        return "correct"
    return "wrong" if result.answer is not None else "format_error"


# -- the think file ---------------------------------------------------------------------------------------------

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def _turn(row: dict, role: str) -> str | None:
    """The first `role` turn of a conversations ({from, value}) or messages ({role, content}) column."""
    for column in ("conversations", "messages"):
        turns = row.get(column)
        if not isinstance(turns, list):
            continue
        for turn in turns:
            if isinstance(turn, dict):
                who = turn.get("role", turn.get("from"))
                text = turn.get("content", turn.get("value"))
                if _ROLES.get(str(who).lower()) == role and isinstance(text, str):
                    return text
    return None


def read_think_file(path: str, distill, wanted: set[str] | None = None) -> tuple[dict[str, list[str]], int]:
    """problem key -> the file's long responses to it, in file order, normalised (`think_response`), for the
    problems in `wanted` (all when None); and how many problems the file holds. Rows are read one by one: a
    million traces are not held, only those of the problems asked for."""
    out: dict[str, list[str]] = {}
    problems: set[str] = set()
    for i, row in enumerate(iter_rows(path)):
        where = f"{path}: row {i}"
        texts = []
        for setting, names, role in (
            ("think_problem_key", ("problem", "question"), "user"),
            ("think_response_key", ("response",), "assistant"),
        ):
            key = getattr(distill, setting)
            if key != "auto":
                value = row.get(key)
            else:
                value = next((row[n] for n in names if isinstance(row.get(n), str)), None) or _turn(row, role)
            if not isinstance(value, str) or not value.strip():
                looked = repr(key) if key != "auto" else " or ".join(map(repr, names)) + f" or a {role} turn"
                raise DataError(f"{where}: no text for distill.{setting} (looked for {looked}); the row has: "
                                f"{', '.join(map(str, row)) or 'nothing'}")  # fmt: skip
            texts.append(value)
        key = problem_key(texts[0])
        problems.add(key)
        if wanted is None or key in wanted:
            out.setdefault(key, []).append(think_response(texts[1]))
    return out, len(problems)


# -- generation -------------------------------------------------------------------------------------------------


def teacher_tokenizer(path: str):
    """A generating model's own tokenizer, as it ships (no control tokens: the model has never seen them)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path!r}: cannot load a tokenizer: {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def teacher_prompt(tokenizer, problem: str, data) -> tuple[str, str]:
    """The model's chat prompt for a problem, and the part of a think block its template opened ("" if none)."""
    messages = user_turn(problem, data.instruction, data.instruction_position)
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt = "".join(f"{m['content']}\n" for m in messages)
    at = prompt.rfind(THINK)
    opened = prompt[at:] if at >= 0 and not prompt[at:].strip()[len(THINK) :].strip() else ""
    return prompt, opened


def decode_response(tokenizer, tokens: list[int], stops: list[int]) -> tuple[str, bool]:
    """The text of generated tokens without their stop token, and whether they ended with one. Special tokens are
    left out, except the think tags (a tokenizer may mark them special)."""
    stopped = bool(tokens) and tokens[-1] in stops
    if stopped:
        tokens = tokens[:-1]
    keep = {tokenizer.convert_tokens_to_ids(t) for t in (THINK, THINK_END)}
    special = set(tokenizer.all_special_ids) - keep
    return tokenizer.decode([t for t in tokens if t not in special], skip_special_tokens=False), stopped


class Teacher:
    """One generating model on one engine: `sample(problems, seed)` gives each problem's [(response, stopped)]."""

    def __init__(self, side: str, config, device: torch.device):
        from thinkless.train.rollout import stop_token_ids
        from thinkless.train.run import resolve_model_path

        d = config.distill
        what = f"distill.{side}_model"
        self.path = resolve_model_path(getattr(d, f"{side}_model"))
        check_model_path(self.path, what)
        self.side, self.config, self.device = side, config, device
        self.rollout = dataclasses.replace(
            config.rollout, n=getattr(d, f"{side}_n"), temperature=getattr(d, f"{side}_temperature"),
            top_p=getattr(d, f"{side}_top_p"), max_new_tokens=getattr(d, f"{side}_max_tokens"),
        )  # fmt: skip
        self.tokenizer = teacher_tokenizer(self.path)
        self.model = self.llm = None
        if config.rollout.engine == "vllm":
            from transformers import AutoConfig, GenerationConfig

            from thinkless.train.model import resolve_dtype
            from thinkless.train.vllm_rollout import start_engine

            try:
                generation = GenerationConfig.from_pretrained(self.path)
            except OSError:  # a model without generation_config.json: the tokenizer's EOS alone
                generation = None
            self.stops = stop_token_ids(type("M", (), {"generation_config": generation})(), self.tokenizer)
            AutoConfig.from_pretrained(self.path)  # a folder without a model config fails here, named
            dtype = str(resolve_dtype(config.model.dtype, device)).removeprefix("torch.")
            self.llm, _ = start_engine(
                self.path, self.rollout, dtype=dtype, max_model_len=config.data.max_prompt_tokens
                + self.rollout.max_new_tokens, seed=config.trainer.seed, sleep=False,
            )  # fmt: skip
        else:
            self.model = load_model(self.path, self.tokenizer, config, device, trainable=False, what=what)
            self.stops = stop_token_ids(self.model, self.tokenizer)

    def sample(self, problems: list[Problem], seed: int) -> list[list[tuple[str, bool]]]:
        from thinkless.train.rollout import generate
        from thinkless.train.run import seed_everything
        from thinkless.train.vllm_rollout import sample

        pairs = [teacher_prompt(self.tokenizer, p.problem, self.config.data) for p in problems]
        prompts, opened = [q for q, _ in pairs], [o for _, o in pairs]
        if self.llm is not None:  # one call per shard, a seed per request: vLLM batches as it likes
            seeds = [(seed + i) % 2**31 for i in range(len(problems))]
            parts = [sample(self.llm, self.tokenizer, list(prompts), self.rollout, self.stops, "cpu", seeds)]
        else:
            seed_everything(seed)
            step = self.config.trainer.batch_size
            parts = [
                generate(self.model, self.tokenizer, list(prompts[i : i + step]), self.rollout)
                for i in range(0, len(prompts), step)
            ]
        n, out = self.rollout.n, []
        for ro in parts:
            P = ro.prompt_width
            for row, mask in zip(ro.input_ids[:, P:].tolist(), ro.response_mask[:, P:].tolist(), strict=True):
                tokens = [t for t, m in zip(row, mask, strict=True) if m]
                out.append(decode_response(self.tokenizer, tokens, self.stops))
        per_problem = [out[i * n : (i + 1) * n] for i in range(len(problems))]
        wrap = think_response if self.side == "think" else lambda text, opened: short_response(text)
        return [[(wrap(t, o), s) for t, s in samples] for samples, o in zip(per_problem, opened, strict=True)]

    def close(self) -> None:
        if self.llm is not None:
            from thinkless.train.vllm_rollout import close_engine

            close_engine(self.llm)
        self.model = self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- shards -------------------------------------------------------------------------------------------------------


def side_settings(side: str, config) -> dict:
    """What a side's samples depend on: a shard written with other settings is not this run's."""
    d, data = config.distill, config.data
    if side == "think" and d.think_file:
        file = Path(d.think_file)
        return {"think_file": str(file.resolve()), "bytes": file.stat().st_size,
                "think_problem_key": d.think_problem_key, "think_response_key": d.think_response_key}  # fmt: skip
    return {
        "model": getattr(d, f"{side}_model"), "n": getattr(d, f"{side}_n"),
        "temperature": getattr(d, f"{side}_temperature"), "top_p": getattr(d, f"{side}_top_p"),
        "max_tokens": getattr(d, f"{side}_max_tokens"), "engine": config.rollout.engine,
        "instruction": data.instruction, "instruction_position": data.instruction_position,
        "seed": config.trainer.seed, "shard_size": d.shard_size,
        **({"batch_size": config.trainer.batch_size} if config.rollout.engine == "hf" else {}),
    }  # fmt: skip


def shard_path(out: Path, side: str, k: int) -> Path:
    return out / side / f"part-{k:05d}.json"


def read_shard(path: Path, settings: dict, digest: str) -> list | None:
    """A shard's samples when it is done and this run's; None when it is not there (or half written)."""
    if not path.is_file():
        return None
    try:
        shard = json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"thinkless distill: {path} is unreadable; it is generated again")
        return None
    for key, value in settings.items():
        if shard["settings"].get(key) != value:
            raise ConfigError(
                f"{path} was written with {key}={shard['settings'].get(key)!r}, this run has {value!r}: give "
                "trainer.output_dir a new folder, or delete that folder's think/ or short/ to generate it again"
            )
    if shard["problems_digest"] != digest:
        raise ConfigError(
            f"{path} holds other problems than this run's shard (data.train_files, data.val_files or "
            "distill.limit changed?): give trainer.output_dir a new folder"
        )
    return shard["samples"]


def write_atomic(path: Path, write) -> None:
    """`write(tmp)`, then renamed: a killed run never leaves half a file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_rows(path: Path, rows: list[dict], fmt: str) -> None:
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("problem", pa.string()), ("response", pa.string())])
        write_atomic(path, lambda tmp: pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp))
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def sft_rows(problems: list[Problem], think: list, short: list, distill) -> tuple[list[dict], list[dict]]:
    """The SFT rows of a shard (per problem: its think rows, then its short rows) and per problem what it kept."""
    rows, kept = [], []
    limit = distill.keep_per_mode or None
    for p, t, s in zip(problems, think, short, strict=True):
        good = {side: [r for r, v in per if v == "correct"][:limit] for side, per in (("think", t), ("short", s))}
        if distill.require_both and not (good["think"] and good["short"]):
            kept.append({"think": [], "short": [], "solved": {m: bool(good[m]) for m in good}})
            continue
        rows += [{"problem": p.problem, "response": r} for side in SIDES for r in good[side]]
        kept.append({**good, "solved": {m: bool(good[m]) for m in good}})
    return rows, kept


# -- the run ------------------------------------------------------------------------------------------------------


def _check(config) -> None:
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
    if d.think_file and not Path(d.think_file).is_file():
        raise DataError(f"{d.think_file}: no such file (distill.think_file)")


def _device(config) -> torch.device:
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


def run_distill(config) -> dict | None:
    """Generate what is missing, then (the last process to finish) the hybrid file and the report."""
    from thinkless.train.run import check_output_dir

    _check(config)
    check_output_dir(config, "distill")
    problems, counts = gather_problems(config)
    think_file = None
    if config.distill.think_file:
        wanted = {problem_key(p.problem) for p in problems}
        think_file, in_file = read_think_file(config.distill.think_file, config.distill, wanted)
        matched = len(think_file)
        counts["think_file"] = {"problems": in_file, "matched": matched}
        if not matched:
            raise DataError(f"{config.distill.think_file}: none of its {in_file} problems is one of "
                            f"data.train_files' (matched by text, whitespace aside)")  # fmt: skip
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(config.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        config.save(out / "config.yaml")
    size = config.distill.shard_size
    shards = [problems[i : i + size] for i in range(0, len(problems), size)]
    digests = [problems_digest(s) for s in shards]
    settings = {side: side_settings(side, config) for side in SIDES}
    mine = list(range(rank, len(shards), world))
    device = _device(config)
    for s, side in enumerate(SIDES):
        todo = [k for k in mine if read_shard(shard_path(out, side, k), settings[side], digests[k]) is None]
        if not todo:
            continue
        teacher = None if (side == "think" and think_file is not None) else Teacher(side, config, device)
        bar = tqdm(total=sum(len(shards[k]) for k in todo), desc=f"distill {side}", unit="problem",
                   disable=rank != 0)  # fmt: skip
        solved = total = 0
        try:
            for k in todo:
                seed = config.trainer.seed + s * SEED_STRIDE**2 + k * SEED_STRIDE
                if teacher is None:
                    samples = [[(r, True) for r in think_file.get(problem_key(p.problem), [])] for p in shards[k]]
                else:
                    samples = teacher.sample(shards[k], seed)
                judged = [
                    [(r, verdict(r, p.answer, stopped, config.rewards)) for r, stopped in per]
                    for p, per in zip(shards[k], samples, strict=True)
                ]  # fmt: skip
                shard = {"settings": settings[side], "problems_digest": digests[k], "samples": judged}
                text = json.dumps(shard, ensure_ascii=False)
                write_atomic(shard_path(out, side, k), lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
                if side == "short":  # both sides of shard k are done: its SFT rows
                    think = read_shard(shard_path(out, "think", k), settings["think"], digests[k])
                    rows, _ = sft_rows(shards[k], think, judged, config.distill)
                    write_rows(out / "data" / f"part-{k:05d}.{config.distill.format}", rows, config.distill.format)
                solved += sum(any(v == "correct" for _, v in per) for per in judged)
                total += len(judged)
                bar.update(len(judged))
                bar.set_postfix(solved=f"{solved / max(total, 1):.2f}")
        finally:
            bar.close()
            if teacher is not None:
                teacher.close()
    return finish(config, out, shards, digests, settings, counts)


class RowWriter:
    """The hybrid file, written shard by shard under a temporary name and renamed when whole (a million rows never
    sit in memory; a killed merge leaves no half file under the real name)."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.schema = pa.schema([("problem", pa.string()), ("response", pa.string())])
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        else:
            self.file = self.tmp.open("w", encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        if self.fmt == "parquet":
            import pyarrow as pa

            self.writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))
        else:
            self.file.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    def close(self, keep: bool) -> None:
        (self.writer if self.fmt == "parquet" else self.file).close()
        if keep:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def finish(config, out: Path, shards: list, digests: list, settings: dict, counts: dict) -> dict | None:
    """Once every shard of both sides is done: the SFT row shards, the hybrid file and the report, streamed from
    the shards alone (so that any process, or a rerun with other keep settings, rebuilds the same). None while some
    shard is not done."""
    from thinkless.train.distill_report import Tally

    missing = [f"{side}/part-{k:05d}" for k in range(len(shards)) for side in SIDES
               if not shard_path(out, side, k).is_file()]  # fmt: skip
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
            think = read_shard(shard_path(out, "think", k), settings["think"], digests[k])
            short = read_shard(shard_path(out, "short", k), settings["short"], digests[k])
            if think is None or short is None:
                print(f"thinkless distill: shard {k} is unreadable; run the command again to generate it")
                return None
            rows, kept = sft_rows(problems, think, short, config.distill)
            write_rows(out / "data" / f"part-{k:05d}.{fmt}", rows, fmt)
            writer.write(rows)
            tally.add(think, short, kept, rows)
        done = True
    finally:
        writer.close(keep=done)
    for stale in (out / "data").glob("part-*"):  # shards of an earlier, larger run: not this file's rows
        if int(stale.name[5:10]) >= len(shards) or not stale.name.endswith(f".{fmt}"):
            stale.unlink()
    other = out / f"hybrid.{'parquet' if fmt == 'jsonl' else 'jsonl'}"
    other.unlink(missing_ok=True)  # the other format's, now stale
    return tally.write(out, counts)
