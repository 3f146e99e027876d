"""Rewards of the Thinkless recipe: the mode from the first generated token, the answer from the last \\boxed{} of
the response's solution part.

Where the answer is read from (`solution_text`), after the authors' RewardMathFn.__call__ in
deepscaler/rewards/math_reward.py (VainF/Thinkless at aa225d2, lines 35-46):

    mode     solution part                                            no solution part
    <think>  the text after the first </think>, up to a second one    no </think> (cut off in its thinking)
    <short>  the whole response                                       -
    None     -                                                        always (no control token)

A \\boxed{} inside the thinking never counts. The answer is the last \\boxed{} of the solution part. (For <short> the
authors take the text after the first <short>, the same answer unless a second <short> follows it.)

    correct <short>   rewards.correct_short (1.0)    the cheap mode, right: the best outcome
    correct <think>   rewards.correct_think (0.5)    right, but it paid for a long chain of thought
    wrong             rewards.wrong (-1.0)           a \\boxed{} answer in the solution part that is wrong, either mode
    format error      rewards.format_error (-1.0)    no control token, a <think> response without </think>, or no
                                                     \\boxed{} answer in the solution part

The mode is the policy's first generated token (the `mode` argument of `score`), not a search of the text, so the
response text may come with or without its leading <short>/<think>.

Answers are compared with math-verify (`parse` + `verify`), which treats \\frac{1}{2} and 0.5, tuples, intervals
and units the way graders do. The box is read a little more leniently than the authors' `remove_boxed`, which
needs exactly `\\boxed{...}`: `\\boxed 5`, `\\boxed {5}` and `\\fbox{5}` count here too (there, a format error).

`eval_correct` is the other rule, that of the authors' evaluation scripts (scripts/eval/eval_math500.py): the last
\\boxed{} anywhere, the thinking included, else the last number. Their paper's table is scored that way
(`eval.scoring=authors`); training and validation use the reward's rule above.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from thinkless.modes import THINK_END

if TYPE_CHECKING:
    from thinkless.train.config import RewardsConfig


@dataclass(frozen=True)
class Score:
    mode: str | None  # "short", "think", or None when the response has no control token
    correct: bool
    reward: float
    answer: str | None  # the last \boxed{} of the solution part; None when there is none (a format error)


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


def solution_text(response: str, mode: str | None) -> str | None:
    """The part of a response its answer is read from; None when there is none, a format error.

    <think>: the text after </think> (no </think>: None); <short>: the whole response; no mode: None.
    """
    if mode == "short":
        return response  # a stray </think> in a short answer changes nothing
    if mode == "think":
        if THINK_END not in response:
            return None  # cut off while thinking: a \boxed{} there is not an answer
        # Like the authors, the segment after the first </think> and before a second one, if any:
        # `model_response.split(THOUGHT_DELIMITER_END)[1]`, deepscaler/rewards/math_reward.py line 37 (at aa225d2).
        return response.split(THINK_END)[1]
    return None


def score(response: str, reference: str, mode: str | None, table: RewardsConfig) -> Score:
    """The reward of one response; `table` has correct_short, correct_think, wrong, format_error (RewardsConfig).

    `mode` is the policy's first token ("short", "think" or None); `response` may include it or not.
    """
    solution = solution_text(response, mode)
    answer = None if solution is None else last_boxed(solution)
    if mode is None or answer is None:  # as the authors: no solution part, or no \boxed{} in it
        return Score(mode, False, float(table.format_error), answer)
    if not check_answer(answer, reference):
        return Score(mode, False, float(table.wrong), answer)
    return Score(mode, True, float(table.correct_short if mode == "short" else table.correct_think), answer)


_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+")


def eval_correct(response: str, reference: str) -> bool:
    """Correct as the authors' evaluation scripts judge it (scripts/eval/eval_math500.py): the prediction is the
    last \\boxed{} anywhere in the response (the thinking included: a chain of thought cut off after it still
    counts), else the last number; right when it equals the reference (math-verify here, their grader there) or
    when the first numbers of the prediction and of the reference are equal."""
    predicted = last_boxed(response)
    if predicted is None:
        numbers = _NUMBER.findall(response)
        predicted = numbers[-1] if numbers else None
    if predicted is None:
        return False
    if check_answer(predicted, reference):
        return True
    first_p, first_r = _NUMBER.findall(predicted), _NUMBER.findall(reference)
    return bool(first_p and first_r) and float(first_p[0]) == float(first_r[0])
