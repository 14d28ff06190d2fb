"""Docs that cannot rot (issue 25): every `finetune ...` command in the fenced shell blocks of README.md and
docs/*.md goes through finetune's real argument parsing and validation, in this process, loading no model
and no data. A renamed flag, a removed recipe or an invalid value in the docs fails here, named by its
file and line (the test id is ``docs/lora.md:5``).

What runs for each command (``finetune.cli.main`` with the command's argv):

- ``train``, ``tune``, ``glue``: with ``--print_config`` appended. The recipe is read, every flag parsed and
  validated (ranges, choices, paths, fields against each other, TrainingArguments' own checks, the tracker
  check) and the derived settings decided, exactly as a run does before it loads anything; then it exits 0.
- ``evaluate``, ``predict``: the commands' own config building runs (the MODEL folder check, the run's saved
  settings, the flags, validation); only ``pipeline.evaluate`` / ``pipeline.predict``, which load the model
  and the data, are replaced by stubs.
- ``merge``, ``push``: their real argument parsers run; ``pipeline.merge`` and ``hub.push.push_run`` (which load
  the base model, read the run and talk to the Hub) are replaced by stubs. Argument parsing only.
- ``recipes``, ``runs``, ``--version``, ``--help``: run as they are (they load nothing).
- ``accelerate launch [--config_file F] -m finetune ...`` and ``python -m finetune ...``: the finetune part as
  above, and F must exist in the checkout. ``sbatch ... launch/slurm.sh RECIPE ARGS`` is checked as
  ``finetune train RECIPE ARGS`` (what the script runs on each node), and launch/slurm.sh must exist.
- ``VAR=value`` prefixes are set in the environment for that command.

A command the docs show failing on purpose is listed in DOCUMENTED_ERRORS with the message it must print,
and QLoRA (``--load_in_4bit``) must be refused with its one line where it cannot run (no bitsandbytes; without CUDA,
one older than its CPU backend) and pass elsewhere.

Stand-ins: each command runs in a scratch checkout, ``<tmp>/main`` beside ``<tmp>/shared`` (a link to the real
../shared), so ``../shared/hub`` and the recipes' ``../shared/data/...`` paths resolve as they do in the
repository. The files the docs invent are created there first (see ``make_standins``):

- data: ``train.csv``, ``dev.csv``, ``test.csv`` (columns review, sentiment: 3 classes), ``reviews.csv``
  (review, stars: 1, 3, 5), ``pairs.jsonl`` and ``dev.jsonl`` (question, passage, answer, and a WMT-style
  translation {en, de}), ``train.jsonl`` (translation {en, de}), ``news.csv`` (body, headline);
- recipes: ``my_recipe.yaml`` (a copy of glue-mrpc), ``reviews.yaml`` (train.csv / dev.csv, review, sentiment),
  ``runs/tune-rte/best_recipe.yaml`` (a copy of glue-rte, as ``finetune tune`` writes one);
- ``runs/glue-minilm/``: an empty folder for ``finetune runs runs/glue-minilm``;
- run folders for evaluate/predict: ``runs/<name>/`` with a ``config.json`` and the ``finetune_config.yaml`` of
  the recipe of that name (STANDIN_RUNS maps the names that are not recipes).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT, SHARED

from finetune import cli, mirror
from finetune.config import RESOLVED_CONFIG_NAME, parse_run_config, recipe_path

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
#: The two set-up commands (issue 25: kept byte for byte; CI's .ci/run runs the second).
SETUP_COMMANDS = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && FINETUNE_HUB_MIRROR=../shared/hub "
    "finetune train glue-mrpc --output_dir runs/glue-mrpc",
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && ruff check . && python -m pytest -q',
)
README_MAX_LINES = 250
PRINTS_CONFIG = {"train", "tune", "glue"}
#: Commands the docs show failing on purpose (argv after `finetune`) -> what stderr must say. Exit code 2.
DOCUMENTED_ERRORS = {
    "train glue-mrpc --learning_rate -1": "--learning_rate -1",
}
#: Run folders the docs name that are not recipe names -> the stand-in recipe whose resolved config they hold.
STANDIN_RUNS = {"reviews": "reviews.yaml"}
REVIEWS = "review,sentiment\nCold soup.,negative\nDecent pasta.,neutral\nBest curry in town!,positive\n"
PAIRS = ('{"question": "Is it open?", "passage": "Open daily.", "answer": true, '
         '"translation": {"en": "Good morning.", "de": "Guten Morgen."}}\n')


@dataclass
class DocCommand:
    doc: str  # path relative to the repository root
    line: int  # 1-based line where the command starts
    text: str  # the shell text of the command (one segment of a line)
    argv: list[str]  # what follows `finetune`
    env: dict[str, str] = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)  # checkout files the launcher names (launch configs, slurm.sh)

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def shell_lines(markdown: str) -> list[tuple[int, str]]:
    """(line number, logical line) of every fenced shell block: ``\\`` continuations joined, ``$ `` prompts off."""
    lines = markdown.splitlines()
    found: list[tuple[int, str]] = []
    fence: str | None = None
    language = ""
    pending: tuple[int, str] | None = None
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        match = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", stripped)
        if fence is None:
            if match:
                fence, language = match.group(1), match.group(2).lower()
            continue
        if stripped.startswith(fence) and stripped.strip("`~") == "":
            fence = None
            continue
        if language not in SHELL_BLOCKS:
            continue
        text = stripped[2:] if stripped.startswith("$ ") else stripped
        start, joined = pending if pending else (number, "")
        joined = f"{joined} {text}".strip() if joined else text
        if joined.endswith("\\"):
            pending = (start, joined[:-1].rstrip())
            continue
        pending = None
        if joined:
            found.append((start, joined))
    return found


def segments(line: str) -> list[list[str]]:
    """The words of each simple command of a shell line (split at ``&&``, ``||``, ``;``, ``|``, ``&``), comments off."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    parts: list[list[str]] = [[]]
    for word in lexer:
        if word and set(word) <= set(";&|"):
            parts.append([])
        else:
            parts[-1].append(word)
    return [part for part in parts if part]


