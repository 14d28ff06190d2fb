"""Build the folder that ``benchmarks/gpu_check.py --bundle`` runs from on a lent GPU machine.

That machine (one H200) reaches no Hub and no package registry, and ``../shared`` does not travel to it:
only the checkout and the ignored paths named in ``carry`` do, 64 MiB in all. Its image has torch,
transformers, accelerate, peft, huggingface-hub, pyarrow, scikit-learn, sacrebleu, safetensors, tokenizers
and sentencepiece; it lacks datasets, evaluate, rouge-score and what they need. So the bundle holds:

    python benchmarks/gpu_bundle.py --out .gpu          # about 51 MiB; refuses to write more than 60 MiB
    python benchmarks/gpu_check.py --bundle .gpu --dry_run

Contents, and which step reads what:

- ``wheels/``: the packages the image lacks (datasets, evaluate, rouge-score, httpx2, and their needs that the
  image lacks too: dill, multiprocess, nltk, defusedxml, httpcore2, truststore), for CPython 3.12 on x86_64,
  at the versions this venv tests with; nothing the image has, so no torch. Read by ``install``, which puts
  them into a temporary ``--target``; every later step imports from there.
- ``hub/models/sentence-transformers/all-MiniLM-L6-v2/``: config, tokenizer and card, no weights file; and
  ``weights/sentence-transformers/all-MiniLM-L6-v2/model.bf16.safetensors``: its real pretrained weights
  rounded to bf16 (45 MB; fp32 is 91 MB). ``prepare`` writes them back as fp32 ``model.safetensors`` into its
  working mirror, because transformers loads a checkpoint in the dtype of its weights and the bf16 check
  needs fp32 master weights. Read by bf16 ``glue_encoder`` and ``encoder_decoder_generation`` (bert2bert),
  ``single_gpu`` and ``fsdp_one_process``.
- ``dense/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1/``: what finetune's GGUF
  conversion writes (config, generation config, tokenizer, chat template), minus the weights. ``prepare``
  gives it random weights and puts it where finetune caches the dense copy, so the recipe's ``gguf_file``
  runs unchanged without the 94 MB GGUF or the gguf package. Read by bf16 ``decoder_generation`` and
  ``smollm2_generation``.
- ``hub/datasets/nyu-mll/glue/``: MRPC, all three splits, and a README listing the mrpc config only. Read by
  bf16 ``glue_encoder``, ``single_gpu`` and ``fsdp_one_process``.
- ``hub/datasets/allenai/scitldr/``: SciTLDR Abstract, the first 512 train and 64 validation rows. Read by
  bf16 ``decoder_generation`` and ``encoder_decoder_generation``, and ``smollm2_generation``.
- ``hub/spaces/evaluate-metric/``: the evaluate metric modules (glue, rouge, ...), for every step that
  evaluates.
- ``manifest.json``: what was built, from which versions and files; ``preflight`` and the summary report it.

The MFU check reads no file: a BERT-base-sized model from ``BertConfig()`` with random weights (throughput
does not depend on the weights). SmolLM2's weights are random for the same reason: its checks test the
decoder path (bf16 in effect, the launch config, generation during evaluation), not the summaries' quality.
MiniLM keeps its real weights because ``single_gpu`` trains a full MRPC epoch, whose F1 can then be set
against the CPU runs'.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MIRROR = ROOT.parent / "shared" / "hub"
BUNDLE_LIMIT_BYTES = 60 * 2**20

# ---------------------------------------------------------------------------------------------------------
# What the device image has (read /work/.library/device/KINDS.md, "Python packages already there", as last
# read on a machine running the image on 2026-11-17). A wheel of one of these would replace or shadow the
# image's own build (torch above all), so none is carried.
# ---------------------------------------------------------------------------------------------------------

IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson
six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug
wheel wrapt xarray xxhash yarl zipp
""".split())

#: packages the check imports that the image lacks -> why; their needs that the image lacks follow them
WHEEL_ROOTS: dict[str, str] = {
    "datasets": "finetune.data loads every dataset through it; the MFU check's Dataset",
    "evaluate": "finetune.metrics loads the glue and rouge modules through it",
    "rouge-score": "the rouge metric module imports it (it brings nltk)",
    "httpx2": "finetune.hub.client names its error types when a Hub call fails",
}
#: published as a source archive only: built here into a pure-Python wheel
SOURCE_ONLY = frozenset({"rouge-score"})
#: not carried although the project depends on them: gguf (the dense SmolLM2 copy is seeded, so nothing is
#: dequantized), optuna (`finetune tune` is not checked)
NOT_CARRIED = ("gguf", "optuna")

