"""The Thinkless vocabulary: the control tokens, the mode of a response, and the per-mode statistics that RL and
evaluation both report.

A response opens with a control token that picks its mode (Fang et al., 2025, arXiv 2505.13379): `<short>` for a
concise answer, `<think>` for a chain of thought that `</think>` closes before the answer. A response that opens
with neither has no mode (None): a format error.

The statistics of a set of samples, each (mode, correct, tokens), under one set of names (`mode_statistics`):

    accuracy            share of samples whose answer is right
    think_ratio         share of samples that open with <think>
    mean_tokens         mean tokens per sample (response tokens; an eval may add the prompt's)
    accuracy_short      accuracy of the <short> samples (None: no <short> sample)
    accuracy_think      accuracy of the <think> samples (None: no <think> sample)
    mean_tokens_short   mean tokens of the <short> samples (None: none)
    mean_tokens_think   mean tokens of the <think> samples (None: none)
    format_errors       samples without a control token

Evaluation reports carry them as they are; RL's metrics.jsonl carries them for every step (and the HEADLINE three
per tag with `data.tag_key`: `<name>/<tag>`), and validation the HEADLINE three as `val/<file>/<name>`.
"""

from __future__ import annotations

SHORT, THINK, THINK_END = "<short>", "<think>", "</think>"
MODES = {"short": SHORT, "think": THINK}  # a mode's name -> its control token, the first token of a response
ADDED_TOKENS = (SHORT, THINK, THINK_END)  # the tokens a model's vocabulary gets for Thinkless

HEADLINE = ("accuracy", "think_ratio", "mean_tokens")

# The RL metric names of thinkless 0.1 (issue 5) for the same figures, still written beside the names above so that
# dashboards and scripts that read them keep working; as then, a mode without samples gives 0 there, not None.
LEGACY_NAMES = {
    "acc": "accuracy",
    "acc_short": "accuracy_short",
    "acc_think": "accuracy_think",
    "response_tokens_mean": "mean_tokens",
    "response_tokens_short": "mean_tokens_short",
    "response_tokens_think": "mean_tokens_think",
}
LEGACY_TAG_NAMES = {"acc": "accuracy", "response_tokens": "mean_tokens"}  # `<old>/<tag>` beside `<name>/<tag>`


def mode_of_text(response: str) -> str | None:
    """The mode a response's text opens with: "short", "think", or None."""
    head = response.lstrip()
    return next((mode for mode, token in MODES.items() if head.startswith(token)), None)


def mode_of_token(first_token: int, short_id: int, think_id: int) -> str | None:
    """The mode from the first generated token id, as the policy chose it."""
    return "short" if first_token == short_id else "think" if first_token == think_id else None


def mode_statistics(modes: list, correct: list, tokens: list) -> dict:
    """The statistics (see the module's doc) of samples given as parallel lists: each sample's mode ("short",
    "think" or None), whether its answer is right, and its tokens. No sample at all: the headline figures are 0."""
    if not (len(modes) == len(correct) == len(tokens)):
        raise ValueError(f"mode_statistics: {len(modes)} modes, {len(correct)} correct, {len(tokens)} tokens")

    def mean(values: list) -> float | None:
        return sum(values) / len(values) if values else None

    def of(mode: str, values: list) -> float | None:
        return mean([float(v) for m, v in zip(modes, values, strict=True) if m == mode])

    return {
        "accuracy": mean([float(c) for c in correct]) or 0.0,
        "think_ratio": mean([float(m == "think") for m in modes]) or 0.0,
        "mean_tokens": mean([float(t) for t in tokens]) or 0.0,
        "accuracy_short": of("short", correct),
        "accuracy_think": of("think", correct),
        "mean_tokens_short": of("short", tokens),
        "mean_tokens_think": of("think", tokens),
        "format_errors": sum(m is None for m in modes),
    }


def legacy_names(statistics: dict, tag: str | None = None) -> dict:
    """The LEGACY_NAMES of `mode_statistics` figures (None as 0, as thinkless 0.1 logged them); with `tag`, the
    figures are that tag's and the names `<old>/<tag>` (LEGACY_TAG_NAMES)."""
    if tag is None:
        return {old: statistics[new] or 0.0 for old, new in LEGACY_NAMES.items()}
    return {f"{old}/{tag}": statistics[new] for old, new in LEGACY_TAG_NAMES.items()}
