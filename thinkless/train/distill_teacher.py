"""The distill stage's answers: the teachers that write them, how their tags become ours, and the verdict on each.

A teacher is one generating model on one of the RL engines (`rollout.engine`: hf `generate`, or vLLM in its own
engine process, so that its GPU memory is released when it closes and the other side's engine can start). It
writes each problem's answers with its own chat template; `distill.{side}_template_args` pass options to that
template (Qwen3: `[enable_thinking=false]` for the short side).

    think side   text -> `think_response`: the template's opened "<think>\\n" (R1-Distill's) put back in front;
                 OpenThoughts-114k's <|begin_of_thought|> / <|end_of_thought|> -> <think> / </think>
    short side   text -> `short_response`: "<short>\\n" in front, an empty leading <think></think> block removed

`verdict` then judges each answer with `rewards.score`, the RL reward's own function.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from typing import TYPE_CHECKING

import torch
import yaml

from thinkless.modes import SHORT, THINK, THINK_END, mode_of_text
from thinkless.train.config import ConfigError
from thinkless.train.data import DataError, Problem, iter_rows, user_turn
from thinkless.train.model import text_decoder
from thinkless.train.rewards import score

if TYPE_CHECKING:
    from thinkless.train.config import Config


# OpenThoughts-114k (Bespoke-Stratos) marks its thinking and its solution with these.
THOUGHT_TAGS = {"<|begin_of_thought|>": THINK, "<|end_of_thought|>": THINK_END}
SOLUTION_TAGS = ("<|begin_of_solution|>", "<|end_of_solution|>")
# The instruction OpenThoughts-114k / Bespoke-Stratos put before every problem of their user turns.
KNOWN_INSTRUCTIONS = ("Return your final response within \\boxed{}.",)
VERDICTS = ("correct", "wrong", "format_error", "thinking", "truncated")


def problem_key(text: str) -> str:
    """Problems that differ only in whitespace are the same problem (dedup, contamination guard, think file)."""
    return " ".join(text.split())


# -- normalising and judging ----------------------------------------------------------------------------------


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


def short_response(text: str) -> str:
    """An instruct model's answer with `<short>` first (an empty leading think block, as Qwen3 writes without
    thinking, removed). An answer that still holds a think tag is kept as it is: `verdict` calls it thinking."""
    text = text.strip()
    if text.startswith(THINK) and THINK_END in text and not text[len(THINK) : text.index(THINK_END)].strip():
        text = text[text.index(THINK_END) + len(THINK_END) :].strip()
    return f"{SHORT}\n{text}"


def verdict(response: str, answer: str, stopped: bool, rewards) -> str:
    """One answer's verdict, by `rewards.score` (the RL reward) on the response with its control token first:

    correct; wrong (a boxed answer where RL reads one, not the reference); format_error (none there: a think answer
    without </think>, or no box); thinking (a short answer with a think tag in it: not a short answer); truncated
    (cut off at the max tokens: a box before the cut is no finished answer)."""
    if not stopped:
        return "truncated"
    mode = mode_of_text(response)
    if mode == "short" and any(tag in response[len(SHORT) :] for tag in (SHORT, THINK, THINK_END)):
        return "thinking"
    result = score(response, answer, mode, rewards)
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


def trace_problem_key(text: str, instruction: str) -> str:
    """The problem of a think file's user turn, keyed: without an instruction the file put around it (the known
    ones, and `data.instruction`, before or after the problem)."""
    key = problem_key(text)
    for known in (*KNOWN_INSTRUCTIONS, instruction):
        known = problem_key(known)
        if known and key.startswith(known):
            key = key[len(known) :].strip()
        if known and key.endswith(known):
            key = key[: -len(known)].strip()
    return key


def think_files(path: str) -> list[str]:
    """The files `distill.think_file` names: one, or a glob pattern (OpenThoughts2-1M ships as parquet shards)."""
    import glob

    if not glob.has_magic(path):
        return [path]
    files = sorted(glob.glob(path))
    if not files:
        raise DataError(f"{path}: no file matches (distill.think_file)")
    return files


def _trace_rows(path: str):
    for file in think_files(path):
        for i, row in enumerate(iter_rows(file)):
            yield file, i, row


def read_think_file(path: str, config: Config, wanted: set[str] | None = None) -> tuple[dict[str, list[str]], int]:
    """problem key (`trace_problem_key`) -> the file's long responses to it, in file order, normalised
    (`think_response`), for the problems in `wanted` (all when None); and how many problems the file holds (a glob
    pattern: the files it matches, in name order). Rows are read one by one: a
    million traces are not held, only those of the problems asked for."""
    distill = config.distill
    out: dict[str, list[str]] = {}
    problems: set[str] = set()
    for file, i, row in _trace_rows(path):
        where = f"{file}: row {i}"
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
        key = trace_problem_key(texts[0], config.data.instruction)
        problems.add(key)
        if wanted is None or key in wanted:
            out.setdefault(key, []).append(think_response(texts[1]))
    return out, len(problems)


# -- teachers ---------------------------------------------------------------------------------------------------


def template_args(config: Config, side: str) -> dict:
    """`distill.{side}_template_args` ([key=value, ...]) as the chat template's keyword arguments."""
    out = {}
    for item in getattr(config.distill, f"{side}_template_args"):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ConfigError(f"distill.{side}_template_args: {item!r} must look like key=value, e.g. "
                              "enable_thinking=false")  # fmt: skip
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"distill.{side}_template_args: {item!r}: the value is not a YAML scalar") from None
    return out


