"""The catalogue of user mistakes: each one ends the CLI with status 2 and one line that names the file, row, key or
path, without a traceback, and leaves nothing in the output folder that would break the next run. Then the data
loader under random rows: a clean load or a clear error, never a traceback."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tiny
import torch

from thinkless.cli import main
from thinkless.train.config import load_config
from thinkless.train.data import DataError, load_problems, load_sft


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistakes")
    tok = tiny.make_tokenizer(root / "model")
    tiny.make_model(root / "model", tok)
    tiny.make_tokenizer(root / "tokenizer-only")
    tiny.make_model(root / "no-tokenizer", tok)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (root / "no-tokenizer" / name).unlink(missing_ok=True)
    from thinkless.demo.tiny import build_model

    build_model(root / "other-vocab", hidden=16)  # a character tokenizer: another vocabulary
    sft_run = root / "sft-run" / "checkpoint-1"
    sft_run.mkdir(parents=True)
    torch.save({"stage": "sft", "step": 1}, sft_run / "trainer_state.pt")
    good = [{"problem": "What is 1+1?", "answer": "2"}, {"problem": "What is 2+2?", "answer": "4"}]
    texts = {
        "good.json": json.dumps(good),
        "no-answer.json": json.dumps([good[0], {"problem": "What is 3+3?"}]),
        "list-problem.json": json.dumps([{"problem": ["a", "b"], "answer": "1"}]),
        "empty-problem.jsonl": json.dumps({"problem": "  ", "answer": "1"}) + "\n",
        "empty.jsonl": "",
        "no-rows.json": "[]",
        "bad-line.jsonl": json.dumps(good[0]) + "\n" + '{"problem": "x", "answer": 2\n',
        "not-object.jsonl": json.dumps(good[0]) + "\n[1, 2]\n",
        "no-box.json": json.dumps([{"problem": "p", "solution": "It is 5."}]),
        "sft-no-token.jsonl": json.dumps({"problem": "p", "response": "The answer is 2."}) + "\n",
        "sft-messages.jsonl": json.dumps({"messages": [{"role": "user", "content": "p"}]}) + "\n",
        "gsm8k-no-hash.json": json.dumps([{"question": "q", "answer": "42"}]),
        "table.csv": "problem,answer\np,1\n",
        "bad.yaml": "rollout: [1, 2\n",
        "list.yaml": "- rollout\n",
        "typo.yaml": "rolout:\n  n: 4\n",
    }
    for name, text in texts.items():
        (root / name).write_text(text)
    (root / "latin1.jsonl").write_bytes(b'{"problem": "caf\xe9", "answer": "1"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question_text": ["p"], "final": ["1"]}), root / "columns.parquet")
    return root


def _rl(root: Path, *extra) -> list[str]:
    return ["rl", f"model.path={root / 'model'}", f"data.train_files=[{root / 'good.json'}]",
            f"trainer.output_dir={root / 'out'}", "trainer.total_steps=1", "rollout.max_new_tokens=4",
            *extra]  # fmt: skip


# (id, argv builder, the message's part that names the mistake)
CASES = [
    # data
    ("missing field", lambda r: _rl(r, f"data.train_files=[{r / 'no-answer.json'}]"),
     "no-answer.json: row 1: missing 'answer'"),
    ("non-string problem", lambda r: _rl(r, f"data.train_files=[{r / 'list-problem.json'}]"),
     "list-problem.json: row 0: 'problem' must be non-empty text"),
    ("blank problem", lambda r: _rl(r, f"data.train_files=[{r / 'empty-problem.jsonl'}]"),
     "empty-problem.jsonl: row 0: 'problem' must be non-empty text"),
    ("empty file", lambda r: _rl(r, f"data.train_files=[{r / 'empty.jsonl'}]"), "empty.jsonl: the file is empty"),
    ("no rows", lambda r: _rl(r, f"data.train_files=[{r / 'no-rows.json'}]"), "no-rows.json: the file holds no rows"),
    ("invalid JSON on line 2", lambda r: _rl(r, f"data.train_files=[{r / 'bad-line.jsonl'}]"),
     "bad-line.jsonl: line 2: invalid JSON"),
    ("a line that is not an object", lambda r: _rl(r, f"data.train_files=[{r / 'not-object.jsonl'}]"),
     "not-object.jsonl: line 2: a row must be a JSON object"),
    ("non-UTF-8", lambda r: _rl(r, f"data.train_files=[{r / 'latin1.jsonl'}]"),
     "latin1.jsonl: line 1: not UTF-8 text (byte 0xe9)"),
    ("parquet without the columns", lambda r: _rl(r, f"data.train_files=[{r / 'columns.parquet'}]"),
     "columns.parquet: row 0: missing 'problem'"),
    ("a solution without a final answer", lambda r: _rl(r, f"data.train_files=[{r / 'no-box.json'}]"),
     "no-box.json: row 0: 'solution' is a solution without a final answer"),
    ("gsm8k answer without ####",
     lambda r: _rl(r, f"data.train_files=[{r / 'gsm8k-no-hash.json'}]", "data.answer_format=gsm8k"),
     "gsm8k-no-hash.json: row 0: 'answer' has no"),
    ("unsupported file type", lambda r: _rl(r, f"data.train_files=[{r / 'table.csv'}]"),
     "table.csv: unsupported file type '.csv'"),
    ("missing data file", lambda r: _rl(r, f"data.train_files=[{r / 'nope.json'}]"), "nope.json: no such file"),
    ("no data files", lambda r: _rl(r, "data.train_files=[]"), "data.train_files is empty"),
    ("sft response without a control token", lambda r: ["sft", f"model.path={r / 'model'}",
     f"data.train_files=[{r / 'sft-no-token.jsonl'}]", f"trainer.output_dir={r / 'out'}"],
     "sft-no-token.jsonl: row 0: the response must open with <short> or <think>"),
    ("sft chat without the assistant's turn", lambda r: ["sft", f"model.path={r / 'model'}",
     f"data.train_files=[{r / 'sft-messages.jsonl'}]", f"trainer.output_dir={r / 'out'}"],
     "sft-messages.jsonl: row 0: 'messages' must end with the assistant's turn"),
    ("filter matching nothing", lambda r: _rl(r, "data.filter_key=problem", "data.filter_values=[none]"),
     "good.json: no row has problem in ['none']"),
    ("eval without files", lambda r: ["eval", f"model.path={r / 'model'}", f"trainer.output_dir={r / 'out'}"],
     "data.val_files is empty"),
    # config
    ("wrong type", lambda r: _rl(r, "rollout.n=eight"), "rollout.n must be an integer, got 'eight'"),
    ("wrong boolean", lambda r: _rl(r, "algo.decoupled=maybe"), "algo.decoupled must be true or false"),
    ("unknown key", lambda r: _rl(r, "rollout.nn=8"), "unknown key 'rollout.nn'; the keys of 'rollout' are"),
    ("unknown section", lambda r: _rl(r, "rolout.n=8"), "unknown setting 'rolout.n'"),
    ("out of range", lambda r: _rl(r, "rollout.top_p=1.5"), "rollout.top_p must be in (0, 1], got 1.5"),
    ("negative", lambda r: _rl(r, "algo.alpha=-1"), "algo.alpha must be >= 0, got -1.0"),
    ("zero temperature", lambda r: _rl(r, "rollout.temperature=0"), "rollout.temperature must be > 0"),
    ("unknown choice", lambda r: _rl(r, "algo.kl_type=k4"), "algo.kl_type must be one of k1, k2, k3, got 'k4'"),
    ("conflicting settings", lambda r: _rl(r, f"trainer.val_files=[{r / 'good.json'}]"),
     "trainer.val_files needs trainer.val_every"),
    ("half a filter", lambda r: _rl(r, "data.filter_key=type"), "data.filter_key and data.filter_values go together"),
    ("bad betas", lambda r: _rl(r, "algo.betas=[0.9]"), "algo.betas must be two numbers in [0, 1)"),
    ("config file missing", lambda r: [*_rl(r), "--config", str(r / "nope.yaml")], "nope.yaml' does not exist"),
    ("config file not YAML", lambda r: [*_rl(r), "--config", str(r / "bad.yaml")], "bad.yaml' is not valid YAML"),
    ("config file not a mapping", lambda r: [*_rl(r), "--config", str(r / "list.yaml")],
     "list.yaml' must hold a mapping of sections"),
    ("config file with a typo", lambda r: [*_rl(r), "--config", str(r / "typo.yaml")],
     "unknown section 'rolout' in"),
    # model
    ("model folder without a config", lambda r: _rl(r, f"model.path={r / 'tokenizer-only'}"),
     "tokenizer-only': cannot load a causal LM"),
    ("model folder without a tokenizer", lambda r: _rl(r, f"model.path={r / 'no-tokenizer'}"),
     "no-tokenizer': cannot load a tokenizer"),
    ("no such model folder", lambda r: _rl(r, f"model.path={r / 'nope'}"), "nope': no such folder"),
    ("no model", lambda r: _rl(r, "model.path="), "model.path is not set"),
    ("reference with another vocabulary", lambda r: _rl(r, f"model.ref_path={r / 'other-vocab'}", "algo.kl_coef=0.1"),
     "other-vocab' has another vocabulary"),
    ("a checkpoint folder of another stage", lambda r: _rl(r, f"trainer.output_dir={r / 'sft-run'}"),
     "holds a sft run (checkpoint-1); give rl its own output_dir"),
    ("a missing gguf file", lambda r: _rl(r, f"model.path={r / 'model.gguf'}"), "model.gguf': no such GGUF file"),
    # CLI
    ("unknown stage", lambda r: ["trian"], "invalid choice: 'trian'"),
    ("bad override syntax", lambda r: _rl(r, "rollout.n8"), "override 'rollout.n8' must look like section.key=value"),
    ("unknown option", lambda r: [*_rl(r), "--lr", "1"], "unrecognized argument: --lr"),
    ("a broken list", lambda r: _rl(r, "data.train_files=[a.json"), "data.train_files must be a list like"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_user_mistake_is_one_line_and_status_2(files, case, capsys):
    _, argv, message = case
    out = files / "out"
    try:
        code = main(argv(files))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("Generating", "Loading"))]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert len(lines) == 1 and "error:" in lines[0], err[-2000:]
    assert message in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())  # nothing the next run would trip on


def test_there_are_at_least_30_mistakes():
    assert len(CASES) >= 30


def _random_value(rng: random.Random):
    kinds = [
        lambda: rng.choice(["", " ", "What is 1+1?", "\\boxed{2}", "∑ café", "x" * rng.randint(1, 300), "\n"]),
        lambda: rng.randint(-5, 10**6), lambda: rng.random(), lambda: rng.choice([True, False]), lambda: None,
        lambda: [rng.choice(["a", "1", ""]) for _ in range(rng.randint(0, 3))], lambda: {"k": rng.randint(0, 3)},
        lambda: [{"role": rng.choice(["user", "assistant", "x"]), "content": rng.choice(["p", "<short>2", ""])}
                 for _ in range(rng.randint(0, 3))],
    ]  # fmt: skip
    return rng.choice(kinds)()


def test_the_loader_takes_any_row_cleanly_or_names_it(tmp_path):
    """1,000 random rows (random keys among the ones the loader reads, random values of any JSON type) through the
    RL and SFT row loaders, and 40 of them as files through the whole loader: each loads, or raises DataError that
    names the row (the file)."""
    from thinkless.train.data import problem_of_row, sft_example_of_row

    rng = random.Random(0)
    tok = tiny.make_tokenizer(tmp_path / "tok")
    data = load_config().data
    keys = ["problem", "question", "answer", "solution", "response", "messages", "type", "extra"]
    outcomes = {"loaded": 0, "error": 0}
    rows = [{k: _random_value(rng) for k in rng.sample(keys, rng.randint(0, len(keys)))} for _ in range(1000)]
    for i, row in enumerate(rows):
        row = json.loads(json.dumps(row))  # as a file would give it back
        for load in (
            lambda r, w: problem_of_row(r, w, "f:0", data),
            lambda r, w: sft_example_of_row(r, w, "f:0", tok, data),
        ):
            try:
                load(row, f"rows: row {i}")
                outcomes["loaded"] += 1
            except DataError as err:
                assert str(err).startswith(f"rows: row {i}"), str(err)
                outcomes["error"] += 1
    assert outcomes["loaded"] > 50 and outcomes["error"] > 500, outcomes
    config = load_config()
    for i, row in enumerate(rows[:40]):
        path = tmp_path / f"row{i}.{'json' if i % 2 else 'jsonl'}"
        path.write_text(json.dumps([row]) if path.suffix == ".json" else json.dumps(row) + "\n")
        for load in (load_problems, load_sft):
            try:
                load([str(path)], tok, config)
            except DataError as err:
                assert str(path) in str(err), str(err)
