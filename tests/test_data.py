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
    with pytest.raises(DataError, match=r"broken.json: line 1: invalid JSON"):
        read_rows(tmp_path / "broken.json")


@pytest.mark.parametrize(
    ("position", "content"),
    [
        ("after", "What is 1+1? Think."),  # the trainer's first layout: problem, space, instruction
        ("before", "Think.\n  What is 1+1? "),  # the authors' eval prompt: f"{instruction}\n{problem}", exactly
        ("none", "  What is 1+1? "),  # the authors' RL prompt: the problem alone
    ],
)
def test_instruction_position_in_rl_and_sft_prompts(tokenizer, tmp_path, position, content):
    (tmp_path / "rl.json").write_text(json.dumps([{"problem": "  What is 1+1? ", "answer": "2"}]))
    (tmp_path / "sft.json").write_text(json.dumps([{"problem": "  What is 1+1? ", "response": "<short>\\boxed{2}"}]))
    config = load_config(None, ["data.instruction=Think.", f"data.instruction_position={position}"])
    expected = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    (rl,) = load_problems([str(tmp_path / "rl.json")], tokenizer, config)
    (sft,) = load_sft([str(tmp_path / "sft.json")], tokenizer, config)
    assert rl.prompt == sft.prompt == expected


GSM8K = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nSo 48+24 = <<48+24=72>>72 in all.\n#### 72"},
    {"question": "A shop sells 1,000 pens a day for 1 dollar... ", "answer": "1000 * 1.234 = 1234\n#### 1,234"},
    {"question": "Debt?", "answer": "She owes 5 #### 4 ... then\n#### -12.5"},
]  # fmt: skip
MATH = [
    {"problem": "Solve $x+1=2$.", "solution": "Subtract 1: $x = \\boxed{1}$.", "level": "Level 1", "type": "Algebra"},
    {"problem": "Area?", "solution": "It is $\\boxed{\\frac{\\pi}{2}}$ square units.", "level": "Level 2",
     "type": "Geometry"},
    {"problem": "Solve $2x=6$.", "solution": "So $x=\\boxed 3$.", "level": "Level 1", "type": "algebra"},
]  # fmt: skip


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gsm8k_and_math_solutions_give_their_final_answers(tokenizer, tmp_path):
    """GSM8K: the question, and the answer after the last #### without commas; MATH: the last \\boxed{} of the
    solution. Both with the default (auto) keys and format."""
    gsm8k = load_problems([_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)], tokenizer, load_config())
    assert [e.answer for e in gsm8k] == ["72", "1234", "-12.5"]
    assert gsm8k[0].prompt.startswith("<|im_start|>user\nNatalia sold 48 clips")
    math = load_problems([_jsonl(tmp_path / "math.jsonl", MATH)], tokenizer, load_config())
    assert [e.answer for e in math] == ["1", "\\frac{\\pi}{2}", "3"]
    # Explicit keys and formats: the same answers; plain keeps the text as it is.
    config = load_config(None, ["data.problem_key=question", "data.answer_key=answer", "data.answer_format=gsm8k"])
    got = load_problems([str(tmp_path / "gsm8k.jsonl")], tokenizer, config)
    assert [e.answer for e in got] == ["72", "1234", "-12.5"]
    config = load_config(None, ["data.answer_key=solution", "data.answer_format=boxed"])
    assert [e.answer for e in load_problems([str(tmp_path / "math.jsonl")], tokenizer, config)][0] == "1"
    plain = load_problems([str(tmp_path / "gsm8k.jsonl")], tokenizer, load_config(None, ["data.answer_format=plain"]))
    assert plain[0].answer == GSM8K[0]["answer"].strip()
    # An answer column wins over a solution; a list of accepted answers (Minerva's) gives its first.
    rows = [{"problem": "p", "answer": "7", "solution": "\\boxed{8}"}, {"problem": "q", "answer": ["9.6\n", "9.60"]}]
    got = load_problems([_jsonl(tmp_path / "both.jsonl", rows)], tokenizer, load_config())
    assert [e.answer for e in got] == ["7", "9.6"]


def test_filter_keeps_one_type(tokenizer, tmp_path):
    path = _jsonl(tmp_path / "math.jsonl", MATH)
    config = load_config(None, ["data.filter_key=type", "data.filter_values=[Algebra]"])
    kept = load_problems([path], tokenizer, config)
    assert [e.source for e in kept] == [f"{path}:0", f"{path}:2"]  # whole values, any case; rows keep their index
    config = load_config(None, ["data.filter_key=type", "data.filter_values=[Algebra, Geometry]"])
    assert len(load_problems([path], tokenizer, config)) == 3
    config = load_config(None, ["data.filter_key=type", "data.filter_values=[Precalculus]"])
    with pytest.raises(DataError, match=r"math.jsonl: no row has type in \['Precalculus'\] .*: Algebra, Geometry"):
        load_problems([path], tokenizer, config)


