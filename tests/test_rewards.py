"""Rewards on real answer formats from MATH-500 (../shared/data/math500.json)."""

import json

import pytest
import tiny

from thinkless.modes import THINK_END, mode_of_text, mode_of_token
from thinkless.train.config import RewardsConfig
from thinkless.train.rewards import check_answer, last_boxed, score, solution_text

DATA = tiny.DATA / "math500.json"


@pytest.fixture(scope="module")
def answers():
    rows = json.loads(DATA.read_text())
    return {row["answer"] for row in rows}


# (reference answer as it appears in MATH-500, a model's answer, whether they are the same)
CASES = [
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),  # tuple, \left( \right), pi/2
    ("\\frac{14}{3}", "14/3", True),
    ("\\frac{14}{3}", "4.666667", True),  # \frac against a decimal
    ("\\frac{14}{3}", "\\frac{3}{14}", False),
    ("\\frac{1}{2}", "0.5", True),
    ("90^\\circ", "90", True),  # units
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", True),
    ("10,\\!080", "10080", True),  # thousands separator
    ("(3,4]", "(3,4]", True),  # interval
    ("(3,4]", "[3,4]", False),
    ("3, 5, 7", "7, 5, 3", True),  # a set of solutions, any order
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}", True),
    ("\\text{Evelyn}", "Evelyn", True),
    ("\\text{east}", "\\text{west}", False),
]


@pytest.mark.parametrize(("reference", "predicted", "same"), CASES)
def test_check_answer_on_math500_formats(answers, reference, predicted, same):
    assert reference in answers  # a real MATH-500 answer, not one made up for the test
    assert check_answer(predicted, reference) is same


def test_last_boxed():
    text = "first \\boxed{\\frac{1}{2}}, then \\boxed{\\left(3, \\frac{\\pi}{2}\\right)}."
    assert last_boxed(text) == "\\left(3, \\frac{\\pi}{2}\\right)"
    assert last_boxed("so the answer is $\\boxed 5$") == "5"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("cut off: \\boxed{\\frac{1}{2") is None
    assert last_boxed("no answer") is None


def test_modes():
    assert mode_of_text("<short>The answer is \\boxed{2}.") == "short"
    assert mode_of_text("  <think>\nhmm</think> \\boxed{2}") == "think"
    assert mode_of_text("The answer is 2") is None
    assert mode_of_token(11, short_id=11, think_id=12) == "short"
    assert mode_of_token(12, short_id=11, think_id=12) == "think"
    assert mode_of_token(5, short_id=11, think_id=12) is None


def test_reward_table():
    table = RewardsConfig()
    assert score("<short>\\boxed{\\frac{1}{2}}", "0.5", "short", table).reward == 1.0
    assert score("<think>...</think>\\boxed{0.5}", "\\frac12", "think", table).reward == 0.5
    wrong = score("<short>\\boxed{3}", "4", "short", table)
    assert (wrong.reward, wrong.correct, wrong.answer) == (-1.0, False, "3")
    assert score("<think>ran out of tokens", "4", "think", table).reward == table.format_error  # no </think>
    no_mode = score("\\boxed{4}", "4", None, table)
    assert no_mode.reward == table.format_error and no_mode.mode is None
    custom = RewardsConfig(correct_short=2.0, correct_think=0.25, wrong=-0.5, format_error=-3.0)
    assert [
        score(r, "4", m, custom).reward
        for r, m in [
            ("\\boxed{4}", "short"),
            ("</think>\\boxed{4}", "think"),
            ("</think>\\boxed{5}", "think"),
            ("x", None),
        ]
    ] == [2.0, 0.25, -0.5, -3.0]


# The authors' rule (RewardMathFn.__call__, deepscaler/rewards/math_reward.py in VainF/Thinkless): in <think> mode
# the answer is the last \boxed{} of the text after the first </think> (up to a second one); in <short> mode, of the
# response. No </think> in a <think> response, or no \boxed{} where the answer is read: format error. A \boxed{}
# answer that is wrong: wrong. The reference answer is 4 throughout. A table where every outcome differs:
TABLE = RewardsConfig(correct_short=1.0, correct_think=0.5, wrong=-1.0, format_error=-2.0)
REWARD = {"short": 1.0, "think": 0.5, "wrong": -1.0, "format_error": -2.0}

