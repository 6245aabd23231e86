"""A downstream task's labelled examples (polarity, a local .csv/.jsonl file, a hub dataset) and the (train, eval)
splits the protocol fine-tunes and scores on: a cross-validation's folds, or a hub dataset's own splits."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mlm.config import DownstreamConfig, UserError
from mlm.hub import hub_reachable, offline_mode

FOLD_SEED = 0  # fixes the k-fold split: every model and every seed is scored on the same folds


@dataclass
class Examples:
    texts: List[Tuple[str, ...]]  # one text per example, or a sentence pair
    labels: List[int]  # class ids, 0 .. len(classes) - 1
    classes: List[str]  # class names, by id

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> "Examples":
        return Examples([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.classes)


def load_polarity(cfg: DownstreamConfig) -> Examples:
    """gensim's test_data/pang_lee_polarity.cor: 200 movie-review sentences, one per line as '__label__neg text'."""
    from mlm.data.sources import _gensim_test_file

    path = _gensim_test_file("pang_lee_polarity.cor")
    rows = []
    # Pang and Lee's bytes: Windows-1252 (0x97: an em dash)
    for n, line in enumerate(path.read_text(encoding="cp1252").splitlines(), 1):
        label, _, text = line.partition(" ")
        if not label.startswith("__label__") or not text.strip():
            raise UserError(f"{path}, line {n}: not '__label__<class> <text>'")
        rows.append(((text.strip(),), label.removeprefix("__label__")))
    return _with_class_ids(rows)


def _with_class_ids(rows: List[Tuple[Tuple[str, ...], Any]]) -> Examples:
    """(texts, raw label) rows -> Examples; labels sorted as numbers when all are integers (1 < 2 < 10), else as strings."""
    values = sorted({label for _, label in rows}, key=lambda v: (0, int(v), "") if _is_int(v) else (1, 0, str(v)))
    ids = {v: i for i, v in enumerate(values)}
    return Examples([t for t, _ in rows], [ids[label] for _, label in rows], [str(v) for v in values])


def _is_int(value: Any) -> bool:
    try:
        return int(value) == float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        return False