def test_filter_on_the_real_math_train_split(tokenizer):
    """math_train.json by type, counted independently; its Algebra subset holds two rows without an answer, and the
    first stops the run with its row number, like any bad row."""
    path = tiny.DATA / "math_train.json"
    rows = json.loads(path.read_text())
    for kind in ("Geometry", "Prealgebra"):
        config = load_config(None, ["data.filter_key=type", f"data.filter_values=[{kind}]"])
        got = load_problems([str(path)], tokenizer, config)
        expected = [i for i, r in enumerate(rows) if r["type"] == kind]
        assert [int(e.source.rsplit(":", 1)[1]) for e in got] == expected and len(expected) > 800
        assert [e.answer for e in got] == [rows[i]["answer"].strip() for i in expected]
    bad = next(i for i, r in enumerate(rows) if r["type"] == "Algebra" and r["answer"] is None)
    config = load_config(None, ["data.filter_key=type", "data.filter_values=[Algebra]"])
    with pytest.raises(DataError, match=rf"math_train.json: row {bad}: missing 'answer'"):
        load_problems([str(path)], tokenizer, config)


@pytest.mark.parametrize(
    ("rows", "settings", "message"),
    [
        ([{"question": "q", "answer": "no marker"}], ["data.answer_format=gsm8k"],
         r"bad.json: row 0: 'answer' has no '#### <answer>' \(data.answer_format=gsm8k\)"),
        ([{"problem": "p", "solution": "It is 3."}], [],
         r"bad.json: row 0: 'solution' is a solution without a final answer \(no \\boxed\{\} and no ####\)"),
        ([{"problem": "p", "solution": "\\boxed{3"}], ["data.answer_format=boxed", "data.answer_key=solution"],
         r"bad.json: row 0: 'solution' has no complete \\boxed\{...\}"),
        ([{"problem": "p", "answer": "#### "}], [], r"bad.json: row 0: 'answer' gives an empty final answer"),
        ([{"prompt": "p", "answer": "1"}], [],
         r"bad.json: row 0: missing 'problem' \(the row has: prompt, answer\); data.problem_key=auto looks for "
         r"'problem' or 'question'"),
        ([{"problem": "p", "answer": "1"}], ["data.filter_key=type", "data.filter_values=[Algebra]"],
         r"bad.json: row 0: missing 'type' \(data.filter_key\)"),
    ],
)  # fmt: skip
def test_bad_answers_and_filters_name_file_row_and_key(tokenizer, tmp_path, rows, settings, message):
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=message):
        load_problems([str(tmp_path / "bad.json")], tokenizer, load_config(None, settings))


def test_bad_data_settings():
    from thinkless.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.answer_format must be one of auto, plain, gsm8k, boxed, got 'latex'"):
        load_config(None, ["data.answer_format=latex"])
    with pytest.raises(ConfigError, match=r"data.filter_key and data.filter_values go together"):
        load_config(None, ["data.filter_key=type"])


def test_fitting_prompts_drops_long_prompts_with_a_count(tokenizer, capsys):
    """One length rule for training and validation prompts: at most `limit` tokens of the prompt (the chat
    template's text, no special tokens added), counted by the tokenizer; none left names the files."""
    from thinkless.train.data import Example, fitting_prompts

    examples = [Example(prompt="one two " * k, answer="1", source=f"f:{k}") for k in (1, 5, 20)]
    lengths = [len(tokenizer(e.prompt, add_special_tokens=False)["input_ids"]) for e in examples]
    limit = lengths[1]  # exactly the limit is kept
    kept = fitting_prompts(examples, tokenizer, limit, "data.train_files ['x.jsonl']")
    assert kept == examples[:2]
    assert "data.train_files ['x.jsonl']: dropped 1 of 3 prompts longer than" in capsys.readouterr().out
    assert fitting_prompts(examples, tokenizer, lengths[2], "all") == examples
    assert min(lengths) > 1
    with pytest.raises(DataError, match=rf"x.jsonl'\]: no prompt fits data.max_prompt_tokens={min(lengths) - 1}$"):
        fitting_prompts(examples, tokenizer, min(lengths) - 1, "data.train_files ['x.jsonl']")
