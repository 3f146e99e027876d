"""Training and evaluation data: files read through `datasets`, rows checked before any training, chat prompts.

RL and eval rows follow the DeepScaleR layout, `{"problem": ..., "answer": ...}` (key names in `data.*_key`).
SFT rows are `{"problem": ..., "response": ...}` or a chat `{"messages": [{"role", "content"}, ...]}` whose last
turn is the assistant's; every response opens with its control token, `<short>` or `<think>`.

A bad row stops the run before it starts, with the file, the row (counting from 0) and what is wrong.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from thinkless.train.rewards import THINK, mode_of_text

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A user mistake in the data: the CLI prints it as one line, without a traceback."""


@dataclass(frozen=True)
class Example:
    prompt: str  # the chat-formatted prompt, ending where the model starts its answer
    answer: str = ""  # RL / eval: the reference final answer
    response: str = ""  # SFT: the target response, opening with its control token
    source: str = ""  # "<file>:<row>", for messages and reports
    tag: str = ""  # RL: the value of `data.tag_key` (e.g. a level), which splits the metrics


def read_rows(path: str | Path) -> list[dict]:
    """All rows of a json, jsonl or parquet file, through `datasets` (as a user's own loading code would)."""
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    import datasets

    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types for malformed files
        raise DataError(f"{path}: cannot be read as {kind}: {type(err).__name__}: {err}") from None
    return table.to_list()


def _text(row: dict, key: str, where: str) -> str:
    if key not in row or row[key] is None:
        present = ", ".join(str(k) for k, v in row.items() if v is not None) or "nothing"
        raise DataError(f"{where}: missing {key!r} (the row has: {present})")
    value = row[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # numeric answers, e.g. 42
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {key!r} must be non-empty text, got {value!r}")
    return value


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


def user_turn(problem: str, instruction: str) -> list[dict]:
    return [{"role": "user", "content": f"{problem.strip()} {instruction}".strip()}]


def _files(files: list[str], what: str) -> list[str]:
    if not files:
        raise DataError(f"{what} is empty: give json, jsonl or parquet files, e.g. {what}=[train.json]")
    return files


def load_problems(files: list[str], tokenizer, config, what: str = "data.train_files") -> list[Example]:
    """RL / eval examples from `config.data` (problem_key, answer_key, instruction)."""
    data = config.data
    files = _files(files, what)
    out = []
    for file in files:
        for i, row in enumerate(read_rows(file)):
            where = f"{file}: row {i}"
            problem, answer = _text(row, data.problem_key, where), _text(row, data.answer_key, where)
            tag = _text(row, data.tag_key, where) if data.tag_key else ""
            prompt = chat_prompt(tokenizer, user_turn(problem, data.instruction))
            out.append(Example(prompt=prompt, answer=answer, source=f"{file}:{i}", tag=tag))
    return out


def load_sft(files: list[str], tokenizer, config) -> list[Example]:
    """Warm-up examples: a prompt and a response that opens with `<short>` or `<think>`."""
    data = config.data
    out = []
    for file in _files(files, "data.train_files"):
        for i, row in enumerate(read_rows(file)):
            where = f"{file}: row {i}"
            if row.get(data.messages_key) is not None:
                messages = row[data.messages_key]
                if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                    raise DataError(f"{where}: {data.messages_key!r} must be a list of {{role, content}} turns")
                if messages[-1].get("role") != "assistant" or len(messages) < 2:
                    raise DataError(
                        f"{where}: {data.messages_key!r} must end with the assistant's turn, after at least one other"
                    )
                response = _text(messages[-1], "content", f"{where}, last turn")
                prompt = chat_prompt(tokenizer, messages[:-1])
            else:
                problem = _text(row, data.problem_key, where)
                response = _text(row, data.response_key, where)
                prompt = chat_prompt(tokenizer, user_turn(problem, data.instruction))
            if mode_of_text(response) is None:
                raise DataError(f"{where}: the response must open with <short> or <think>, got {response[:40]!r}...")
            out.append(Example(prompt=prompt, response=response.lstrip(), source=f"{file}:{i}"))
    if not out:
        warnings.warn(f"no SFT examples in {files}", stacklevel=2)
    return out
