#!/usr/bin/env python
"""Cost of each masking strategy per batch, side by side with Hugging Face's token collator.

    python benchmarks/masking.py [--batch 16 --block-size 128 --reps 7 --json out.json]

Input: a (batch, block_size) array of random ids in [1000, 30000) of the offline MiniLM vocabulary
(about 1 in 5 is a `##` piece), the shape the training loop collates. Each method is called once
untimed, then --reps samples are taken, each repeating the call for about 0.3 s; the median time
per batch is reported, and its ratio to `token` (this harness's default). One thread
(torch.set_num_threads(1)), as a dataloader worker would use.

  token, whole_word, span   mlm.masking.MLMCollator with masking.strategy set (mlm_probability 0.15)
  hf_token                  transformers.DataCollatorForLanguageModeling(mlm_probability=0.15) on
                            the same blocks as lists of ids (its usual input)
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import emit  # benchmarks/common.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def per_call(fn, reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < 0.3:
            fn()
            n += 1
        samples.append((time.perf_counter() - start) / n)
    return statistics.median(samples)


def main() -> None:
    from transformers import DataCollatorForLanguageModeling

    from mlm.config import MaskingConfig, ModelConfig
    from mlm.masking import MLMCollator
    from mlm.models import load_tokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(ModelConfig())
    ids = np.random.default_rng(0).integers(1000, 30000, size=(args.batch, args.block_size))
    batch = {"input_ids": ids, "index": np.arange(args.batch)}
    methods = {
        s: (lambda c=MLMCollator(tokenizer, MaskingConfig(strategy=s), seed=0): c(batch))
        for s in ("token", "whole_word", "span")
    }
    hf = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    examples = [{"input_ids": row.tolist()} for row in ids]
    methods["hf_token"] = lambda: hf(examples)
    times = {name: per_call(fn, args.reps) for name, fn in methods.items()}
    lines = [f"masking a {args.batch}x{args.block_size} batch, 1 thread (median of {args.reps}):"]
    lines += [f"  {name:<11} {t * 1e3:7.3f} ms   {t / times['token']:5.2f}x token" for name, t in times.items()]
    emit(lines, {"batch": args.batch, "block_size": args.block_size, "seconds_per_batch": times}, args.json)


if __name__ == "__main__":
    main()
