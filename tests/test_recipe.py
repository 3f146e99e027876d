"""The authors' recipe (recipes/thinkless_r1_1.5b.yaml) and README's table of it ("The authors' settings") agree.

The README table is the contract: every key the recipe sets has a row, every row's value is the value the recipe
resolves to (the cell read as a `key=value` override, as the CLI reads it), and the README's commands that use the
recipe load.
"""

import contextlib
import re
import shlex
from pathlib import Path

import yaml

from thinkless.train.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "thinkless_r1_1.5b.yaml"
README = ROOT / "README.md"
MARKER = "<!-- recipe-table:"


def recipe_keys() -> list[str]:
    """The dotted keys the recipe's YAML sets."""
    data = yaml.safe_load(RECIPE.read_text())
    return [f"{section}.{key}" for section, values in data.items() for key in values]


def table_rows() -> list[tuple[str, str]]:
    """(key, value cell) of each row of the README table after the marker comment."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(MARKER))
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            table.append(line)
        elif table:  # the first line after the table ends it
            break
    header, separator, *rows = table
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == ["setting (our key)", "value", "source (their file/key)"]
    assert set(separator.replace("|", "").split()) == {"---"}
    out = []
    for row in rows:
        key, value, source = (c.strip() for c in row.strip().strip("|").split("|"))
        assert key.startswith("`") and key.endswith("`"), f"the key cell {key!r} must be in backticks"
        assert source, f"{key}: no source"
        out.append((key.strip("`"), value.strip("`")))
    return out


def table_config(rows):
    """The settings the table's cells give, each cell read as the CLI reads `key=value`."""
    return load_config(None, [f"{key}={value}" for key, value in rows])


def value_of(config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def test_the_table_covers_exactly_the_recipe():
    rows = table_rows()
    keys = [key for key, _ in rows]
    assert len(keys) == len(set(keys)), f"rows repeated: {sorted(k for k in keys if keys.count(k) > 1)}"
    assert set(keys) - set(recipe_keys()) == set(), "README rows for keys the recipe does not set"
    assert set(recipe_keys()) - set(keys) == set(), "keys the recipe sets without a README row"


def test_every_row_is_the_recipe_value():
    rows = table_rows()
    recipe, table = load_config(RECIPE), table_config(rows)
    wrong = {k: (cell, value_of(recipe, k)) for k, cell in rows if value_of(table, k) != value_of(recipe, k)}
    assert wrong == {}, f"README value vs recipe value: {wrong}"


def test_a_changed_cell_is_caught():
    """The comparison is not vacuous: each number cell, changed, no longer gives the recipe's value (or no longer
    gives a valid setting)."""
    rows = table_rows()
    recipe = load_config(RECIPE)
    numbers = [i for i, (key, _) in enumerate(rows) if type(value_of(recipe, key)) in (int, float)]
    assert numbers
    for i in numbers:
        key, _ = rows[i]
        changed = rows[:i] + [(key, str(value_of(recipe, key) + 1))] + rows[i + 1 :]
        with contextlib.suppress(ConfigError):  # out of range: caught as well
            assert value_of(table_config(changed), key) != value_of(recipe, key), key


def test_every_recipe_value_has_a_source_comment():
    lines = RECIPE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^  \w+:", line):  # a key of a section
            commented = "#" in line or lines[i - 1].lstrip().startswith("#")
            assert commented, f"recipes/{RECIPE.name} line {i + 1} has no comment giving its source: {line!r}"


def test_the_recipe_leaves_the_model_to_the_user():
    assert "model.path" not in recipe_keys()
    assert load_config(RECIPE).model.path == ""


def recipe_commands() -> list[list[str]]:
    """The README's shell commands that pass the recipe, joined across `\\` continuations, as words."""
    text = README.read_text().replace("\\\n", " ")
    commands = [line for line in text.splitlines() if "--config recipes/thinkless_r1_1.5b.yaml" in line]
    return [shlex.split(line) for line in commands]


def test_the_readme_commands_load_the_recipe():
    commands = recipe_commands()
    assert len(commands) >= 2  # one process, and torchrun under "Many GPUs"
    recipe = load_config(RECIPE)
    for words in commands:
        assert words[words.index("thinkless-train") + 1] == "rl"
        overrides = [w for w in words[words.index("--config") + 2 :] if "=" in w]
        config = load_config(RECIPE, overrides)
        assert config.model.path == "runs/warmup"
        given = {w.partition("=")[0] for w in overrides}
        for key, _ in table_rows():
            if key not in given:  # the command keeps every other value of the recipe
                assert value_of(config, key) == value_of(recipe, key), key