def teacher_path(config: Config, side: str) -> str:
    """`distill.{side}_model` as a local folder or hub id (a .gguf converted), checked, errors naming the key."""
    from thinkless.train.model import ModelError, check_model_path
    from thinkless.train.run import resolve_model_path

    what = f"distill.{side}_model"
    given = getattr(config.distill, f"{side}_model")
    try:
        path = resolve_model_path(given)
    except ModelError as err:
        raise ModelError(str(err).replace("model.path", what)) from None
    check_model_path(path, what)
    return path


def check_context(path: str, config: Config, side: str) -> None:
    """data.max_prompt_tokens + distill.{side}_max_tokens must fit the model's positions (vLLM refuses a longer
    max_model_len; HF would generate past what the model was trained on)."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"distill.{side}_model={path!r}: not a model: {str(err).splitlines()[0]}") from None
    limit = getattr(model_config, "max_position_embeddings", None)
    need = config.data.max_prompt_tokens + getattr(config.distill, f"{side}_max_tokens")
    if isinstance(limit, int) and need > limit:
        raise ConfigError(
            f"data.max_prompt_tokens + distill.{side}_max_tokens = {need} is more than the {limit} positions of "
            f"distill.{side}_model={getattr(config.distill, f'{side}_model')!r}: lower one of them"
        )


def teacher_tokenizer(path: str, what: str = "distill.short_model"):
    """A generating model's own tokenizer, as it ships (no control tokens: the model has never seen them)."""
    from thinkless.train.model import checked_tokenizer

    tokenizer = checked_tokenizer(path, what)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def teacher_prompt(tokenizer, problem: str, data, args: dict | None = None) -> tuple[str, str]:
    """The model's chat prompt for a problem, and the part of a think block its template opened ("" if none)."""
    messages = user_turn(problem, data.instruction, data.instruction_position)
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(args or {}))
    else:
        prompt = "".join(f"{m['content']}\n" for m in messages)
    at = prompt.rfind(THINK)
    opened = prompt[at:] if at >= 0 and not prompt[at:].strip()[len(THINK) :].strip() else ""
    return prompt, opened


def decode_response(decode, tokens: list[int], stops: list[int]) -> tuple[str, bool]:
    """The text of generated tokens without their stop token (`decode`: a `model.text_decoder`, special tokens left
    out, the think tags kept), and whether they ended with one."""
    stopped = bool(tokens) and tokens[-1] in stops
    if stopped:
        tokens = tokens[:-1]
    return decode(tokens), stopped


