"""`finetune tune`: optuna search through Trainer.hyperparameter_search, killed and resumed, on a tiny model."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from finetune.cli import main

optuna = pytest.importorskip("optuna")

SEARCH = [
    "--max_train_samples", "16", "--max_eval_samples", "16", "--per_device_eval_batch_size", "16",
    "--n_trials", "2", "--tune_seeds", "2", "--batch_sizes", "8", "--epoch_choices", "1",
    "--learning_rate_range", "1e-4", "1e-2", "--logging_steps", "1", "--disable_tqdm", "true",
    # A random tiny model scores F1 0 whatever its settings; its eval loss differs per trial (and is minimised).
    "--metric_for_best_model", "loss",
]


def tune_command(model_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "finetune", "tune", "glue-mrpc", "--model_name_or_path", str(model_dir),
            "--output_dir", str(out), *SEARCH]


def study_trials(out: Path) -> list:
    storage = f"sqlite:///{out / 'tune.db'}"
    return optuna.load_study(study_name="glue-mrpc", storage=storage).get_trials(deepcopy=True)


def first_completed_trial(out: Path) -> bool:
    try:
        return any(t.state == optuna.trial.TrialState.COMPLETE for t in study_trials(out))
    except Exception:  # the study does not exist yet, or sqlite is busy being written
        return False


def test_tune_killed_after_first_trial_resumes(tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "search"
    command = tune_command(tiny_model_dir("bert"), out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    deadline = time.monotonic() + 600  # generous: the imports alone take a minute on a loaded 2-core machine
    while not first_completed_trial(out):
        assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial completed in 600 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    assert process.returncode < 0, "the search finished before it could be killed"
    before = {t.number: t for t in study_trials(out)}
    first = before[0]
    assert first.state == optuna.trial.TrialState.COMPLETE
    assert len(first.user_attrs["seed_scores"]) == 2
    assert first.value == pytest.approx(sum(first.user_attrs["seed_scores"]) / 2)
    # one evaluation per seed, reported to the pruner as (seed position) * 10000 + (evaluation number)
    assert sorted(first.intermediate_values) == [1, 10001]

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = study_trials(out)
    counted = [t for t in after if not t.user_attrs.get("interrupted")]
    assert len(counted) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in counted)
    assert after[0].datetime_complete == first.datetime_complete and after[0].value == first.value  # not rerun
    interrupted = [t for t in after if t.user_attrs.get("interrupted")]
    assert all(t.state == optuna.trial.TrialState.FAIL for t in interrupted)
    if interrupted and interrupted[0].params:  # killed mid-trial: its settings ran again next
        assert after[interrupted[0].number + 1].params == interrupted[0].params

    best_trial = min(counted, key=lambda t: t.value)
    recipe = out / "best_recipe.yaml"
    assert f"best validation score {best_trial.value:.4f}" in rerun.stdout
    assert "seed 42" in recipe.read_text().splitlines()[1]
    from finetune.config import parse_run_config

    config = parse_run_config(str(recipe))
    assert config.training.learning_rate == pytest.approx(best_trial.params["learning_rate"])
    assert config.training.per_device_train_batch_size == 8 and config.training.num_train_epochs == 1
    assert config.model.model_name_or_path == str(tiny_model_dir("bert"))
    assert config.data.task_name == "mrpc" and config.data.max_train_samples == 16
    assert "tune" not in yaml.safe_load(recipe.read_text()) and "output_dir" not in recipe.read_text()
    table = (out / "tune_results.md").read_text().splitlines()
    assert len(table) == 2 + len(after) and f"| {best_trial.number} (best) |" in "\n".join(table)
    assert (out / "tune_results.csv").read_text().count("\n") == 1 + len(after)
    assert (out / "tune_trials.png").stat().st_size > 1000


def test_tune_without_optuna_is_one_line(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    assert main(["tune", "glue-mrpc", "--output_dir", str(tmp_path / "search")]) == 2
    expected = "finetune: error: finetune tune needs optuna: pip install 'finetune[tune]'"
    assert capsys.readouterr().err.strip() == expected


def test_tune_space_errors(tmp_path: Path, capsys) -> None:
    assert main(["tune", "glue-mrpc", "--learning_rate_range", "1e-3", "1e-5", "--output_dir", str(tmp_path)]) == 2
    assert "--learning_rate_range 0.001 1e-05: must be one value or 'low high'" in capsys.readouterr().err
    assert main(["tune", "glue-mrpc", "--backend", "ray", "--tune_seeds", "2", "--output_dir", str(tmp_path)]) == 2
    assert "--tune_seeds 2: the ray backend trains one seed per trial" in capsys.readouterr().err


@pytest.mark.slow
def test_tune_on_a_local_ray_instance_and_resume(tiny_model_dir, tmp_path: Path) -> None:
    """--backend ray: Trainer.hyperparameter_search on Ray Tune (local instance); the rerun resumes the experiment.

    Ray is an optional extra (pip install 'finetune[ray]'), so this is skipped where it is not installed.
    """
    pytest.importorskip("ray.tune")
    out = tmp_path / "ray-search"
    command = [*tune_command(tiny_model_dir("bert"), out), "--backend", "ray", "--tune_seeds", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = (out / "tune_results.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",complete," in row for row in rows[1:])
    trial_folders = sorted(p.name for p in (out / "ray" / "glue-mrpc").glob("_objective_*"))
    assert len(trial_folders) == 2

    again = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in (out / "ray" / "glue-mrpc").glob("_objective_*")) == trial_folders  # no new trial
    assert "2 trials finished" in again.stdout
    from finetune.config import parse_run_config

    table = list(csv.DictReader((out / "tune_results.csv").open()))
    best = min(table, key=lambda row: float(row["score"]))  # eval loss: lower is better
    config = parse_run_config(str(out / "best_recipe.yaml"))
    assert config.training.learning_rate == pytest.approx(float(best["learning_rate"]))
