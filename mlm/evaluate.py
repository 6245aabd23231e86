"""Eval loss, perplexity, bits per character and masked-token accuracy over a whole eval set, across processes.

Perplexity is exp(total masked-token loss / total masked tokens): every masked token weighs the
same, whichever batch or process it was in (a mean of per-batch means would not). Masks come
from the fixed EVAL_STREAM, so two evals of the same model on the same data give the same number;
they use masking.eval_strategy (token by default) at the fixed mlm_probability, so runs that train
with different strategies or mask-rate schedules are scored on the same task. Bits per character is the same
loss summed over the masked tokens, per character of text they stand for (mlm/characters.py): it compares runs
whose tokenizers differ, where perplexity (per token) cannot.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional

import torch
from tqdm.auto import tqdm

from mlm import faults
from mlm.batching import eval_batch_count, eval_shard, make_loader
from mlm.characters import bits_per_char, char_table, masked_chars
from mlm.masking import EVAL_STREAM, MLMCollator
from mlm.preemption import Abandoned, stop_agreed


def perplexity(loss_sum: float, n_tokens: int) -> float:
    if n_tokens == 0:
        return float("nan")
    mean = loss_sum / n_tokens
    return math.exp(mean) if mean < 700 else float("inf")  # exp overflows a float past ~709


def eval_collator(tokenizer, masking_cfg, seed: int) -> MLMCollator:
    """The masks every eval draws: masking.eval_strategy at mlm_probability, from the fixed EVAL_STREAM."""
    return MLMCollator(
        tokenizer, dataclasses.replace(masking_cfg, strategy=masking_cfg.eval_strategy), seed=seed, stream=EVAL_STREAM
    )


@torch.no_grad()
def evaluate(
    objective, blocks, tokenizer, masking_cfg, seed: int, accelerator, batch_size: int, bar: Optional[str] = None
) -> Dict[str, float]:
    """Score `blocks` (already capped to the eval size) on every process; returns the global metrics.

    `objective` is the prepared module, so it runs under the run's autocast setting. `bar`: a progress bar over the
    batches with this title (None: no bar). A stop signal gives the eval up at the next batch (`Abandoned`), on every
    process at the same batch.
    """
    was_training = objective.training
    objective.eval()
    collator = eval_collator(tokenizer, masking_cfg, seed)
    shard = eval_shard(len(blocks), batch_size, accelerator.process_index, accelerator.num_processes)
    padding = eval_batch_count(len(blocks), batch_size, accelerator.num_processes) - len(shard)
    loader = make_loader(blocks, shard + [[0]] * padding, collator, num_workers=0, pin_memory=False)
    chars = char_table(tokenizer)
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss sum, tokens, correct, characters
    # closed on an abandon too
    with tqdm(loader, desc=bar, disable=bar is None, leave=False, dynamic_ncols=True) as batches:
        for i, batch in enumerate(batches):
            if stop_agreed(accelerator):
                objective.train(was_training)
                raise Abandoned(i, len(loader))
            n_chars = masked_chars(batch["labels"], chars)  # on the host, before the batch moves
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            loss_sum, n, correct = objective(**batch)
            if i < len(shard):  # a padding batch only keeps this rank in step with the others
                counts = torch.tensor([float(n), float(n_chars)], dtype=torch.float64, device=totals.device)
                totals += torch.stack([loss_sum.double(), counts[0], correct.double(), counts[1]])
            faults.reached("eval_batch")
    totals = accelerator.reduce(totals, reduction="sum")  # one all-reduce for the whole eval set
    objective.train(was_training)
    loss_sum, n_tokens, correct, n_chars = totals.tolist()
    return {
        "eval/loss": loss_sum / max(n_tokens, 1),
        "eval/perplexity": perplexity(loss_sum, int(n_tokens)),
        "eval/bits_per_char": bits_per_char(loss_sum, int(n_chars)),
        "eval/masked_accuracy": correct / max(n_tokens, 1),
        "eval/masked_tokens": int(n_tokens),
        "eval/masked_chars": int(n_chars),
    }
