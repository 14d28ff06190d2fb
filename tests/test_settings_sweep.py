"""Every setting tried with bad values, generated from the config dataclasses (issue 18).

For every field of every section (``finetune.config.CONFIG_SECTIONS``), by its type:
- numbers: 0, -1, NaN, inf (floats), and a huge value;
- paths (``LocalPath`` rules in ``finetune.validation.RULES``): a path that does not exist;
- choices (an Enum in the type, argparse ``choices`` in the field metadata, or a ``Choice`` rule),
  structured values (a ``Structured`` rule: JSON objects, key=value pairs) and booleans: a wrong word.
Each case runs ``finetune train`` in-process on the tiny bert and an 8-row CSV, and must end with
- exit 0 (a legal value: it trained), or
- exit 2 with exactly one ``finetune: error:`` line, no traceback, and nothing written into output_dir
  (refused), or
- exit 2 with the one line of the non-finite-loss stop and no model saved (a legal but huge rate or
  decay that made training diverge: refused by the run, not by the settings).
A value that a rule of ``finetune.validation`` forbids must be refused, with the flag named.

Legal values that would make the run long or heavy are only parsed, not trained (``PARSE_ONLY``): a
huge ``max_steps``, and a huge number of worker processes. Every other case trains at most 2 steps
(``--max_steps 2`` comes first on the command line; the case's own flag comes last and wins).

Free-text settings (column names, ids, names) have no wrong word to try and are not generated here.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections import Counter
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.config import CONFIG_SECTIONS
from finetune.validation import RULES, Choice, LocalPath, Number, Structured

HUGE_INT = str(10**12)
HUGE_FLOAT = "1e30"
WRONG_WORD = "bogus"
#: (field, case) pairs whose value is legal but would run for hours or start countless processes
PARSE_ONLY = {("max_steps", "huge"), ("dataloader_num_workers", "huge"), ("preprocessing_num_workers", "huge")}
#: fields a launcher sets, not a user: local_rank >= 0 makes TrainingArguments join a process group
NOT_USER_SETTINGS = {"local_rank"}
#: fields with nothing to try: output_dir is created by the run
NOT_SWEPT = {"output_dir"}


def kind_of(field: dataclasses.Field, hint: object) -> str | None:
    """number, path, choice, bool, or None for free text and structured values."""
    rule = RULES.get(field.name)
    args = typing.get_args(hint) or (hint,)
    if isinstance(rule, LocalPath):
        return "path"
    if isinstance(rule, (Choice, Structured)) or "choices" in field.metadata:
        return "choice"
    if any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args):
        return "choice"
    if bool in args:
        return "bool"
    if int in args or float in args:
        return "number"
    return None


def values_for(kind: str, hint: object) -> list[tuple[str, str]]:
    """(case name, command-line value) pairs for one field."""
    if kind == "number":
        is_float = float in (typing.get_args(hint) or (hint,))
        cases = [("zero", "0"), ("minus_one", "-1"), ("nan", "nan")]
        if is_float:
            cases.append(("inf", "inf"))
        return [*cases, ("huge", HUGE_FLOAT if is_float else HUGE_INT)]
    if kind == "path":
        return [("missing", "MISSING")]  # replaced by a path under the test's tmp_path
    return [("wrong_word", WRONG_WORD)]


def generated_cases() -> list[tuple[str, str, str, str]]:
    """(section, field, case, value) for every swept field of every section."""
    cases = []
    for section, cls in CONFIG_SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            if not item.init or item.name in NOT_SWEPT | NOT_USER_SETTINGS:
                continue
            kind = kind_of(item, hints[item.name])
            if kind is None:
                continue
            cases += [(section, item.name, case, value) for case, value in values_for(kind, hints[item.name])]
    return cases


CASES = generated_cases()


def test_every_numeric_setting_has_a_rule() -> None:
    """A numeric field added without a rule in finetune.validation.RULES fails here."""
    missing = []
    for cls in CONFIG_SECTIONS.values():
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            numeric = item.init and kind_of(item, hints[item.name]) == "number"
            if numeric and not isinstance(RULES.get(item.name), Number):
                missing.append(item.name)
    assert missing == []


def test_case_count() -> None:
    """Adding or removing a setting changes this number: the sweep grows with the config by itself."""
    kinds = Counter(case for _, _, case, _ in CASES)
    print(f"{len(CASES)} generated cases: {dict(kinds)}")
    assert len(CASES) == 319, kinds


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep-data") / "reviews.csv"
    rows = ["a fine film,1", "dull and slow,0", "I loved it,1", "a waste of time,0", "great acting,1",
            "boring plot,0", "wonderful,1", "awful,0"]
    path.write_text("sentence,label\n" + "\n".join(rows) + "\n")
    return path


def train_argv(tiny_csv: Path, model: Path, out: Path) -> list[str]:
    return ["train", "--train_file", str(tiny_csv), "--validation_file", str(tiny_csv),
            "--model_name_or_path", str(model), "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--logging_steps", "1",
            "--disable_tqdm", "true", "--report_to", "none"]


def forbidden_by_rule(name: str, value: str) -> bool:
    """Whether finetune.validation's rule for ``name`` forbids ``value`` (numbers and choices only)."""
    rule = RULES.get(name)
    if isinstance(rule, Number):
        return rule.problem(name, float(value)) is not None
    if isinstance(rule, (Choice, Structured)):
        return rule.problem(name, value) is not None
    return isinstance(rule, LocalPath)


def untouched(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(("section", "name", "case", "value"), CASES, ids=[f"{c[1]}={c[2]}" for c in CASES])
def test_setting(section, name, case, value, tiny_csv, tiny_model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    if value == "MISSING":
        value = str(tmp_path / "no-such-path" / name)
    argv = [*train_argv(tiny_csv, tiny_model_dir("bert"), out), f"--{name}", value]
    if (name, case) in PARSE_ONLY:
        from finetune.config import parse_run_config

        config = parse_run_config(None, argv[1:])
        assert str(getattr(getattr(config, section), name)) == value
        print(f"\n{name}={case}: parsed only")
        return
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    print(f"\n{name}={case}: exit {code} {err.strip().splitlines()[-1] if code else ''}")
    if code == 0:
        assert not forbidden_by_rule(name, value), f"--{name} {value} was accepted against its rule"
        assert (out / "model.safetensors").is_file()
        return
    assert code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("finetune: error:")]
    assert len(errors) == 1, err[-3000:]
    if errors[0].startswith("finetune: error: training loss became "):
        assert not forbidden_by_rule(name, value)
        assert not (out / "model.safetensors").exists()
        return
    assert untouched(out), sorted(p.name for p in out.rglob("*"))
    if forbidden_by_rule(name, value):
        assert f"--{name}" in errors[0], errors[0]
