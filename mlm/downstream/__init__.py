"""Downstream evaluation: fine-tune a saved encoder for sentence classification, a few seeds, median reported.

`evaluate(model_dir, cfg)` loads the task's examples (`LOADERS`, by `downstream.kind`), and for
each seed fine-tunes a fresh copy of the model with a new classification head
(AutoModelForSequenceClassification: a new pooler and classifier on the trained encoder, also
where the checkpoint has a pooler), then scores it. The protocol, as in cramming's GLUE eval (a few short fine-tunes, the median kept):

- AdamW at downstream.lr (mlm.optim's parameter groups: no decay on biases and norms; weight decay
  0.01, betas 0.9/0.98), linear decay after a 10% warmup, gradients clipped at 1.0, fp32, the
  model's own dropout; downstream.epochs (polarity: 10) over the training examples in batches of
  downstream.batch_size, each example cut to downstream.max_length tokens (pairs together).
- polarity and local files: stratified k-fold cross-validation (downstream.folds, the folds fixed
  by FOLD_SEED): every example is scored once per seed by the model that did not train on it, and
  the accuracy is over all of them. hub (GLUE): train on train_split, score eval_split.
- A seed fixes the head's initial weights, the batch order and dropout: a rerun on the same device
  gives the same numbers (bitwise on CPU; GPU kernels may differ in the last bits).

The noise this leaves: polarity has 200 examples (100 neg, 100 pos), so one accuracy has a
binomial standard error of sqrt(p(1 - p) / 200), about 3.2 points at 70% accuracy (3.5 at 50%),
before the seed-to-seed spread of the fine-tunes (docs/downstream.md measures both): two encoders
closer than ~5 points on polarity are not told apart by it.

`python -m mlm.downstream <model dir> downstream=polarity [downstream.seeds=[0,1] ...]` (__main__.py)
runs it on any saved model (a run's final/, or package:<module>/<subdir>) and prints the result as JSON.
After MLM training, train() runs it on the run's final/ when downstream.kind is not none.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mlm import faults
from mlm.config import DownstreamConfig, ModelConfig, OptimizerConfig, SchedulerConfig, UserError
from mlm.hub import hub_reachable, offline_mode
from mlm.preemption import Interrupted, StopSignals, signal_name, stop_requested

log = logging.getLogger(__name__)

FOLD_SEED = 0  # fixes the k-fold split: every model and every seed is scored on the same folds
WARMUP_RATIO = 0.1  # of the fine-tuning steps, as in BERT's and RoBERTa's GLUE recipes
MAX_GRAD_NORM = 1.0


@dataclass
class Examples:
    texts: List[Tuple[str, ...]]  # one text per example, or a sentence pair
    labels: List[int]  # class ids, 0 .. len(classes) - 1
    classes: List[str]  # class names, by id

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> "Examples":
        return Examples([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.classes)


# ---------------------------------------------------------------- data: DownstreamConfig -> examples


def load_polarity(cfg: DownstreamConfig) -> Examples:
    """gensim's test_data/pang_lee_polarity.cor: 200 movie-review sentences, one per line as '__label__neg text'."""
    from mlm.data.sources import _gensim_test_file

    path = _gensim_test_file("pang_lee_polarity.cor")
    rows = []
    for n, line in enumerate(
        path.read_text(encoding="cp1252").splitlines(), 1
    ):  # Pang and Lee's bytes: Windows-1252 (0x97: an em dash)
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
    with open(
        path, newline="", encoding="utf-8-sig", errors="replace"
    ) as f:  # -sig: a BOM (Excel's CSVs) is not part of the first column's name
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


# ---------------------------------------------------------------- the protocol