# (response with its leading control token, mode, outcome, the answer read)
RULE_CASES = [
    # <think> cut off before </think>: a format error, whatever it boxed while thinking
    ("<think>Let me add 2 and 2, that is", "think", "format_error", None),
    ("<think>so it is \\boxed{4}, let me double-check", "think", "format_error", None),
    ("<think>\\boxed{4} and \\boxed{4}", "think", "format_error", None),
    # a \boxed{} only inside the thinking, none after </think>
    ("<think>\\boxed{4}</think> The answer is 4.", "think", "format_error", None),
    ("<think>\\boxed{4}</think>", "think", "format_error", None),
    # the thinking's box and the answer's box disagree: the one after </think> counts
    ("<think>maybe \\boxed{4}</think> The answer is \\boxed{5}.", "think", "wrong", "5"),
    ("<think>maybe \\boxed{5}</think> The answer is \\boxed{4}.", "think", "think", "4"),
    # several boxes after </think>: the last one
    ("<think>hmm</think> first \\boxed{5}, no: \\boxed{4}", "think", "think", "4"),
    ("<think>hmm</think> first \\boxed{4}, no: \\boxed{5}", "think", "wrong", "5"),
    # several </think>: the text between the first and the second
    ("<think>a</think> \\boxed{4} </think> \\boxed{5}", "think", "think", "4"),
    ("<think>a</think> \\boxed{5} </think> \\boxed{4}", "think", "wrong", "5"),
    ("<think>a</think> no answer yet </think> \\boxed{4}", "think", "format_error", None),
    # <short>: the last box of the response; a stray </think> changes nothing
    ("<short>\\boxed{5}, no: \\boxed{4}", "short", "short", "4"),
    ("<short>\\boxed{4}, no: \\boxed{5}", "short", "wrong", "5"),
    ("<short>oops</think> \\boxed{4}", "short", "short", "4"),
    ("<short>\\boxed{4}</think>", "short", "short", "4"),
    ("<short>\\boxed{5}</think> so \\boxed{4}", "short", "short", "4"),
    ("<short>\\boxed{4}</think> so \\boxed{5}", "short", "wrong", "5"),
    # <short> without a box, or with a wrong one
    ("<short>The answer is 4.", "short", "format_error", None),
    ("<short>The answer is \\boxed{5}.", "short", "wrong", "5"),
    ("<short>\\boxed{}", "short", "wrong", ""),  # an empty box is an answer (the authors grade "" too), a wrong one
    # a right answer without a mode from the first token
    ("\\boxed{4}", None, "format_error", None),
    ("</think> \\boxed{4}", None, "format_error", None),
]


def _without_control_token(response: str) -> str:
    for token in ("<short>", "<think>"):
        if response.startswith(token):
            return response[len(token) :]
    return response


@pytest.mark.parametrize("keep_token", [True, False], ids=["with-token", "without-token"])
@pytest.mark.parametrize(("response", "mode", "outcome", "answer"), RULE_CASES)
def test_score_follows_the_authors_rule(response, mode, outcome, answer, keep_token):
    text = response if keep_token else _without_control_token(response)
    s = score(text, "4", mode, TABLE)
    assert (s.mode, s.reward, s.correct, s.answer) == (mode, REWARD[outcome], outcome in ("short", "think"), answer)


def test_solution_text():
    assert solution_text("<think>a \\boxed{1}</think> b \\boxed{2}", "think") == " b \\boxed{2}"
    assert solution_text("a \\boxed{1}</think> b \\boxed{2}", "think") == " b \\boxed{2}"  # no leading <think>
    assert solution_text("<think>a</think>b</think>c", "think") == "b"
    assert solution_text("<think>a</think>", "think") == ""
    assert solution_text("<think>a \\boxed{1}", "think") is None
    assert solution_text("<short>a</think>b", "short") == "<short>a</think>b"
    assert solution_text("a</think>b", None) is None


