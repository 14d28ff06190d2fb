"""report.html (written by every training run, self-contained, rendered by a real headless Chromium) and
`finetune runs`."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLES, read_json, read_jsonl

from finetune.cli import main
from finetune.generation_metrics import first_sentence
from finetune.report import REPORT_NAME, number

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run")

# Put first in <head> of a copy of the page: records load errors of any element, then, after the load event,
# writes what the page shows into the DOM for --dump-dom to return.
PROBE = """<script>
window.probeErrors = [];
window.addEventListener("error", e => probeErrors.push(String(e.message || (e.target && e.target.outerHTML))), true);
window.addEventListener("load", () => {
  const section = document.getElementById("confusion-matrix");
  const img = section && section.querySelector("img");
  const box = img ? img.getBoundingClientRect() : {width: 0, height: 0};
  const result = {
    errors: probeErrors,
    images: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
    matrixImage: img ? [img.complete, img.naturalWidth, Math.round(box.width), Math.round(box.height)] : null,
    matrixCells: section ? Array.from(section.querySelectorAll("table.matrix tbody tr"))
      .map(tr => Array.from(tr.querySelectorAll("td")).slice(1).map(td => Number(td.textContent))) : null,
  };
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def mrpc_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "mrpc"
    assert main(["train", "glue-mrpc", "--model_name_or_path", str(tiny_model_dir("bert")), "--output_dir", str(out),
                 "--max_train_samples", "48", "--max_eval_samples", "40", "--num_train_epochs", "2",
                 "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--logging_steps", "1"]) == 0
    return out


def test_a_run_writes_a_self_contained_report(mrpc_run: Path) -> None:
    assert not (mrpc_run / "runs").exists()  # no tracker by default (--report_to none): no event files
    page = (mrpc_run / REPORT_NAME).read_text()
    # no server, network or script needed: nothing is fetched, every image is inline
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    assert "<script" not in page and "<link" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2  # the curves and the confusion matrix
    assert all(base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n") for data in images)
    for anchor in ("settings", "metrics", "curves", "confusion-matrix", "per-class", "mistakes"):
        assert f'id="{anchor}"' in page, anchor
    settings = page[page.index('id="settings"'):page.index('id="metrics"')]
    assert "<td>training.learning_rate</td><td>0.001</td>" in settings
    model = yaml.safe_load((mrpc_run / "finetune_config.yaml").read_text())["model"]["model_name_or_path"]
    assert f"<td>model.model_name_or_path</td><td>{model}</td>" in settings

    records = read_jsonl(mrpc_run / "predictions_validation.jsonl")
    assert len(records) == 40 and all(0.5 <= r["confidence"] <= 1.0 for r in records)
    wrong = sorted((r for r in records if r["label"] != r["prediction"]), key=lambda r: -r["confidence"])
    if wrong:  # the surest mistake is the first row of the mistakes table, with its text
        mistakes = page[page.index('id="mistakes"'):]
        assert f"{len(wrong)} of 40 wrong" in mistakes
        first_row = mistakes[mistakes.index("<tbody>"):].split("</tr>")[0]
        assert wrong[0]["sentence1"][:40].replace("&", "&amp;").replace('"', "&quot;")[:20] in first_row
    epochs = [e for e in read_json(mrpc_run / "trainer_state.json")["log_history"] if "eval_f1" in e]
    per_epoch = page[page.index('id="metrics"'):page.index('id="curves"')]
    final = read_json(mrpc_run / "metrics.json")["eval"]["validation"]
    assert len(epochs) == 2
    assert per_epoch.count("<tr>") == (1 + len(epochs)) + (1 + len(final))  # header + one row per epoch; final table


def test_the_report_renders_in_headless_chromium(mrpc_run: Path, tmp_path: Path) -> None:
    browser = chromium()
    if browser is None:  # the reason is printed in pytest's summary (-rs in pyproject.toml)
        pytest.skip("chromium is not installed (apt-get install -y chromium): report.html not checked in a browser")
    page = (mrpc_run / REPORT_NAME).read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=5000", "--window-size=1280,2000", "--dump-dom", probed.as_uri()],
            capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # the page logs nothing: no errors, no warnings
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stdout[-2000:]
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["errors"] == []
    assert result["images"] and all(complete and width > 0 for complete, width, _ in result["images"])
    complete, natural_width, shown_width, shown_height = result["matrixImage"]
    assert complete and natural_width > 0 and shown_width > 100 and shown_height > 100  # drawn, not collapsed

    # the matrix the browser shows holds the run's predictions: row = gold label, column = predicted
    records = read_jsonl(mrpc_run / "predictions_validation.jsonl")
    names = list(read_json(mrpc_run / "config.json")["id2label"].values())
    counts = Counter((r["label"], r["prediction"]) for r in records)
    assert result["matrixCells"] == [[counts[(gold, predicted)] for predicted in names] for gold in names]


def test_a_generation_run_reports_sources_references_predictions_and_baseline(tiny_model_dir, tmp_path) -> None:
    from test_generation_train import train_summarization

    out = tmp_path / "summaries"
    assert train_summarization(tiny_model_dir("t5"), out) == 0
    records = read_jsonl(out / "generated_predictions.jsonl")
    source_rows = [json.loads(line) for line in (SAMPLES / "xsum_sample" / "sample.jsonl").read_text().splitlines()]
    documents = {r["document"]: r for r in source_rows}
    for record in records:  # the baseline beside each prediction: lead-1 of that example's document
        assert record["baseline"] == first_sentence(documents[record["source"]]["document"])
    page = (out / REPORT_NAME).read_text()
    examples = page[page.index('id="examples"'):]
    assert "<th>source</th><th>references</th><th>prediction</th><th>baseline</th>" in examples
    assert examples.count("<tr>") == 1 + len(records) + 1 + 4  # examples table; model-vs-baseline table (4 ROUGE)
    assert html.escape(records[0]["baseline"]) in examples
    validation = read_json(out / "metrics.json")["eval"]["validation"]
    assert f"<td>rouge1</td><td>{number(validation['rouge1'])}</td><td>{number(validation['lead_1_rouge1'])}" in page
    assert 'id="confusion-matrix"' not in page


def test_runs_table_compares_the_runs_in_a_folder(mrpc_run: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs"
    shutil.copytree(mrpc_run, root / "mrpc-a", ignore=shutil.ignore_patterns("checkpoint-*", "*.safetensors"))
    shutil.copytree(mrpc_run, root / "bench" / "rte" / "seed-42", ignore=shutil.ignore_patterns("checkpoint-*"))
    (root / "not-a-run").mkdir()
    assert main(["runs", str(root)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["run", "model", "task", "metric", "value", "time", "samples/s"]
    assert [line.split()[0] for line in lines[1:]] == ["bench/rte/seed-42", "mrpc-a"]
    metrics = read_json(mrpc_run / "metrics.json")
    cells = lines[2].split()
    assert cells[2:5] == ["glue/mrpc", "f1", f"{metrics['eval']['validation']['f1']:.4f}"]
    assert cells[5:] == [f"{metrics['train']['train_runtime']:.0f}", "s",
                         f"{metrics['train']['train_samples_per_second']:.1f}"]
    assert main(["runs", str(tmp_path / "missing")]) == 2