def _label(value: Any, where: str, name: str) -> Any:
    """A row's class label: a string, an integer (or a number equal to one: 1.0 is class 1) or another finite number.
    A JSON object or list has no class name to sort by, and inf or nan none to compare with (each nan would be a class)."""
    if not isinstance(value, (str, int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise UserError(f"{where}: {name}={json.dumps(value)[:60]} is not a class label; use a string or an integer")
    return int(value) if _is_int(value) else value


def load_local(cfg: DownstreamConfig) -> Examples:
    """A .csv (with a header row) or .jsonl file with the text_fields and label_field in every row; labels may
    be strings or integers. Cross-validated like polarity (a fixed test split is what kind=hub is for)."""
    path = Path(cfg.path)
    if not path.is_file():
        raise UserError(f"downstream.path={cfg.path!r}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise UserError(f"downstream.path={cfg.path!r}: use a .csv (with a header row) or a .jsonl file")
    fields = [*cfg.text_fields, cfg.label_field]
    rows = []
    for where, record in _csv_rows(path) if suffix == ".csv" else _jsonl_rows(path):
        missing = [f for f in fields if record.get(f) is None or str(record[f]).strip() == ""]
        if missing:
            raise UserError(f"{where}: no {missing[0]!r} (or it is empty); every row needs {', '.join(fields)}")
        rows.append(
            (tuple(str(record[f]) for f in cfg.text_fields), _label(record[cfg.label_field], where, cfg.label_field))
        )
    if not rows:
        raise UserError(f"{path} has no rows")
    return _with_class_ids(rows)


def _csv_rows(path: Path):
    # -sig: a BOM (Excel's CSVs) is not part of the first column's name
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.DictReader(f)
        for record in reader:
            yield f"{path}, line {reader.line_num}", record


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}, line {n}: a JSON {type(record).__name__}, not an object")
            yield f"{path}, line {n}", record


def load_hub_split(cfg: DownstreamConfig, split: str) -> Examples:
    """One split of a hub dataset (GLUE: path nyu-mll/glue, config_name sst2 | mrpc | rte); labels are its class ids."""
    import datasets

    name = f"{cfg.path}/{cfg.config_name}" if cfg.config_name else cfg.path
    if not offline_mode() and not hub_reachable():
        raise UserError(
            f"downstream dataset {name!r}: the Hugging Face hub is unreachable; use downstream=polarity or "
            "downstream=local downstream.path=<csv or jsonl>, or HF_HUB_OFFLINE=1 if it is in your Hugging Face cache"
        )
    try:
        data = datasets.load_dataset(cfg.path, cfg.config_name, split=split)
    except Exception as e:  # offline cache misses, 404s, unknown configs and splits all come as different types
        raise UserError(
            f"could not load downstream dataset {name!r} split {split!r}: {type(e).__name__}: "
            f"{(str(e).strip().splitlines() or [''])[0][:300]}"
        ) from e
    missing = [f for f in [*cfg.text_fields, cfg.label_field] if f not in data.column_names]
    if missing:
        raise UserError(
            f"downstream dataset {name!r} has no column {missing[0]!r}; its columns: {', '.join(data.column_names)}"
        )
    labels = data[cfg.label_field]
    if min(labels) < 0:  # GLUE's test splits: labels withheld (-1)
        raise UserError(
            f"downstream dataset {name!r} split {split!r} has no labels; score another split (downstream.eval_split=validation)"
        )
    feature = data.features[cfg.label_field]
    classes = list(feature.names) if hasattr(feature, "names") else [str(i) for i in range(max(labels) + 1)]
    return Examples(list(zip(*(data[f] for f in cfg.text_fields))), labels, classes)


# kind -> examples to cross-validate (polarity, local); hub datasets come with their own splits
LOADERS: Dict[str, Callable[[DownstreamConfig], Examples]] = {"polarity": load_polarity, "local": load_local}


def stratified_folds(labels: Sequence[int], k: int, seed: int = FOLD_SEED) -> List[List[int]]:
    """k lists of example indices, each example in exactly one: every class shuffled (by `seed`) and dealt
    round-robin, continuing where the last class stopped, so fold sizes and class shares differ by at most one."""
    rng = np.random.default_rng(seed)
    folds: List[List[int]] = [[] for _ in range(k)]
    dealt = 0
    for c in sorted(set(labels)):
        for i in rng.permutation([i for i, label in enumerate(labels) if label == c]):
            folds[dealt % k].append(int(i))
            dealt += 1
    return [sorted(f) for f in folds]


def task_splits(cfg: DownstreamConfig) -> Tuple[str, List[Tuple[Examples, Examples]]]:
    """The protocol's name and its (train, eval) pairs: one for hub datasets, one per fold otherwise."""
    if cfg.kind == "hub":
        train = _capped(load_hub_split(cfg, cfg.train_split), cfg.max_train_examples)
        return f"{cfg.train_split} -> {cfg.eval_split}", [(train, load_hub_split(cfg, cfg.eval_split))]
    examples = LOADERS[cfg.kind](cfg)
    if len(set(examples.labels)) < 2:
        raise UserError(
            f"downstream task {task_name(cfg)!r} has one class only ({examples.classes[0]!r}); a classifier needs two or more"
        )
    if len(examples) < cfg.folds:
        raise UserError(
            f"downstream task {task_name(cfg)!r} has {len(examples)} examples, fewer than downstream.folds={cfg.folds}"
        )
    folds = stratified_folds(examples.labels, cfg.folds)
    pairs = []
    for held_out in folds:
        held = set(held_out)
        train = examples.subset([i for i in range(len(examples)) if i not in held])
        pairs.append((_capped(train, cfg.max_train_examples), examples.subset(held_out)))
    return f"{cfg.folds}-fold cross-validation", pairs


def _capped(examples: Examples, limit: Optional[int]) -> Examples:
    """A fixed random subset of at most `limit` examples (the same for every seed and every model)."""
    if limit is None or len(examples) <= limit:
        return examples
    return examples.subset(sorted(np.random.default_rng(FOLD_SEED).permutation(len(examples))[:limit].tolist()))


def task_name(cfg: DownstreamConfig) -> str:
    return cfg.task or cfg.config_name or (Path(cfg.path).stem if cfg.path else str(cfg.kind))