#: the device's interpreter (Python 3.12.3 on x86_64 Linux), for pip and for wheels' environment markers
TARGET_PYTHON = "3.12"
TARGET_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                    "manylinux2014_x86_64", "manylinux1_x86_64")
TARGET_MARKERS = {
    "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "extra": "",
}

#: top-level imports the steps need (the project's, its metric modules', the check's) -> distribution
IMPORTS: dict[str, str] = {
    "torch": "torch", "transformers": "transformers", "accelerate": "accelerate", "peft": "peft",
    "huggingface_hub": "huggingface-hub", "safetensors": "safetensors", "tokenizers": "tokenizers",
    "numpy": "numpy", "pyarrow": "pyarrow", "yaml": "pyyaml", "filelock": "filelock", "requests": "requests",
    "sklearn": "scikit-learn", "scipy": "scipy", "sacrebleu": "sacrebleu", "matplotlib": "matplotlib",
    "absl": "absl-py", "six": "six", "datasets": "datasets", "evaluate": "evaluate", "rouge_score": "rouge-score",
    "nltk": "nltk", "httpx2": "httpx2", "dill": "dill", "multiprocess": "multiprocess",
}

# ---------------------------------------------------------------------------------------------------------
# Layout: which file each step reads (paths relative to the bundle; gpu_check's dry run checks them all)
# ---------------------------------------------------------------------------------------------------------

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_DIR = f"hub/models/{MINILM}"
MINILM_WEIGHTS = f"weights/{MINILM}/model.bf16.safetensors"
SMOLLM2_DIR = f"dense/{SMOLLM2}/{Path(SMOLLM2_GGUF).stem}"
SCITLDR_ROWS = {"train": 512, "validation": 64}  # smollm2_generation trains on 512 and evaluates on 64

MINILM_FILES = tuple(f"{MINILM_DIR}/{name}" for name in (
    "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"))
