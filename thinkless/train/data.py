"""Training and evaluation data: files read through `datasets`, rows checked before any training, chat prompts.

RL and eval rows follow the DeepScaleR layout, `{"problem": ..., "answer": ...}` (key names in `data.*_key`).
SFT rows are `{"problem": ..., "response": ...}` or a chat `{"messages": [{"role", "content"}, ...]}` whose last
turn is the assistant's; every response opens with its control token, `<short>` or `<think>`.

The usual benchmark layouts load as they are (`data.problem_key=auto`, `data.answer_key=auto`,
`data.answer_format=auto`):

    DeepScaleR, MATH-500, AIME  {"problem", "answer": "72"}                         the answer as it is
    GSM8K                       {"question", "answer": "... #### 1,234"}            after the last ####: "1234"
    MATH (hendrycks)            {"problem", "solution": "... \\boxed{72}.", "type"}  the last \\boxed{}: "72"

`auto` keys take the first column a row has: problem, then question; answer, then solution. `auto` format reads
the answer text: `####` means GSM8K, `\\boxed` (or `\\fbox`) a worked solution, anything else the answer itself
(stripped); a solution that `auto` fell back to must hold one of the two markers (a whole solution is never a
reference). A list of accepted answers (Minerva's) gives its first: the scorer takes one reference.
`data.filter_key=type data.filter_values=[Algebra]` keeps the rows of one subset (MATH's Algebra is the paper's
"Minerva Algebra"); values match whole and case-insensitively.

The user turn is the problem and `data.instruction`, placed by `data.instruction_position`: `after` (problem,
space, instruction), `before` (instruction, newline, problem: the authors' lm-eval prompt) or `none` (the problem
alone: the authors' RL prompt, DeepScaleR's).

A bad row stops the run before it starts, with the file, the row (counting from 0) and what is wrong.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from thinkless.modes import THINK, mode_of_text
from thinkless.train.rewards import last_boxed

if TYPE_CHECKING:
    from thinkless.train.config import Config


FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# The columns an `auto` key tries, in order: DeepScaleR / MATH first, then GSM8K's question, MATH's solution.
AUTO_KEYS = {"problem_key": ("problem", "question"), "answer_key": ("answer", "solution")}


class DataError(ValueError):
    """A user mistake in the data: the CLI prints it as one line, without a traceback."""


@dataclass(frozen=True)
class Example:
    prompt: str  # the chat-formatted prompt, ending where the model starts its answer
    answer: str = ""  # RL / eval: the reference final answer
    response: str = ""  # SFT: the target response, opening with its control token
    source: str = ""  # "<file>:<row>", for messages and reports
    tag: str = ""  # RL: the value of `data.tag_key` (e.g. a level), which splits the metrics


def _table(path: str | Path):
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    import logging

    import datasets

    # datasets logs a malformed file's traceback before raising; the one line below says it for the user.
    logger, level = logging.getLogger("datasets"), logging.getLogger("datasets").level
    logger.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types for malformed files
        raise DataError(diagnose(path) or f"{path}: cannot be read as {kind}: {type(err).__name__}: {err}") from None
    finally:
        logger.setLevel(level)


def diagnose(path: Path) -> str | None:
    """What is wrong with a json / jsonl file that `datasets` could not read (or decode), as the user will fix it:
    the byte that is not UTF-8, the line whose JSON is broken. None when nothing is found."""
    if FORMATS.get(path.suffix.lower()) != "json":
        return None
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        return f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8"
    if not text.strip():
        return f"{path}: the file is empty"
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                column = getattr(err, "colno", "?")
                return f"{path}: line {n}: invalid JSON: {getattr(err, 'msg', err)} (column {column})"
            if not isinstance(row, dict):
                return f"{path}: line {n}: a row must be a JSON object {{...}}, got {type(row).__name__}"
        return None
    try:
        rows = json.loads(text)
    except ValueError as err:
        return f"{path}: line {getattr(err, 'lineno', '?')}: invalid JSON: {getattr(err, 'msg', err)}"
    if isinstance(rows, list) and not rows:
        return f"{path}: the file holds no rows ([])"
    if isinstance(rows, list) and not all(isinstance(r, dict) for r in rows):
        i = next(i for i, r in enumerate(rows) if not isinstance(r, dict))
        return f"{path}: row {i}: a row must be a JSON object {{...}}, got {type(rows[i]).__name__}"
    return None


def read_rows(path: str | Path) -> list[dict]:
    """All rows of a json, jsonl or parquet file, through `datasets` (as a user's own loading code would)."""
    table = _table(path)
    try:
        return table.to_list()
    except (UnicodeDecodeError, ValueError) as err:  # pyarrow decodes strings only here
        raise DataError(diagnose(Path(path)) or f"{path}: cannot be read: {type(err).__name__}: {err}") from None


def iter_rows(path: str | Path):
    """The rows of a file one by one, from `datasets`' memory-mapped table: a file of long traces larger than
    memory is read without holding it."""
    table = _table(path)
    for start in range(0, len(table), 1000):
        try:
            batch = table[start : start + 1000]
        except (UnicodeDecodeError, ValueError) as err:
            raise DataError(diagnose(Path(path)) or f"{path}: cannot be read: {type(err).__name__}: {err}") from None
        yield from _batch_rows(batch)


def _batch_rows(batch: dict) -> list[dict]:
    columns = list(batch)
    return [dict(zip(columns, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def _text(row: dict, key: str, where: str, accept_list: bool = False) -> str:
    if key not in row or row[key] is None:
        present = ", ".join(str(k) for k, v in row.items() if v is not None) or "nothing"
        raise DataError(f"{where}: missing {key!r} (the row has: {present})")
    value = row[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # numeric answers, e.g. 42
    if accept_list and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]  # accepted answers (Minerva's); the first is the canonical one
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {key!r} must be non-empty text, got {value!r}")
    return value


def _column(row: dict, setting: str, key: str) -> str:
    """The column `data.<setting>` names in this row: the key itself, or for `auto` the first of AUTO_KEYS present
    (the first when none is: its error message then names the usual column)."""
    if key != "auto":
        return key
    options = AUTO_KEYS[setting]
    return next((k for k in options if row.get(k) is not None), options[0])


def _field(row: dict, setting: str, key: str, where: str) -> tuple[str, str]:
    """(column, text) of `data.<setting>` in this row; a missing column names what `auto` looked for."""
    column = _column(row, setting, key)
    try:
        return column, _text(row, column, where, accept_list=setting == "answer_key")
    except DataError as err:
        if key == "auto" and row.get(column) is None:
            options = " or ".join(repr(k) for k in AUTO_KEYS[setting])
            raise DataError(f"{err}; data.{setting}=auto looks for {options}") from None
        raise


def final_answer(text: str, fmt: str, where: str, key: str, solution: bool = False) -> str:
    """The reference final answer in `text` by `data.answer_format` (auto, plain, gsm8k, boxed).

    gsm8k: after the last `####`, commas dropped (`#### 1,234` -> `1234`), as lm-eval's gsm8k target. boxed: the
    content of the last \\boxed{} (braces balanced), as lm-eval's MATH tasks. auto picks by the text itself;
    `solution` (`data.answer_key=auto` fell back to a solution column) requires one of the two markers."""
    if fmt == "auto":
        fmt = "gsm8k" if "####" in text else "boxed" if ("\\boxed" in text or "\\fbox" in text) else "plain"
        if fmt == "plain" and solution:
            raise DataError(f"{where}: {key!r} is a solution without a final answer (no \\boxed{{}} and no ####)")
    if fmt == "gsm8k":
        if "####" not in text:
            raise DataError(f"{where}: {key!r} has no '#### <answer>' (data.answer_format=gsm8k)")
        answer = text.rsplit("####", 1)[1].replace(",", "").strip()
    elif fmt == "boxed":
        answer = last_boxed(text)
        if answer is None:
            raise DataError(f"{where}: {key!r} has no complete \\boxed{{...}} (data.answer_format=boxed)")
        answer = answer.strip()
    else:
        answer = text.strip()
    if not answer:
        raise DataError(f"{where}: {key!r} gives an empty final answer (data.answer_format={fmt})")
    return answer


def _kept(rows: list[dict], file: str, data) -> list[tuple[int, dict]]:
    """(row index, row) of the rows `data.filter_key` / `data.filter_values` keep (all rows without a filter)."""
    if not data.filter_key:
        return list(enumerate(rows))
    wanted = {v.strip().lower() for v in data.filter_values}
    kept, seen = [], set()
    for i, row in enumerate(rows):
        value = row.get(data.filter_key)
        if value is None:
            raise DataError(f"{file}: row {i}: missing {data.filter_key!r} (data.filter_key)")
        seen.add(str(value))
        if str(value).strip().lower() in wanted:
            kept.append((i, row))
    if not kept:
        found = ", ".join(sorted(seen)[:20]) or "no rows"
        raise DataError(
            f"{file}: no row has {data.filter_key} in {data.filter_values} (data.filter_values); the file has: {found}"
        )
    return kept


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat template's prompt for `messages`, ready for the assistant's turn, and free to choose its mode.

    Some templates (DeepSeek-R1-Distill's) open a `<think>` block in the generation prompt themselves; that would
    decide the mode for the model, so it is cut off. A tokenizer without a template gets the plain turns.
    """
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt = "".join(f"{m['content']}\n" for m in messages)
    stripped = prompt.rstrip()
    if stripped.endswith(THINK):
        prompt = stripped[: -len(THINK)]
    return prompt


def user_turn(problem: str, instruction: str, position: str = "after") -> list[dict]:
    """The user's message (`data.instruction_position`): after keeps the trainer's first layout; before is the
    authors' evaluation prompt, f"{instruction}\\n{problem}" exactly; none is their RL prompt, the problem alone."""
    if position == "none" or not instruction:
        content = problem if position != "after" else problem.strip()
    elif position == "before":
        content = f"{instruction}\n{problem}"
    else:
        content = f"{problem.strip()} {instruction}".strip()
    return [{"role": "user", "content": content}]


def _files(files: list[str], what: str) -> list[str]:
    if not files:
        raise DataError(f"{what} is empty: give json, jsonl or parquet files, e.g. {what}=[train.json]")
    return files


@dataclass(frozen=True)
class Problem:
    """A problem as its file holds it: the text, the reference final answer, and where it came from."""

    problem: str
    answer: str
    source: str  # "<file>:<row>"
    tag: str = ""


def read_problems(
    files: list[str], data, what: str = "data.train_files", unanswered: list[str] | None = None
) -> list[Problem]:
    """The problems of these files by `data` (problem_key, answer_key, answer_format, filter_key/values, tag_key),
    every row checked. `unanswered`: a list that collects the rows without an answer (null, missing or empty), which are
    then skipped instead of stopping the run (the distill stage: nothing to verify them against)."""
    out = []
    for file in _files(files, what):
        for i, row in _kept(read_rows(file), file, data):
            problem = problem_of_row(row, f"{file}: row {i}", f"{file}:{i}", data, unanswered)
            if problem is not None:
                out.append(problem)
    return out


def problem_of_row(row: dict, where: str, source: str, data, unanswered: list[str] | None = None) -> Problem | None:
    """One row as a Problem, or a DataError that says `where` and what is wrong (None: skipped, unanswered)."""
    _, problem = _field(row, "problem_key", data.problem_key, where)
    value = row.get(_column(row, "answer_key", data.answer_key))
    if unanswered is not None and (value is None or (isinstance(value, str) and not value.strip())):
        unanswered.append(where)
        return None
    column, text = _field(row, "answer_key", data.answer_key, where)
    fallback = data.answer_key == "auto" and column != AUTO_KEYS["answer_key"][0]  # a whole solution
    answer = final_answer(text, data.answer_format, where, column, solution=fallback)
    tag = _text(row, data.tag_key, where) if data.tag_key else ""
    return Problem(problem, answer, source, tag)


def read_problem_texts(files: list[str], data, what: str) -> list[tuple[str, str]]:
    """(source, problem text) of every row of these files, by `data.problem_key` alone: a file read only for its
    problems (the distill stage's contamination guard) needs no answer column."""
    out = []
    for file in _files(files, what):
        for i, row in enumerate(read_rows(file)):
            where = f"{file}: row {i}"
            out.append((f"{file}:{i}", _field(row, "problem_key", data.problem_key, where)[1]))
    return out


def load_problems(files: list[str], tokenizer, config: Config, what: str = "data.train_files") -> list[Example]:
    """RL / eval examples from `config.data` (problem_key, answer_key, answer_format, filter, instruction)."""
    data = config.data
    return [
        Example(
            prompt=chat_prompt(tokenizer, user_turn(p.problem, data.instruction, data.instruction_position)),
            answer=p.answer,
            source=p.source,
            tag=p.tag,
        )  # fmt: skip
        for p in read_problems(files, data, what)
    ]


def fitting_prompts(examples: list[Example], tokenizer, limit: int, what: str) -> list[Example]:
    """The examples whose prompt is at most `limit` tokens (`data.max_prompt_tokens`); the others are dropped, with a
    count in the log. `what` names the examples' files in the messages; none left is a DataError."""
    kept = [e for e in examples if len(tokenizer(e.prompt, add_special_tokens=False)["input_ids"]) <= limit]
    if len(kept) < len(examples):
        print(f"thinkless: {what}: dropped {len(examples) - len(kept)} of {len(examples)} prompts longer than {limit} "
              "tokens")  # fmt: skip
    if not kept:
        raise DataError(f"{what}: no prompt fits data.max_prompt_tokens={limit}")
    return kept


def sft_example_of_row(row: dict, where: str, source: str, tokenizer, data) -> Example:
    """One SFT row as an Example, or a DataError that says `where` and what is wrong."""
    if row.get(data.messages_key) is not None:
        messages = row[data.messages_key]
        turns_ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )  # fmt: skip
        if not turns_ok:
            raise DataError(f"{where}: {data.messages_key!r} must be a list of {{role, content}} turns (text each)")
        if messages[-1].get("role") != "assistant" or len(messages) < 2:
            raise DataError(
                f"{where}: {data.messages_key!r} must end with the assistant's turn, after at least one other"
            )
        response = _text(messages[-1], "content", f"{where}, last turn")
        try:
            prompt = chat_prompt(tokenizer, messages[:-1])
        except Exception as err:  # a chat template rejects turns it does not know (roles, order): jinja's errors
            raise DataError(f"{where}: the chat template refuses these turns: {type(err).__name__}: {err}") from None
    else:
        _, problem = _field(row, "problem_key", data.problem_key, where)
        response = _text(row, data.response_key, where)
        prompt = chat_prompt(tokenizer, user_turn(problem, data.instruction, data.instruction_position))
    if mode_of_text(response) is None:
        raise DataError(f"{where}: the response must open with <short> or <think>, got {response[:40]!r}...")
    return Example(prompt=prompt, response=response.lstrip(), source=source)


def load_sft(files: list[str], tokenizer, config: Config) -> list[Example]:
    """Warm-up examples: a prompt and a response that opens with `<short>` or `<think>`."""
    data = config.data
    out = []
    for file in _files(files, "data.train_files"):
        for i, row in _kept(read_rows(file), file, data):
            out.append(sft_example_of_row(row, f"{file}: row {i}", f"{file}:{i}", tokenizer, data))
    if not out:
        warnings.warn(f"no SFT examples in {files}", stacklevel=2)
    return out
