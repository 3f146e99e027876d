"""The demo's task: addition of two L-digit numbers, with L (the number of digits) as the difficulty level.

    prompt   07+45=
    <short>  <short>\\boxed{052}
    <think>  <think>750=12,041=05,</think>\\boxed{052}

Operands and answers are zero-padded to a fixed width (L and L + 1 digits), so every problem of a level has the
same shape. The scratchpad writes one column per digit, least significant first: the two digits, the carry in,
`=`, then the carry out and the digit of the sum. Each column needs only the previous one and two digits of the
prompt, so a 2-layer model learns it for any L. A `<short>` answer must produce the carry chain in its head,
most significant digit first: a tiny model manages that for L = 1 (and mostly L = 2), not beyond. That is the
point: the easy levels can answer short, the hard ones must think.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from thinkless.modes import SHORT, THINK, THINK_END

BOXED = "\\boxed{"


@dataclass(frozen=True)
class Problem:
    level: int  # digits per operand
    a: int
    b: int

    @property
    def text(self) -> str:
        return f"{self.a:0{self.level}d}+{self.b:0{self.level}d}="

    @property
    def answer(self) -> str:
        return f"{self.a + self.b:0{self.level + 1}d}"

    @property
    def name(self) -> str:
        return level_name(self.level)


def level_name(level: int) -> str:
    return f"{level}-digit"


def scratchpad(p: Problem) -> str:
    """One column per digit, least significant first: `a b carry_in = carry_out digit ,`."""
    a, b = f"{p.a:0{p.level}d}", f"{p.b:0{p.level}d}"
    carry, columns = 0, []
    for i in reversed(range(p.level)):
        total = int(a[i]) + int(b[i]) + carry
        columns.append(f"{a[i]}{b[i]}{carry}={total // 10}{total % 10},")
        carry = total // 10
    return "".join(columns)


def short_response(p: Problem) -> str:
    return f"{SHORT}{BOXED}{p.answer}}}"


def think_response(p: Problem) -> str:
    return f"{THINK}{scratchpad(p)}{THINK_END}{BOXED}{p.answer}}}"


def sample(level: int, rng: random.Random) -> Problem:
    return Problem(level, rng.randrange(10**level), rng.randrange(10**level))


def problems(level: int, n: int, seed: int) -> list[Problem]:
    """`n` problems of one level, drawn with replacement (level 1 has only 100 distinct ones)."""
    rng = random.Random(f"{seed}:{level}")
    return [sample(level, rng) for _ in range(n)]


def mixture(levels: list[int], weights: list[float], n: int, seed: int) -> list[Problem]:
    """`n` problems whose levels are drawn by `weights` (e.g. more easy problems, to keep `<short>` alive)."""
    rng = random.Random(f"{seed}:mix")
    return [sample(rng.choices(levels, weights)[0], rng) for _ in range(n)]


ALPHABET = list("0123456789+=,}")  # every character the task writes, besides the tokens below