SMOLLM2_FILES = tuple(f"{SMOLLM2_DIR}/{name}" for name in (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"))
MRPC_FILES = ("hub/datasets/nyu-mll/glue/README.md",
              *(f"hub/datasets/nyu-mll/glue/mrpc/{split}-00000-of-00001.parquet"
                for split in ("train", "validation", "test")))
SCITLDR_FILES = ("hub/datasets/allenai/scitldr/README.md",
                 *(f"hub/datasets/allenai/scitldr/Abstract/{split}-00000-of-00001.parquet" for split in SCITLDR_ROWS))
GLUE_METRIC = ("hub/spaces/evaluate-metric/glue/glue.py",)
ROUGE_METRIC = ("hub/spaces/evaluate-metric/rouge/rouge.py",)
MANIFEST = "manifest.json"

#: step -> the bundle files it reads
STEP_FILES: dict[str, tuple[str, ...]] = {
    "prepare": (MINILM_WEIGHTS, *SMOLLM2_FILES),
    "preflight": (MANIFEST,),
    "bf16:glue_encoder": (*MINILM_FILES, MINILM_WEIGHTS, *MRPC_FILES, *GLUE_METRIC),
    "bf16:decoder_generation": (*SMOLLM2_FILES, *SCITLDR_FILES, *ROUGE_METRIC),
    "bf16:encoder_decoder_generation": (*MINILM_FILES, MINILM_WEIGHTS, *SCITLDR_FILES, *ROUGE_METRIC),
    "mfu": (),
    "single_gpu": (*MINILM_FILES, MINILM_WEIGHTS, *MRPC_FILES, *GLUE_METRIC),
    "fsdp_one_process": (*MINILM_FILES, MINILM_WEIGHTS, *MRPC_FILES, *GLUE_METRIC),
    "smollm2_generation": (*SMOLLM2_FILES, *SCITLDR_FILES, *ROUGE_METRIC),
}


# ---------------------------------------------------------------------------------------------------------
# Checking a bundle (gpu_check's dry run; light: no torch, no transformers)
# ---------------------------------------------------------------------------------------------------------


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_files(bundle: Path, steps: list[str]) -> dict[str, list[str]]:
    """bundle-relative path -> the steps that read it, for each such file the bundle lacks."""
    missing: dict[str, list[str]] = {}
    for step in steps:
        for relative in STEP_FILES.get(step, ()):
            if not (bundle / relative).is_file():
                missing.setdefault(relative, []).append(step)
    return missing


def wheel_metadata(path: Path) -> dict[str, Any]:
    """Name, version, top-level import names and the requirements that apply on the device, of one wheel."""
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
        info_dir = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        message = email.parser.Parser().parsestr(wheel.read(f"{info_dir}/METADATA").decode())
    tops = {n.split("/")[0].removesuffix(".py") for n in names
            if not n.split("/")[0].endswith((".dist-info", ".data")) and (n.endswith(".py") or "/" in n)}
    return {"file": path.name, "name": canonical(message["Name"]), "version": message["Version"],
            "imports": sorted(tops), "requires": device_requirements(message.get_all("Requires-Dist") or [])}


def device_requirements(lines: list[str]) -> list[str]:
    """The names of the requirements whose markers hold on the device (extras left out)."""
    from packaging.requirements import Requirement  # packaging: in the venv here and in the image

    names = []
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(TARGET_MARKERS):
            names.append(canonical(requirement.name))
    return names


def bundle_wheels(bundle: Path) -> list[dict[str, Any]]:
    return [wheel_metadata(path) for path in sorted((bundle / "wheels").glob("*.whl"))]


def wheel_problems(bundle: Path) -> list[str]:
    """What stops the wheels from covering the import list, or from installing beside the image."""
    wheels = bundle_wheels(bundle)
    carried = {w["name"] for w in wheels}
    problems = [f"two wheels of {name}" for name in sorted(carried) if [w["name"] for w in wheels].count(name) > 1]
    problems += [f"wheels/{w['file']}: the image has {w['name']}; carrying it would shadow the image's"
                 for w in wheels if w["name"] in IMAGE_PACKAGES]
    for module, dist in IMPORTS.items():
        if dist not in IMAGE_PACKAGES and not any(module in w["imports"] for w in wheels):
            problems.append(f"import {module}: no wheel in wheels/ provides it ({dist}) and the image lacks it")
    for w in wheels:
        unmet = [r for r in w["requires"] if r not in IMAGE_PACKAGES and r not in carried]
        problems += [f"wheels/{w['file']} needs {r}: neither a wheel here nor in the image" for r in unmet]
    return problems


# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------


def wheel_pins(roots: list[str]) -> dict[str, str]:
    """name -> version of the roots and their needs that the image lacks, at the versions installed here
    (the ones the test suite runs with), read from this environment's metadata."""
    pins: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = canonical(todo.pop())
        if name in pins or name in IMAGE_PACKAGES:
            continue
        try:
            pins[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"gpu_bundle: {name} is not installed here; install the project first") from None
        todo += device_requirements(metadata.requires(name) or [])
    return pins


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"gpu_bundle: {' '.join(command)} failed:\n{done.stderr[-3000:]}")


def fetch_wheels(pins: dict[str, str], target: Path) -> None:
    """Wheels for the device's Python from PyPI; source-only packages built here (pure Python)."""
    target.mkdir(parents=True)
    binary = [f"{n}=={v}" for n, v in sorted(pins.items()) if n not in SOURCE_ONLY]
    platforms = [arg for platform in TARGET_PLATFORMS for arg in ("--platform", platform)]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", TARGET_PYTHON,
        "--implementation", "cp", *platforms, "-d", str(target), *binary)
    built = [f"{n}=={v}" for n, v in sorted(pins.items()) if n in SOURCE_ONLY]
    if built:
        pip("wheel", "-q", "--no-deps", "-w", str(target), *built)
    impure = [p.name for p in target.glob("*.whl") if canonical(p.name.split("-")[0]) in SOURCE_ONLY
              and not p.name.endswith("-none-any.whl")]
    if impure:
        raise SystemExit(f"gpu_bundle: built wheels {impure} are not pure Python: they would not run on the device")


def copy_minilm(mirror: Path, out: Path) -> None:
    """Every MiniLM file but the fp32 weights, and the weights in bf16."""
    import torch
    from safetensors.torch import load_file, save_file

    source = mirror / "models" / MINILM
    shutil.copytree(source, out / MINILM_DIR, ignore=shutil.ignore_patterns("model.safetensors", "*.bin"))
    weights = {name: tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
               for name, tensor in load_file(source / "model.safetensors").items()}
    (out / MINILM_WEIGHTS).parent.mkdir(parents=True)
    save_file(weights, out / MINILM_WEIGHTS, metadata={"format": "pt"})


