"""The protocol: fine-tune a saved encoder under a new classification head once per seed on a task's splits, score
it, report the median (the package's docstring gives the recipe and its noise)."""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from mlm import faults
from mlm.config import DownstreamConfig, ModelConfig, OptimizerConfig, SchedulerConfig, UserError
from mlm.downstream.tasks import Examples, task_name, task_splits
from mlm.preemption import Interrupted, signal_name, stop_requested

log = logging.getLogger(__name__)

WARMUP_RATIO = 0.1  # of the fine-tuning steps, as in BERT's and RoBERTa's GLUE recipes
MAX_GRAD_NORM = 1.0


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
    if not Path(model_dir).is_dir():  # a saved model only: no hub id (check_saved_model leaves that to the hub)
        raise UserError(f"{model_dir} is not a saved model (no such directory); {give}")
    check_saved_model(model_dir, give)
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
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


def summary_line(result: Dict[str, Any]) -> str:
    return (
        f"downstream {result['task']}: accuracy {result['accuracy']:.4f}, median of {len(result['seeds'])} seed(s) "
        f"({', '.join(f'{a:.3f}' for a in result['accuracies'])}; {result['protocol']}, {result['seconds']:.0f} s)"
    )
