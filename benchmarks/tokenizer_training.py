"""What training the run's tokenizer costs on the offline default corpus, and how finely it cuts held-out text.

    .venv/bin/python benchmarks/tokenizer_training.py --kind bpe [overrides ...]
    .venv/bin/python benchmarks/tokenizer_training.py --kind pretrained     # the borrowed MiniLM tokenizer

Trains `tokenizer=<kind>` as a run does (mlm.tokenizer_training: the training split, streamed), into a fresh
cache, once per process so that the peak resident memory is this kind's: the CPU seconds and wall seconds of
the training, and the process's resident memory before it and its peak before and after it (imports and a first read
of the corpus included: the peak grows only if training needs more than that read). Then characters per token (special tokens left out) over the held-out split's documents, and, with
--twice, how much of the vocabulary a second training shares with the first and how many tokens it cuts the
held-out split into (tokenizers' WordPiece and Unigram trainers are not deterministic: huggingface/tokenizers#1794).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np

from mlm.data.blocks import split_indices
from mlm.data.sources import iter_documents
from mlm.overrides import compose


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def held_out(cfg) -> list:
    docs = list(iter_documents(cfg.dataset))
    return [docs[i] for i in sorted(split_indices(len(docs), cfg.dataset.test_size, cfg.dataset.split_seed)["test"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", required=True, choices=["pretrained", "wordpiece", "bpe", "unigram"])
    parser.add_argument("--twice", action="store_true", help="train a second time and compare the vocabularies")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    model = ["model=scratch_distilroberta"] if args.kind != "pretrained" else []
    cfg = compose([*model, f"tokenizer={args.kind}", *args.overrides])
    result = {"kind": args.kind, "overrides": args.overrides}
    if args.kind == "pretrained":
        from mlm.models import load_tokenizer

        tok = load_tokenizer(cfg.model)
    else:
        from mlm.tokenizer_training import run_tokenizer

        os.environ["MLM_CACHE"] = tempfile.mkdtemp()
        sum(1 for _ in iter_documents(cfg.dataset))  # the corpus read once before: imports and page cache warm
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # reading the corpus's own peak
        before, cpu, wall = rss_mb(), time.process_time(), time.perf_counter()
        tok = run_tokenizer(cfg)
        result.update(
            train_cpu_s=round(time.process_time() - cpu, 2),
            train_wall_s=round(time.perf_counter() - wall, 2),
            rss_before_mb=round(before),
            peak_rss_before_mb=round(peak_before),
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            vocab=len(tok),
        )
        if args.twice:
            os.environ["MLM_CACHE"] = tempfile.mkdtemp()
            second = run_tokenizer(cfg)
            shared = set(second.get_vocab()) & set(tok.get_vocab())
            result["shared_with_a_second_training"] = round(len(shared) / len(tok), 4)
    docs = held_out(cfg)
    tokens = sum(len(tok(d, add_special_tokens=False, verbose=False)["input_ids"]) for d in docs)
    if args.twice and args.kind != "pretrained":  # the same vocabulary may still cut differently (other scores)
        result["tokens_second_training"] = sum(
            len(second(d, add_special_tokens=False, verbose=False)["input_ids"]) for d in docs
        )
    chars = sum(map(len, docs))
    result.update(held_out_docs=len(docs), chars=chars, tokens=tokens, chars_per_token=round(chars / tokens, 3))
    unk = tok.unk_token_id
    if unk is not None:
        ids = np.concatenate([tok(d, add_special_tokens=False, verbose=False)["input_ids"] for d in docs])
        result["unknown_share"] = round(float((ids == unk).mean()), 5)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
