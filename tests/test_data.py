"""Data files through `datasets`: RL and SFT rows, chat prompts, and errors that name the file and row."""

import json

import pytest
import tiny

from thinkless.train.config import INSTRUCTION, load_config
from thinkless.train.data import DataError, chat_prompt, load_problems, load_sft, read_rows


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny.make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_problems_from_real_files(tokenizer, tmp_path):
    config = load_config()
    examples = load_problems([str(tiny.DATA / "math500.json")], tokenizer, config)
    rows = json.loads((tiny.DATA / "math500.json").read_text())
    assert len(examples) == len(rows) == 500
    first = examples[0]
    assert first.answer == rows[0]["answer"] and first.source.endswith("math500.json:0")
    assert first.prompt.startswith("<|im_start|>user\n" + rows[0]["problem"].strip())
    assert first.prompt.endswith(INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
    # The same rows as jsonl and parquet, with other key names.
    import pandas as pd

    renamed = [{"question": r["problem"], "solution": r["answer"]} for r in rows[:5]]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in renamed))
    pd.DataFrame(renamed).to_parquet(tmp_path / "p.parquet")
    config = load_config(None, ["data.problem_key=question", "data.answer_key=solution"])
    for name in ("p.jsonl", "p.parquet"):
        got = load_problems([str(tmp_path / name)], tokenizer, config)
        assert [e.answer for e in got] == [r["answer"] for r in rows[:5]]


def test_template_that_opens_think_is_cut(tmp_path):
    tok = tiny.make_tokenizer(tmp_path, chat_template=tiny.CHATML_THINK)
    messages = [{"role": "user", "content": "1+1?"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).endswith("<think>\n")
    assert chat_prompt(tok, messages) == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"


def test_sft_rows_both_layouts(tokenizer, tmp_path):
    rows = [
        {"problem": "1+1?", "response": "<short>\\boxed{2}"},
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>4</think>\\boxed{4}"},
            ]
        },
    ]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    got = load_sft([str(tmp_path / "sft.jsonl")], tokenizer, load_config())
    assert [e.response for e in got] == ["<short>\\boxed{2}", "<think>4</think>\\boxed{4}"]
    assert got[1].prompt == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{"problem": "a", "answer": "1"}, {"problem": "b"}],
            r"bad.json: row 1: missing 'answer' \(the row has: problem\)",
        ),
        ([{"problem": "a", "answer": ""}], r"bad.json: row 0: 'answer' must be non-empty text"),
    ],
)
def test_bad_rl_rows_name_file_and_row(tokenizer, tmp_path, rows, message):
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=message):
        load_problems([str(tmp_path / "bad.json")], tokenizer, load_config())


def test_bad_sft_rows_and_files(tokenizer, tmp_path):
    (tmp_path / "sft.json").write_text(json.dumps([{"problem": "a", "response": "no control token"}]))
    with pytest.raises(DataError, match=r"sft.json: row 0: the response must open with <short> or <think>"):
        load_sft([str(tmp_path / "sft.json")], tokenizer, load_config())
    with pytest.raises(DataError, match=r"missing.json: no such file"):
        read_rows(tmp_path / "missing.json")
    with pytest.raises(DataError, match=r"unsupported file type '.csv'"):
        read_rows(tmp_path / "x.csv")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match=r"broken.json: cannot be read as json"):
        read_rows(tmp_path / "broken.json")