class Teacher:
    """One generating model on one engine. `sample(problems, positions, seed)` gives each problem's
    [(response, stopped)], or None for a problem whose prompt is longer than `data.max_prompt_tokens`."""

    def __init__(self, side: str, config: Config, device: torch.device):
        from thinkless.train.model import load_model
        from thinkless.train.rollout import stop_token_ids

        d = config.distill
        what = f"distill.{side}_model"
        self.path = teacher_path(config, side)
        self.side, self.config, self.device = side, config, device
        self.args = template_args(config, side)
        self.rollout = dataclasses.replace(
            config.rollout, n=getattr(d, f"{side}_n"), temperature=getattr(d, f"{side}_temperature"),
            top_p=getattr(d, f"{side}_top_p"), max_new_tokens=getattr(d, f"{side}_max_tokens"),
        )  # fmt: skip
        self.tokenizer = teacher_tokenizer(self.path, what)
        self.model = self.llm = None
        if config.rollout.engine == "vllm":
            from transformers import GenerationConfig

            from thinkless.train.model import resolve_dtype
            from thinkless.train.vllm_rollout import start_engine

            try:
                generation = GenerationConfig.from_pretrained(self.path)
            except OSError:  # a model without generation_config.json: the tokenizer's EOS alone
                generation = None
            self.stops = stop_token_ids(type("M", (), {"generation_config": generation})(), self.tokenizer)
            dtype = str(resolve_dtype(config.model.dtype, device)).removeprefix("torch.")
            # Its own engine process (no weights to sync here): closing it gives its GPU memory back, which an
            # engine in this process does not (vllm-project/vllm#21073), and the other side's engine needs it.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
            self.llm, _ = start_engine(
                self.path, self.rollout, dtype=dtype, max_model_len=config.data.max_prompt_tokens
                + self.rollout.max_new_tokens, seed=config.trainer.seed, sleep=False, in_process=False,
            )  # fmt: skip
        else:
            self.model = load_model(self.path, self.tokenizer, config, device, trainable=False, what=what)
            self.stops = stop_token_ids(self.model, self.tokenizer)

    def sample(self, problems: list[Problem], positions: list[int], seed: int) -> list[list[tuple[str, bool]] | None]:
        """`positions`: each problem's place in its shard. vLLM: request i is seeded seed + position * n (vLLM
        seeds the n samples of a request seed + 0 .. n-1: no two samples share a stream). HF: the global RNGs are
        seeded with `seed`, then `trainer.batch_size` prompts per `generate`."""
        from thinkless.train.rollout import generate
        from thinkless.train.run import seed_everything
        from thinkless.train.vllm_rollout import sample

        n, limit = self.rollout.n, self.config.data.max_prompt_tokens
        pairs = [teacher_prompt(self.tokenizer, p.problem, self.config.data, self.args) for p in problems]
        fits = [len(self.tokenizer(q, add_special_tokens=False)["input_ids"]) <= limit for q, _ in pairs]
        todo = [i for i, ok in enumerate(fits) if ok]
        prompts = [pairs[i][0] for i in todo]
        parts = []
        if self.llm is not None and todo:  # one call per shard: vLLM batches as it likes
            seeds = [(seed + positions[i] * n) % 2**31 for i in todo]
            parts = [sample(self.llm, self.tokenizer, prompts, self.rollout, self.stops, "cpu", seeds)]
        elif todo:
            seed_everything(seed)
            step = self.config.trainer.batch_size
            parts = [generate(self.model, self.tokenizer, prompts[i : i + step], self.rollout)
                     for i in range(0, len(prompts), step)]  # fmt: skip
        texts, decode = [], text_decoder(self.tokenizer)
        for ro in parts:
            P = ro.prompt_width
            for row, mask in zip(ro.input_ids[:, P:].tolist(), ro.response_mask[:, P:].tolist(), strict=True):
                texts.append(decode_response(decode, [t for t, m in zip(row, mask, strict=True) if m], self.stops))
        out: list[list[tuple[str, bool]] | None] = [None] * len(problems)
        for j, i in enumerate(todo):
            opened = pairs[i][1]
            wrap = (lambda t, o=opened: think_response(t, o)) if self.side == "think" else short_response
            out[i] = [(wrap(t), s) for t, s in texts[j * n : (j + 1) * n]]
        return out

    def close(self) -> None:
        if self.llm is not None:
            from thinkless.train.vllm_rollout import close_engine

            close_engine(self.llm)
        self.model = self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
