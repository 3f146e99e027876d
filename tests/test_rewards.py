"""Rewards on real answer formats from MATH-500 (../shared/data/math500.json)."""

import json

import pytest
import tiny

from thinkless.train.config import RewardsConfig
from thinkless.train.rewards import check_answer, last_boxed, mode_of_text, mode_of_token, score

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
    assert score("<think>ran out of tokens", "4", "think", table).reward == -1.0  # no \boxed{}: wrong
    no_mode = score("\\boxed{4}", "4", None, table)
    assert no_mode.reward == table.format_error and no_mode.mode is None
    custom = RewardsConfig(correct_short=2.0, correct_think=0.25, wrong=-0.5, format_error=-3.0)
    assert [
        score(r, "4", m, custom).reward
        for r, m in [("\\boxed{4}", "short"), ("\\boxed{4}", "think"), ("\\boxed{5}", "think"), ("x", None)]
    ] == [2.0, 0.25, -0.5, -3.0]