def finetune_argv(words: list[str]) -> tuple[list[str], dict[str, str], list[str]] | None:
    """(argv after `finetune`, environment prefix, checkout files named) when the words invoke finetune."""
    env: dict[str, str] = {}
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        name, _, value = words[0].partition("=")
        env[name] = value
        words = words[1:]
    if not words:
        return None
    head = words[0].rsplit("/", 1)[-1] if words[0].endswith("bin/finetune") else words[0]
    if head == "finetune":
        return words[1:], env, []
    if head in ("python", "python3") and words[1:3] == ["-m", "finetune"]:
        return words[3:], env, []
    if head == "accelerate" and words[1:2] == ["launch"]:
        for i, word in enumerate(words):
            if word == "-m" and words[i + 1:i + 2] == ["finetune"]:
                launcher = words[2:i]
                needs = [launcher[j + 1] for j, w in enumerate(launcher[:-1]) if w == "--config_file"]
                return words[i + 2:], env, needs
            if word.endswith("bin/finetune"):  # accelerate launch [options] .venv/bin/finetune ...
                return words[i + 1:], env, []
        return None
    if head == "sbatch":
        for i, word in enumerate(words):
            if word.endswith("launch/slurm.sh"):
                return ["train", *words[i + 1:]], env, [word]
    return None


def doc_commands(path: Path) -> list[DocCommand]:
    doc = path.relative_to(ROOT).as_posix()
    commands: list[DocCommand] = []
    for number, line in shell_lines(path.read_text()):
        for words in segments(line):
            parsed = finetune_argv(words)
            if parsed is not None:
                argv, env, needs = parsed
                commands.append(DocCommand(doc, number, shlex.join(words), argv, env, needs))
    return commands


ALL_COMMANDS = [command for path in DOCS for command in doc_commands(path)]


def command_ids(commands: list[DocCommand]) -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for command in commands:
        seen[command.id] = seen.get(command.id, 0) + 1
        ids.append(command.id if seen[command.id] == 1 else f"{command.id}#{seen[command.id]}")
    return ids


# ---------------------------------------------------------------------------------------------------------