def load_classifier(model_dir: str, num_labels: int, trust_remote_code: bool = False):
    """The saved encoder under a new classification head, its pooler new as well: a run's final/ (an MLM model)
    has none, and the encoder it started from may have one; a new one for both leaves only the encoder to compare.

    The attention backend is ours (the schema default), never the folder's config.json's: one there may name a hub
    kernel (org/repo), code that transformers would fetch and run. Its code runs only with `trust_remote_code`,
    a setting of the command being run."""
    from transformers import AutoModelForSequenceClassification

    from mlm.models import _hub_call, _quiet_transformers

    with _quiet_transformers():  # the "newly initialized: classifier..." report is expected here
        # through _hub_call: a folder's own code (auto_map) or pickled payload is one line, nothing of it run
        model = _hub_call(
            "model",
            model_dir,
            AutoModelForSequenceClassification.from_pretrained,
            model_dir,
            num_labels=num_labels,
            dtype=torch.float32,
            attn_implementation=ModelConfig.attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    pooler = getattr(model.base_model, "pooler", None)  # BERT's dense + tanh on [CLS]; RoBERTa's head has its own, new
    for module in pooler.modules() if pooler is not None else ():
        if isinstance(module, torch.nn.Linear):  # as BERT initialises it (transformers' own init skips loaded weights)
            torch.nn.init.normal_(module.weight, std=getattr(model.config, "initializer_range", 0.02))
            torch.nn.init.zeros_(module.bias)
    return model


def batches(examples: Examples, order: Sequence[int], batch_size: int, tokenizer, max_length: int, device):
    """Tokenized batches in `order`, padded to their own longest example."""
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        columns = list(zip(*(examples.texts[i] for i in idx)))  # one list per text field
        enc = tokenizer(
            *(list(c) for c in columns), truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        enc["labels"] = torch.tensor([examples.labels[i] for i in idx])
        yield {k: v.to(device) for k, v in enc.items()}


def finetune(
    model_dir: str,
    tokenizer,
    train: Examples,
    cfg: DownstreamConfig,
    seed: int,
    device,
    trust_remote_code: bool = False,
):
    """One fine-tune: a new head seeded by `seed`, AdamW with a linear schedule after a 10% warmup.

    Inside a training run a stop signal ends it at the next step (Interrupted): the fine-tune is redone by the rerun."""
    from mlm.optim import build_optimizer, build_scheduler

    if not len(train):  # the loop below would wait forever for a first batch
        raise UserError(f"downstream {task_name(cfg)!r}: no training examples to fine-tune on")
    torch.manual_seed(seed)  # the head's initial weights and dropout
    model = load_classifier(model_dir, len(train.classes), trust_remote_code).to(device)
    optimizer = build_optimizer(model, OptimizerConfig(lr=cfg.lr))
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = build_scheduler(optimizer, SchedulerConfig(name="linear", warmup_ratio=WARMUP_RATIO), total)
    order = torch.Generator().manual_seed(seed)  # the batch order, apart from the dropout stream
    model.train()
    step = 0
    while step < total:
        epoch_order = torch.randperm(len(train), generator=order).tolist()
        for batch in batches(train, epoch_order, cfg.batch_size, tokenizer, cfg.max_length, device):
            check_stop()
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            faults.reached("finetune")
            if step == total:
                break
    return model


def check_stop() -> None:
    """Raise Interrupted if a stop signal reached the training run this fine-tune belongs to (mlm.preemption)."""
    signum = stop_requested()
    if signum is not None:
        raise Interrupted(signum, f"stopped by {signal_name(signum)} during the downstream fine-tune")


@torch.no_grad()
def predict(model, tokenizer, examples: Examples, cfg: DownstreamConfig, device) -> List[int]:
    model.eval()
    out = []
    for batch in batches(examples, range(len(examples)), cfg.batch_size, tokenizer, cfg.max_length, device):
        batch.pop("labels")
        out += model(**batch).logits.argmax(-1).tolist()
    return out


def macro_f1(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """The mean over classes (those in the labels or the predictions) of each class's F1."""
    scores = []
    for c in sorted(set(labels) | set(predictions)):
        tp = sum(1 for y, p in zip(labels, predictions) if y == c and p == c)
        fp = sum(1 for y, p in zip(labels, predictions) if y != c and p == c)
        fn = sum(1 for y, p in zip(labels, predictions) if y == c and p != c)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def evaluate(model_dir, cfg: DownstreamConfig, device=None, trust_remote_code: bool = False) -> Dict[str, Any]:
    """Fine-tune and score `model_dir` once per seed; the result reports the median accuracy over seeds. Code shipped
    with the model runs only with `trust_remote_code`: the model.trust_remote_code of the command being run, never a file's."""
    from mlm.models import check_saved_model, load_tokenizer, resolve_path

    cfg.validate()
    if cfg.kind == "none":
        raise UserError("downstream.kind=none: choose a task, e.g. downstream=polarity (or sst2, mrpc, rte, local)")
    start = time.perf_counter()
    model_dir = resolve_path(str(model_dir))
    give = "give a run's final/ directory or package:<module>/<subdir>"
    if not Path(
        model_dir
    ).is_dir():  # a saved model only: no hub id (check_saved_model leaves a name like one to the hub lookup)
        raise UserError(f"{model_dir} is not a saved model (no such directory); {give}")
    check_saved_model(model_dir, give)
    device = torch.device(device) if device is not None else default_device()
    tokenizer = load_tokenizer(ModelConfig(name_or_path=model_dir, trust_remote_code=trust_remote_code))
    protocol, splits = task_splits(cfg)
    accuracies, f1s = [], []
    for seed in cfg.seeds:
        labels, predictions = [], []
        for n, (train, held_out) in enumerate(splits, 1):
            t0 = time.perf_counter()
            model = finetune(model_dir, tokenizer, train, cfg, seed, device, trust_remote_code)
            predictions += predict(model, tokenizer, held_out, cfg, device)
            labels += held_out.labels
            del model
            log.info(
                "downstream %s, seed %d, split %d/%d: %d trained, %d scored (%.0f s)",
                task_name(cfg),
                seed,
                n,
                len(splits),
                len(train),
                len(held_out),
                time.perf_counter() - t0,
            )
        accuracies.append(sum(y == p for y, p in zip(labels, predictions)) / len(labels))
        f1s.append(macro_f1(labels, predictions))
        log.info("downstream %s, seed %d: accuracy %.4f", task_name(cfg), seed, accuracies[-1])
    return {
        "task": task_name(cfg),
        "kind": str(cfg.kind),
        "accuracy": statistics.median(accuracies),
        "accuracies": accuracies,
        "macro_f1": statistics.median(f1s),
        "seeds": list(cfg.seeds),
        "examples": len(labels),  # scored, per seed
        "classes": splits[0][0].classes,
        "protocol": protocol,
        "model": str(model_dir),
        "seconds": round(time.perf_counter() - start, 1),
    }


# ---------------------------------------------------------------- a finished run asked for a downstream task


def add_to_finished_run(
    run_dir: Path, cfg: DownstreamConfig, settings: Optional[dict], results: dict, trust_remote_code: bool = False
) -> dict:
    """A finished run asked again with downstream settings its results.json has no numbers for (none yet, or
    another task): fine-tune its final/ now, and rewrite results.json with them (the "downstream" record and the
    config's downstream.* keys: the ones asked). Main process only, under the run's lock. Returns the results.
    `trust_remote_code`: this command line's model.trust_remote_code (the run's own model may ship code)."""
    from mlm import rundir

    asked = {k: v for k, v in (settings or {}).items() if k.startswith("downstream.")}
    saved = {k: v for k, v in results.get("config", {}).items() if k.startswith("downstream.")}
    if cfg.kind == "none" or ("downstream" in results and asked == saved):
        return results
    final = Path(run_dir) / "final"
    if not final.is_dir():
        raise UserError(
            f"{run_dir} is finished but has no final/ model to fine-tune (trained with trainer.save_model=false); "
            "train it again in a run directory of its own (hydra.run.dir=<new dir>)"
        )
    if "downstream" in results:
        log.warning(
            "%s: replacing its downstream result for %s with one for %s",
            run_dir,
            results["downstream"].get("task"),
            task_name(cfg),
        )
    # a stop signal ends the fine-tune at its next step (one line), results.json as it was
    stop = StopSignals(plan="stopping the downstream fine-tune at its next step; results.json stays as it is").install()
    try:
        scores = evaluate(final, cfg, trust_remote_code=trust_remote_code)
    except Interrupted as e:
        raise Interrupted(
            e.signum,
            f"{e}; {Path(run_dir) / 'results.json'} is unchanged; add the downstream numbers "
            f"with: {rundir.resume_command(run_dir)}",
        ) from None
    finally:
        stop.restore()
    results = {**results, "downstream": scores, "config": {**results.get("config", {}), **asked}}
    rundir.write_results(run_dir, results)
    (Path(run_dir) / "error.txt").unlink(missing_ok=True)  # a failed earlier try of this (a sweep job's record)
    return results


def summary_line(result: Dict[str, Any]) -> str:
    return (
        f"downstream {result['task']}: accuracy {result['accuracy']:.4f}, median of {len(result['seeds'])} seed(s) "
        f"({', '.join(f'{a:.3f}' for a in result['accuracies'])}; {result['protocol']}, {result['seconds']:.0f} s)"
    )
