"""Raw datasets from the Hub (or mirror) or from local files, checked before anything is tokenized."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
from datasets import Dataset, DatasetDict

from finetune import mirror
from finetune.errors import FinetuneError

VALIDATION_SPLIT_SEED = 42  # not the training seed: evaluate must carve the same rows

if TYPE_CHECKING:  # config imports the task registry, whose families use this module
    from finetune.config import DataConfig

# Local file suffix -> `datasets` builder; tsv is csv with a tab delimiter.
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_hub_dataset(dataset_name: str, config_name: str | None) -> DatasetDict:
    """``load_dataset(dataset_name, config_name)`` through the mirror, with one-line errors."""
    try:
        return mirror.load_or_explain(
            lambda path: datasets.load_dataset(path, config_name), dataset_name, "datasets"
        )
    except ValueError as error:  # datasets names unknown configs and splits with a ValueError
        raise FinetuneError(
            f"dataset '{dataset_name}' has no configuration '{config_name}' here: {mirror.first_line(error)}"
        ) from None


def load_local_files(files: dict[str, str]) -> DatasetDict:
    """Local csv/tsv/json/jsonl/parquet files, one per split."""
    suffixes = set()
    for split, file in files.items():
        path = Path(file)
        if not path.is_file():
            raise FinetuneError(f"{split} file {file} does not exist")
        if path.suffix.lower() not in FILE_BUILDERS:
            raise FinetuneError(f"{split} file {file}: unsupported format (use {', '.join(FILE_BUILDERS)})")
        if has_no_rows(path):
            raise FinetuneError(f"{split} file {file} is empty: it holds no examples")
        if path.suffix.lower() in (".csv", ".tsv"):
            check_field_counts(path, split)
        suffixes.add(path.suffix.lower())
    builders = {FILE_BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise FinetuneError(f"data files must share one format, got {', '.join(sorted(suffixes))}")
    kwargs = {"delimiter": "\t"} if suffixes == {".tsv"} else {}
    try:
        return datasets.load_dataset(builders.pop(), data_files=files, **kwargs)
    except Exception as error:  # parser errors from pandas/pyarrow/json have many types
        raise FinetuneError(f"cannot read data files {sorted(files.values())}: {mirror.first_line(error)}") from None


def check_field_counts(path: Path, split: str) -> None:
    """Every row of a csv/tsv has as many fields as its header.

    pandas reads a row with more fields than the header by taking the extra leading ones as an index, so the
    columns shift and the run later stops on a missing label: the error must name the row instead.
    """
    import csv

    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, [])
        for row in reader:
            if row and len(row) != len(header):
                raise FinetuneError(
                    f"{split} file {path}: line {reader.line_num} has {len(row)} field(s) but the header "
                    f"({delimiter.join(header)}) has {len(header)}: a malformed {path.suffix[1:]} (quote values "
                    "that contain the delimiter)"
                )


def has_no_rows(path: Path) -> bool:
    """Whether a data file holds no examples: a header-only csv/tsv, a blank or ``[]`` json/jsonl, a 0-row parquet.

    ``datasets`` reports such a file as 'Instruction "train" corresponds to no data', which does not say why.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(path).num_rows == 0
        except Exception:  # not parquet after all: load_dataset says what is wrong with it
            return False
    needed = 2 if suffix in (".csv", ".tsv") else 1  # a csv's first line is its header
    seen = []
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                seen.append(line.strip())
                if len(seen) >= needed:
                    break
    if suffix in (".json", ".jsonl") and seen == [b"[]"]:
        return True
    return len(seen) < needed


def local_files(cfg: DataConfig) -> dict[str, str]:
    pairs = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    return {split: file for split, file in pairs.items() if file}


def load_raw_datasets(cfg: DataConfig, default_name: str | None, default_config: str | None) -> DatasetDict:
    """Local files when any are given, else the Hub dataset (the preset's unless overridden)."""
    files = local_files(cfg)
    if files:
        return load_local_files(files)
    name = cfg.dataset_name or default_name
    if not name:
        raise FinetuneError("no data: set dataset_name (a Hub id) or train_file/validation_file")
    return load_hub_dataset(name, cfg.dataset_config_name or default_config)


def require_columns(dataset: DatasetDict, columns: Iterable[str | None], where: str) -> None:
    """Fail with the missing column and the available ones, before tokenizing."""
    for split, data in dataset.items():
        missing = [c for c in columns if c and c not in data.column_names]
        if missing:
            raise FinetuneError(
                f"column {missing[0]!r} not in the {split} split of {where} (columns: {', '.join(data.column_names)})"
            )


def truncated(data: Dataset, limit: int | None) -> Dataset:
    return data.select(range(min(limit, len(data)))) if limit is not None else data


def tokenized(dataset: Dataset, split: str, encode: Callable, encoding: dict[str, Any], cfg: DataConfig) -> Dataset:
    """``dataset`` mapped in batches through ``encode(batch, **encoding)`` into model inputs only.

    ``encoding`` holds plain values because datasets fingerprints them: an identical fingerprint in every
    process is what lets the other processes read the main process's cache.
    """
    return dataset.map(
        encode,
        fn_kwargs=encoding,
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=cfg.preprocessing_num_workers,
        load_from_cache_file=not cfg.overwrite_cache,
        desc=f"Tokenizing {split}",
    )


def require_rows(data: Dataset, split: str, where: str) -> None:
    if len(data) == 0:
        raise FinetuneError(f"the {split} split of {where} is empty")


def with_validation_split(raw: DatasetDict, percentage: int | None) -> DatasetDict:
    """``raw`` with a validation split carved out of train when asked (for data that comes as one file)."""
    if percentage is None:
        return raw
    if "train" not in raw:
        raise FinetuneError("validation_split_percentage needs a train split to carve the validation split from")
    if "validation" in raw:
        raise FinetuneError("validation_split_percentage: the data already has a validation split")
    if not 0 < percentage < 100:
        raise FinetuneError(f"validation_split_percentage must be between 1 and 99, got {percentage}")
    # A fixed seed, not the training seed: `finetune evaluate RUN_DIR` must carve the same validation rows.
    parts = raw["train"].train_test_split(test_size=percentage / 100, seed=VALIDATION_SPLIT_SEED)
    return DatasetDict({**raw, "train": parts["train"], "validation": parts["test"]})