def make_standins(tmp_path: Path) -> Path:
    """A scratch checkout beside ../shared with the files the docs invent (module docstring); returns it."""
    checkout = tmp_path / "main"
    checkout.mkdir()
    (tmp_path / "shared").symlink_to(SHARED, target_is_directory=True)
    for name in ("train.csv", "dev.csv", "test.csv"):
        (checkout / name).write_text(REVIEWS)
    (checkout / "reviews.csv").write_text('review,stars\n"Cold soup, rude waiter.",1\nDecent pasta.,3\nBest!,5\n')
    for name in ("pairs.jsonl", "dev.jsonl", "train.jsonl"):
        (checkout / name).write_text(PAIRS)
    (checkout / "news.csv").write_text("body,headline\nThe council met on Monday and agreed.,Council agrees\n")
    shutil.copy(recipe_path("glue-mrpc"), checkout / "my_recipe.yaml")
    (checkout / "reviews.yaml").write_text(
        "# Reviews (stand-in recipe of tests/test_docs.py)\n"
        "data:\n  train_file: train.csv\n  validation_file: dev.csv\n  text_column: review\n"
        "  label_column: sentiment\n"
    )
    (checkout / "runs" / "glue-minilm").mkdir(parents=True)  # `finetune runs runs/glue-minilm`: a folder, no runs yet
    (checkout / "runs" / "tune-rte").mkdir(parents=True)
    shutil.copy(recipe_path("glue-rte"), checkout / "runs" / "tune-rte" / "best_recipe.yaml")
    return checkout


def make_standin_run(checkout: Path, model: str) -> None:
    """``runs/<name>``, as a finished run leaves it for evaluate/predict: config.json and finetune_config.yaml."""
    run = checkout / model
    if not model.startswith("runs/") or run.exists():
        return
    name = Path(model).name
    recipe = STANDIN_RUNS.get(name, name)
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}\n")
    (run / RESOLVED_CONFIG_NAME).write_text(parse_run_config(recipe, ["--output_dir", model]).to_yaml())


class Stub:
    def __init__(self, result=None):
        self.calls: list[tuple] = []
        self.result = result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