def test_format_error_and_wrong_are_distinct_outcomes():
    table = RewardsConfig(correct_short=1.0, correct_think=0.5, wrong=-1.0, format_error=-2.0)
    rewards = [
        score(response, "4", mode, table).reward
        for response, mode in [
            ("<think>\\boxed{4}", "think"),  # cut off
            ("<think>\\boxed{4}</think> so 4", "think"),  # no box after </think>
            ("<think>\\boxed{4}</think> so \\boxed{3}", "think"),
            ("<short>so 4", "short"),
            ("<short>so \\boxed{3}", "short"),
        ]
    ]
    assert rewards == [-2.0, -2.0, -1.0, -2.0, -1.0]


# The authors' answer extraction, re-implemented here from RewardMathFn.__call__ and math_utils/utils.py
# (last_boxed_only_string, remove_boxed, extract_answer) for the parity test below; only the extraction, no grading.
def _authors_last_boxed_only_string(string):
    idx = string.rfind("\\boxed")
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(string)):
        if string[i] == "{":
            depth += 1
        if string[i] == "}":
            depth -= 1
            if depth == 0:
                return string[idx : i + 1]
    return None


def _authors_remove_boxed(s):
    left = "\\boxed{"
    if s is None or not s.startswith(left) or not s.endswith("}"):
        return None
    return s[len(left) : -1]


FORMAT_ERROR = "format error"


def _authors_answer(model_response):
    """The answer RewardMathFn grades, or FORMAT_ERROR where it returns format_error_reward before grading."""
    if "<think>" in model_response and "</think>" in model_response:
        solution = model_response.split("</think>")[1]
    elif "<short>" in model_response:
        solution = model_response.split("<short>")[1]
    else:
        return FORMAT_ERROR
    if "\\boxed" not in solution:
        return FORMAT_ERROR
    answer = _authors_remove_boxed(_authors_last_boxed_only_string(solution))
    return FORMAT_ERROR if answer is None else answer


PARITY_CASES = [
    "<think>Let me add 2 and 2</think> The answer is \\boxed{4}.",
    "<think>so it is \\boxed{4}, let me double-check",
    "<think>\\boxed{4}</think> The answer is 4.",
    "<think>maybe \\boxed{3}</think> The answer is \\boxed{\\frac{1}{2}}.",
    "<think>hmm</think> first \\boxed{5}, no: \\boxed{(3, \\pi/2)}",
    "<think>a</think> \\boxed{4} </think> \\boxed{5}",
    "<think>a</think> no answer yet </think> \\boxed{4}",
    "<think>a</think> cut off in the answer \\boxed{\\frac{1}{2",
    "<short>\\boxed{5}, no: \\boxed{4}",
    "<short>oops</think> \\boxed{4}",
    "<short>\\boxed{4}</think>",
    "<short>The answer is 4.",
    "<short>\\boxed{}",
]


@pytest.mark.parametrize("response", PARITY_CASES)
def test_answer_extraction_matches_the_authors(response):
    expected = _authors_answer(response)
    mode = mode_of_text(response)
    for text in (response, _without_control_token(response)):  # the caller may or may not keep the control token
        solution = solution_text(text, mode)
        ours = None if solution is None else last_boxed(solution)
        assert (FORMAT_ERROR if ours is None else ours) == expected
        assert (score(text, "4", mode, TABLE).reward == REWARD["format_error"]) == (expected == FORMAT_ERROR)


def test_think_end_is_the_authors_delimiter():
    assert THINK_END == "</think>"  # THOUGHT_DELIMITER_END in deepscaler/globals.py


@pytest.mark.parametrize(
    ("response", "reference", "correct"),
    [
        ("<think> so x=4, \\boxed{4} (ran out of tokens", "4", True),  # their eval reads the thinking too
        ("<think>\\boxed{4}</think> the answer is \\boxed{5}", "4", False),  # the last box counts
        ("<short> The answer is 4.", "4", True),  # no box: the last number
        ("<short> The answer is 4, not 7.", "4", False),
        ("<short> \\boxed{\\frac{1}{2}}", "0.5", True),  # math-verify
        ("<short> \\boxed{12 apples}", "12", True),  # their first-number fallback
        ("<short> no idea", "4", False),
    ],
)
def test_eval_correct_is_the_authors_evaluation_rule(response, reference, correct):
    """scripts/eval/eval_math500.py: the last \\boxed{} anywhere, else the last number; correct by the grader or by
    equal first numbers. Not the reward's rule: the first case is a format error there."""
    from thinkless.train.rewards import eval_correct

    assert eval_correct(response, reference) is correct
