"""Rewards of the Thinkless recipe: the mode from the first generated token, the answer from the last \\boxed{}.

    correct <short>  rewards.correct_short (1.0)     the cheap mode, right: the best outcome
    correct <think>  rewards.correct_think (0.5)     right, but it paid for a long chain of thought
    wrong            rewards.wrong (-1.0)            either mode; also when there is no \\boxed{} answer
    no control token rewards.format_error (-1.0)    the response does not open with <short> or <think>

Answers are compared with math-verify (`parse` + `verify`), which treats \\frac{1}{2} and 0.5, tuples, intervals
and units the way graders do.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

SHORT, THINK, THINK_END = "<short>", "<think>", "</think>"
CONTROL_TOKENS = (SHORT, THINK)


@dataclass(frozen=True)
class Score:
    mode: str | None  # "short", "think", or None when the response has no control token
    correct: bool
    reward: float
    answer: str | None  # the content of the last \boxed{}, if any


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in text, braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # \boxed 5: the rest of the word
        end = i
        while end < len(text) and not text[end].isspace() and text[end] != "$":
            end += 1
        return text[i:end] or None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the response was cut off inside its answer


def check_answer(predicted: str, reference: str) -> bool:
    """Whether a predicted final answer equals the reference one, by math-verify (string equality as a fallback)."""
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
    pred = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
    if gold and pred and verify(gold, pred, timeout_seconds=timeout):
        return True
    normalize = lambda s: "".join(s.split()).rstrip(".")  # noqa: E731
    return normalize(predicted) == normalize(reference)


def mode_of_text(response: str) -> str | None:
    """The mode a response's text opens with: "short", "think", or None."""
    head = response.lstrip()
    if head.startswith(SHORT):
        return "short"
    if head.startswith(THINK):
        return "think"
    return None


def mode_of_token(first_token: int, short_id: int, think_id: int) -> str | None:
    """The mode from the first generated token id, as the policy chose it."""
    return "short" if first_token == short_id else "think" if first_token == think_id else None


def score(response: str, reference: str, mode: str | None, table) -> Score:
    """The reward of one response; `table` has correct_short, correct_think, wrong, format_error (RewardsConfig)."""
    answer = last_boxed(response)
    if mode is None:
        return Score(None, False, float(table.format_error), answer)
    correct = answer is not None and check_answer(answer, reference)
    if not correct:
        return Score(mode, False, float(table.wrong), answer)
    return Score(mode, True, float(table.correct_short if mode == "short" else table.correct_think), answer)