def run_doc_command(argv: list[str], checkout: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> int:
    """finetune.cli.main(argv) the way the test checks a doc command; its exit code."""
    from finetune import pipeline
    from finetune.hub import push

    monkeypatch.chdir(checkout)
    # use_mirror() sets FINETUNE_HUB_MIRROR itself: register it so that monkeypatch puts it back afterwards.
    monkeypatch.setenv(mirror.MIRROR_ENV, os.environ.get(mirror.MIRROR_ENV, ""))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(pipeline, "evaluate", Stub({}))
    monkeypatch.setattr(pipeline, "predict", Stub({}))
    monkeypatch.setattr(pipeline, "merge", Stub(checkout / "merged"))
    monkeypatch.setattr(push, "push_run", Stub())
    command = argv[0] if argv else ""
    if command in ("evaluate", "predict") and len(argv) > 1:
        make_standin_run(checkout, argv[1])
    if command in PRINTS_CONFIG and not any(a in ("-h", "--help") for a in argv):
        argv = [*argv, cli.PRINT_CONFIG]
    try:
        return int(cli.main(argv) or 0)
    except SystemExit as exit_:  # argparse (push, --help of evaluate/predict)
        return exit_.code if isinstance(exit_.code, int) else 1


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=command_ids(ALL_COMMANDS))
def test_doc_command_parses_and_validates(
    command: DocCommand, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for needed in command.needs:
        assert (ROOT / needed).is_file(), f"{command.id}: `{command.text}` names {needed}, which does not exist"
    checkout = make_standins(tmp_path)
    code = run_doc_command(command.argv, checkout, monkeypatch, command.env)
    err = capsys.readouterr().err
    shown = " ".join(command.argv)
    if shown in DOCUMENTED_ERRORS:
        assert code == 2 and DOCUMENTED_ERRORS[shown] in err, f"{command.id}: `{command.text}` should fail: {err}"
        return
    from finetune.config import quantization_problem

    problem = quantization_problem("load_in_4bit") if "--load_in_4bit" in command.argv else None
    if problem:  # QLoRA where bitsandbytes (or, without CUDA, its CPU backend) is missing
        assert code == 2 and problem in err, f"{command.id}: `{command.text}`: {err}"
        return
    assert code == 0, f"{command.id}: `{command.text}` exits with {code}: {err.strip().splitlines()[-1:]}"


# ---------------------------------------------------------------------------------------------------------


def test_the_docs_have_commands_of_every_kind() -> None:
    """The collector finds what the docs hold (so an empty collection cannot pass silently)."""
    kinds = {c.argv[0] if c.argv else "" for c in ALL_COMMANDS}
    assert {"recipes", "train", "evaluate", "predict", "merge", "push", "glue", "tune", "runs"} <= kinds
    assert len(ALL_COMMANDS) >= 60
    assert any(c.needs for c in ALL_COMMANDS)  # accelerate launch lines were found
    assert any(c.env for c in ALL_COMMANDS)  # FINETUNE_HUB_MIRROR=... finetune ... was found


def test_collector_reads_shell_blocks_only() -> None:
    markdown = "\n".join([
        "```bash",
        "$ finetune train glue-mrpc \\",
        "    --learning_rate 3e-5   # a comment",
        "FINETUNE_HUB_MIRROR=../shared/hub finetune recipes && pip install x",
        "accelerate launch --config_file launch/fsdp.yaml -m finetune train glue-rte --bf16 false",
        "sbatch --nodes 4 launch/slurm.sh glue-mrpc --output_dir /shared/runs/mrpc",
        "finetune train glue-mrpc --report_to tensorboard & tensorboard --logdir runs",
        "```",
        "```yaml",
        "finetune: not a command",
        "```",
        "```",
        "python -m finetune runs",
        "```",
    ])
    found = []
    for number, line in shell_lines(markdown):
        for words in segments(line):
            parsed = finetune_argv(words)
            if parsed:
                found.append((number, *parsed))
    assert found == [
        (2, ["train", "glue-mrpc", "--learning_rate", "3e-5"], {}, []),
        (4, ["recipes"], {"FINETUNE_HUB_MIRROR": "../shared/hub"}, []),
        (5, ["train", "glue-rte", "--bf16", "false"], {}, ["launch/fsdp.yaml"]),
        (6, ["train", "glue-mrpc", "--output_dir", "/shared/runs/mrpc"], {}, ["launch/slurm.sh"]),
        (7, ["train", "glue-mrpc", "--report_to", "tensorboard"], {}, []),
        (13, ["runs"], {}, []),
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "glue-mrpc", "--learning_rat", "3e-5"], "--learning_rat"),  # a renamed or misspelt flag
        (["train", "glue-mrcp"], "glue-mrcp"),  # a recipe that does not exist
        (["train", "glue-mrpc", "--lr_scheduler_type", "sideways"], "sideways"),  # a value outside its choices
        (["train", "glue-mrpc", "--num_train_epochs", "-3"], "--num_train_epochs"),  # a value outside its range
        (["tune", "glue-rte", "--n_trials", "0"], "--n_trials"),
        (["glue", "--model_name_or_path", "X", "--tasks", "cola,nope"], "nope"),
        (["train", "--train_file", "missing.csv", "--validation_file", "dev.csv"], "missing.csv"),
        (["evaluate", "runs/glue-mrpc", "--max_eval_sample", "5"], "--max_eval_sample"),
        (["push", "runs/glue-mrpc", "--dry-run"], "--dry-run"),
        (["merge", "runs/glue-mrpc", "--outputdir", "x"], "--outputdir"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_a_broken_doc_command_fails(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    checkout = make_standins(tmp_path)
    assert run_doc_command(argv, checkout, monkeypatch, {}) != 0
    assert message in capsys.readouterr().err


def test_readme_is_short_and_keeps_the_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    lines = readme.splitlines()
    for command in SETUP_COMMANDS:
        assert command in lines, f"README.md lost the set-up command: {command}"
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[test]" && ruff check . && python -m pytest -q' in ci  # CI runs the second one


def test_docs_links_resolve() -> None:
    """Relative links between README.md, docs/ and BENCHMARKS.md point at files and headings that exist."""
    anchors: dict[Path, set[str]] = {}

    def heading_anchors(path: Path) -> set[str]:
        if path not in anchors:
            found = set()
            for line in path.read_text().splitlines():
                if line.startswith("#") and not line.startswith("#!"):
                    title = line.lstrip("#").strip().lower()
                    found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
            anchors[path] = found
        return anchors[path]

    broken = []
    for doc in [*DOCS, ROOT / "BENCHMARKS.md"]:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


if __name__ == "__main__":  # list what the test checks: python tests/test_docs.py
    for command, name in zip(ALL_COMMANDS, command_ids(ALL_COMMANDS), strict=True):
        print(f"{name}: finetune {shlex.join(command.argv)}")
