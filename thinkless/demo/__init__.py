"""The built-in demo: a tiny model learns when to think, on a laptop CPU, in minutes (`thinkless-train demo`).

- `task`: L-digit addition, with the number of digits as the level; `<short>` answers at once, `<think>` writes
  a scratchpad column by column. Short answers suffice for the easiest level, the scratchpad is needed for the
  hardest.
- `tiny`: a character tokenizer and a 2-layer Qwen2, built in code (no download).
- `run`: hybrid warm-up SFT, then DeGRPO, through the real `sft`, `rl` and `eval` stages; `report.json`, plots,
  and a before/after table.
"""