def write_smollm2_dense(mirror: Path, out: Path) -> None:
    """The non-weight files of finetune's dense copy of the GGUF, made by the same transformers calls."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    source = mirror / "models" / SMOLLM2
    target = out / SMOLLM2_DIR
    config = AutoConfig.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    config.architectures = ["LlamaForCausalLM"]  # what save_pretrained of the converted model records
    config.save_pretrained(target)
    GenerationConfig.from_model_config(config).save_pretrained(target)
    AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF).save_pretrained(target)


def copy_mrpc(mirror: Path, out: Path) -> None:
    """MRPC's three splits, and a README whose `configs:` block lists mrpc alone (datasets resolves the data
    files of every listed config, so a config whose files are absent would stop the load)."""
    import yaml

    glue = mirror / "datasets" / "nyu-mll" / "glue"
    target = out / "hub" / "datasets" / "nyu-mll" / "glue"
    shutil.copytree(glue / "mrpc", target / "mrpc")
    _, front, body = (glue / "README.md").read_text().split("---\n", 2)
    card = yaml.safe_load(front)
    card["configs"] = [c for c in card["configs"] if c["config_name"] == "mrpc"]
    note = "\n(GPU check bundle: the mrpc config alone, from ../shared/hub.)\n"
    (target / "README.md").write_text(f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n{body}{note}")


def copy_scitldr(mirror: Path, out: Path) -> None:
    """The first rows of each SciTLDR split (schema, and so the datasets features in it, unchanged)."""
    import pyarrow.parquet as pq

    source = mirror / "datasets" / "allenai" / "scitldr"
    target = out / "hub" / "datasets" / "allenai" / "scitldr"
    (target / "Abstract").mkdir(parents=True)
    shutil.copy2(source / "README.md", target / "README.md")
    for split, rows in SCITLDR_ROWS.items():
        name = f"Abstract/{split}-00000-of-00001.parquet"
        pq.write_table(pq.read_table(source / name).slice(0, rows), target / name)


def copy_metrics(mirror: Path, out: Path) -> None:
    shutil.copytree(mirror / "spaces" / "evaluate-metric", out / "hub" / "spaces" / "evaluate-metric")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def manifest(out: Path, mirror: Path, pins: dict[str, str]) -> dict[str, Any]:
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    files.pop(MANIFEST, None)
    return {
        "built_from": {"mirror": str(mirror), "python": sys.version.split()[0]},
        "wheels": pins, "not_carried": list(NOT_CARRIED), "image_packages_excluded": True,
        "minilm_weights": "real, rounded to bf16 (gpu_check writes them back as fp32)",
        "smollm2_weights": "none: random weights on the device (seed 0)",
        "scitldr_rows": SCITLDR_ROWS,
        "files": files, "bytes": sum(files.values()),
        "key": hashlib.sha1(json.dumps([pins, sorted(files)]).encode()).hexdigest()[:12],
    }


def build(out: Path, mirror: Path) -> dict[str, Any]:
    """Write the bundle into `out` (replaced whole: built beside it, then moved into place)."""
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise SystemExit(f"gpu_bundle: {out} exists and is not a bundle (no {MANIFEST}); not replacing it")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from the mirror
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        pins = wheel_pins(list(WHEEL_ROOTS))
        fetch_wheels(pins, partial / "wheels")
        copy_minilm(mirror, partial)
        write_smollm2_dense(mirror, partial)
        copy_mrpc(mirror, partial)
        copy_scitldr(mirror, partial)
        copy_metrics(mirror, partial)
        built = manifest(partial, mirror, pins)
        (partial / MANIFEST).write_text(json.dumps(built, indent=2) + "\n")
        size = folder_bytes(partial)
        if size > BUNDLE_LIMIT_BYTES:
            limit = BUNDLE_LIMIT_BYTES / 2**20
            raise SystemExit(f"gpu_bundle: {size / 2**20:.1f} MiB is over the {limit:.0f} MiB limit")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / ".gpu"), help="bundle folder (default: .gpu, git-ignored)")
    parser.add_argument("--mirror", default=os.environ.get("FINETUNE_HUB_MIRROR") or str(DEFAULT_MIRROR),
                        help="the offline Hub mirror to copy from (default: $FINETUNE_HUB_MIRROR, else ../shared/hub)")
    opts = parser.parse_args(argv)
    built = build(Path(opts.out).resolve(), Path(opts.mirror).expanduser().resolve())
    wheels = ", ".join(f"{n} {v}" for n, v in built["wheels"].items())
    print(f"gpu_bundle: {opts.out}: {built['bytes'] / 2**20:.1f} MiB, {len(built['files'])} files; wheels: {wheels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
