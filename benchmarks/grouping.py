#!/usr/bin/env python
"""Grouping token ids into blocks: the HF guide's `group_texts` against this harness's grouping.

    python benchmarks/grouping.py --json out.json [--reps R --block-size 128]

Corpus: the default Wikipedia sample (mlm.data.iter_documents(DatasetConfig()), every document),
tokenized once (input_ids only) with the offline tokenizer: the "1x" corpus. The
"4x" corpus is the tokenized dataset concatenated 4 times (datasets.concatenate_datasets). Both
methods get the same tokenized `Dataset` (one `input_ids` column) and must produce the same blocks
(checked: identical token ids in the same order).

Timing: every method is called once untimed (calibration and warm-up), then --reps samples are
taken, each running the method as many times as needed to last about 0.5 s (like timeit's
autorange; the slow guide methods run once per sample); the median time per call is reported. A
full gc.collect() runs before each sample, and the garbage collector stays on while timing (as in
real use of the guide's code, whose Python lists trigger it).

Methods timed (at 1x and 4x):

  guide_map        what the guide runs: `tokenized.map(group_texts, batched=True, batch_size=1000)`,
                   where group_texts concatenates each column of the batch with `sum(lists, [])` and
                   cuts the result into block_size slices (the remainder is dropped). Includes the
                   Arrow -> Python lists conversion and writing the result back to Arrow.
  guide_one_batch  the same group_texts called directly on the whole corpus as one batch of Python
                   lists (the lists are built before the timer starts). The corpora here have 106
                   and 424 documents, fewer than batch_size=1000, so the guide's map *is* one batch:
                   this isolates the Python function, whose `sum(lists, [])` copies the growing
                   list once per document, i.e. O(documents x tokens) -- quadratic when the corpus
                   grows by adding documents. (With more than 1000 documents the map splits into
                   batches, each quadratic in its own size, and drops a partial block per batch.)
  ours             mlm.data.flat_token_ids (Arrow list_flatten -> one numpy array, no Python
                   lists) + mlm.data.group_blocks (a reshape), i.e. what mlm.data.build_blocks does.
  ours_dataset     ours + turning the blocks into a `datasets.Dataset` (int32 column), as
                   build_blocks does before saving; so the comparison with guide_map, which also
                   ends in a Dataset, is like for like.

The guide's tokenized data also carries attention_mask (and token_type_ids for BERT tokenizers),
which its group_texts concatenates too; here it gets only input_ids,
which makes the guide's timings lower than in the guide itself. The guide's num_proc=4 is not used
(the machines it was measured on have 2 cores, and its map is a single batch anyway).

Scaling caveat: the 1x tokenized column is a single Arrow chunk, so flat_token_ids returns a
zero-copy view of it (microseconds, independent of size), while the 4x concatenation has 4 chunks,
which list_flatten -> to_numpy must copy into one array (linear in tokens). So ours' 4x/1x ratio
compares a view with a copy, not a linear algorithm with itself. As an extra scaling check, ours is
also timed at 2x and 8x (both multi-chunk) and 8x/2x is reported; the guide is timed only at 1x and 4x.

Acceptance: ours grows at most 4.4x for 4x tokens, and ours is at least 10x
faster than the guide's at 4x. Both are reported as measured, pass or fail.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

from common import emit  # benchmarks/common.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_group_texts(block_size: int):
    """The guide's algorithm: concatenate every column with sum(..., []), cut into block_size slices."""

    def group_texts(examples):
        joined = {key: sum(examples[key], []) for key in examples.keys()}
        length = len(joined[next(iter(examples.keys()))])
        if length >= block_size:
            length = (length // block_size) * block_size  # drop the remainder
        return {key: [ids[i : i + block_size] for i in range(0, length, block_size)] for key, ids in joined.items()}

    return group_texts


def timed(fn, reps: int, min_sample_s: float = 0.5):
    """Median seconds per call over `reps` samples, each sample running `fn` enough times to last
    about `min_sample_s` (as timeit's autorange does), so sub-millisecond methods are not timer noise.
    The calibration run doubles as a warm-up. Returns (median per call, per-call time of each sample,
    calls per sample, the last result)."""

    def sample(number: int):
        """(seconds for `number` calls, after a full gc.collect(); the last call's result)."""
        gc.collect()
        t = time.perf_counter()
        for _ in range(number):
            result = fn()
        return time.perf_counter() - t, result

    number = 1
    while True:  # calibrate
        dt, result = sample(number)
        if dt >= min_sample_s or number >= 100_000:
            break
        number *= max(2, min(10, int(min_sample_s / max(dt, 1e-9)) + 1))
    samples = []
    for _ in range(reps):
        result = None  # the previous sample's result is freed before this one runs
        dt, result = sample(number)
        samples.append(dt / number)
    return statistics.median(samples), samples, number, result


def pc_sum_lengths(ds) -> int:
    import pyarrow.compute as pc

    return pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py() or 0


def measure(tokenized_1x, block: int, pad_id: int, reps: int) -> dict:
    """Every method at every multiple of the corpus: seconds (median per call), all samples, calls
    per sample, the sizes, and whether every method made the same blocks as ours."""
    import datasets
    import numpy as np
    from datasets import Dataset, concatenate_datasets

    from mlm.data import flat_token_ids, group_blocks

    # 1x and 4x for every method; 2x and 8x for ours only (a scaling check between two multi-chunk corpora)
    multiples = {"1x": 1, "2x": 2, "4x": 4, "8x": 8}
    guide_sizes = ("1x", "4x")
    group_texts = make_group_texts(block)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    found = {"seconds": {}, "seconds_all_reps": {}, "calls_per_sample": {}, "sizes": {}, "same_blocks": {}}
    for name, k in multiples.items():
        ds = tokenized_1x if k == 1 else concatenate_datasets([tokenized_1x] * k)
        n_tokens = int(pc_sum_lengths(ds))
        found["sizes"][name] = {
            "documents": len(ds),
            "tokens": n_tokens,
            "blocks": n_tokens // block,
            "guide_map_batches": -(-len(ds) // 1000),
            "arrow_chunks": ds.data.column("input_ids").num_chunks,
        }
        print(f"{name}: {len(ds)} documents, {n_tokens} tokens ...", file=sys.stderr, flush=True)

        def guide_map():
            return ds.map(group_texts, batched=True, batch_size=1000)

        def ours():
            return group_blocks(flat_token_ids(ds), block, "drop", pad_id)

        def ours_dataset():
            return Dataset.from_dict({"input_ids": ours()}, features=features)

        methods = [("ours", ours), ("ours_dataset", ours_dataset)]
        if name in guide_sizes:
            as_lists = ds[:]  # the whole corpus as one batch of Python lists (built outside the timer)
            methods = [("guide_map", guide_map), ("guide_one_batch", lambda: group_texts(as_lists))] + methods
        results = {}
        for method, fn in methods:
            med, samples, number, result = timed(fn, reps)
            found["seconds"].setdefault(method, {})[name] = med
            found["seconds_all_reps"].setdefault(method, {})[name] = samples
            found["calls_per_sample"].setdefault(method, {})[name] = number
            results[method] = result
            print(f"  {method:<16} {med:.6f}s per call ({number} call(s) per sample)", file=sys.stderr, flush=True)
        reference = results["ours"]
        others = [np.asarray(results[m]["input_ids"], dtype=np.int64) for m in results if m != "ours"]
        found["same_blocks"][name] = all(o.shape == reference.shape and bool((o == reference).all()) for o in others)
        del results, methods
    return found


def judge(seconds: dict) -> dict:
    """Growth with the corpus, speedups at 4x, and the acceptance criteria, from the medians."""
    growth = {m: s["4x"] / s["1x"] for m, s in seconds.items()}
    speedup = {
        "vs_guide_map": seconds["guide_map"]["4x"] / seconds["ours"]["4x"],
        "vs_guide_one_batch": seconds["guide_one_batch"]["4x"] / seconds["ours"]["4x"],
        "ours_dataset_vs_guide_map": seconds["guide_map"]["4x"] / seconds["ours_dataset"]["4x"],
    }
    acceptance = {
        "ours_growth_at_most_4.4x": growth["ours"] <= 4.4,
        "ours_at_least_10x_faster_than_guide_map_at_4x": speedup["vs_guide_map"] >= 10,
        "ours_dataset_growth_at_most_4.4x": growth["ours_dataset"] <= 4.4,
        "ours_dataset_at_least_10x_faster_than_guide_map_at_4x": speedup["ours_dataset_vs_guide_map"] >= 10,
        "note": "ours = flat_token_ids + group_blocks; at 1x its flatten is a zero-copy view of "
        "a single Arrow chunk (microseconds), at 4x a copy of 4 chunks, so its 4x/1x ratio is view-vs-copy, "
        "not an algorithmic growth; see growth_8x_over_2x. ours_dataset adds the Dataset.from_dict that "
        "build_blocks runs, which dominates its time.",
    }
    return {
        "growth_4x_over_1x": growth,
        "growth_8x_over_2x": {m: seconds[m]["8x"] / seconds[m]["2x"] for m in ("ours", "ours_dataset")},
        "speedup_ours_at_4x": speedup,
        "acceptance": acceptance,
    }


def report(out: dict) -> list:
    """The readable lines of the results."""
    block, reps, sizes, seconds = out["settings"]["block_size"], out["settings"]["reps"], out["sizes"], out["seconds"]
    growth, scaling, speedup, ok = (
        out["growth_4x_over_1x"],
        out["growth_8x_over_2x"],
        out["speedup_ours_at_4x"],
        out["acceptance"],
    )
    lines = [
        f"grouping into {block}-token blocks, median of {reps} (1x: {sizes['1x']['documents']} docs, {sizes['1x']['tokens']} tokens; "
        f"4x: {sizes['4x']['documents']} docs, {sizes['4x']['tokens']} tokens)",
        f"{'method':<16} {'1x s':>9} {'4x s':>9} {'4x/1x':>7}   (seconds per call, median of {reps} samples)",
    ]
    for m, s in seconds.items():
        lines.append(f"{m:<16} {s['1x']:>9.6f} {s['4x']:>9.6f} {growth[m]:>6.2f}x")
    return lines + [
        f"ours vs guide at 4x: {speedup['vs_guide_map']:.0f}x faster than guide_map, {speedup['vs_guide_one_batch']:.0f}x than "
        f"guide_one_batch ({speedup['ours_dataset_vs_guide_map']:.0f}x counting ours' Dataset conversion)",
        f"scaling check, 8x/2x (both multi-chunk): ours {scaling['ours']:.2f}x, ours_dataset {scaling['ours_dataset']:.2f}x "
        f"(1x is a single Arrow chunk, so flat_token_ids is a zero-copy view there; from 2x on it copies the chunks)",
        f"acceptance: ours growth {growth['ours']:.2f}x <= 4.4x: {ok['ours_growth_at_most_4.4x']}; "
        f">= 10x faster than guide_map at 4x: {ok['ours_at_least_10x_faster_than_guide_map_at_4x']} | "
        f"ours_dataset: growth {growth['ours_dataset']:.2f}x <= 4.4x: {ok['ours_dataset_growth_at_most_4.4x']}; "
        f">= 10x faster: {ok['ours_dataset_at_least_10x_faster_than_guide_map_at_4x']}",
        f"identical blocks from every method at every size: {all(out['same_blocks'].values())}",
        f"total {out['total_wall_s']:.0f}s. command: {out['command']}",
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--reps", type=int, default=5, help="timed samples per method and size; the median is reported")
    p.add_argument("--block-size", type=int, default=128)
    a = p.parse_args(argv)
    if a.reps < 1:
        p.error("--reps must be >= 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import datasets
    import numpy as np
    import transformers
    from datasets import Dataset

    from mlm.config import DatasetConfig, ModelConfig
    from mlm.data import iter_documents
    from mlm.models import load_tokenizer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", "benchmarks/grouping.py", *argv])
    t_all = time.perf_counter()
    load_before = os.getloadavg()

    cfg = DatasetConfig()
    tokenizer = load_tokenizer(ModelConfig())
    texts = Dataset.from_dict({"text": list(iter_documents(cfg))})  # the whole corpus, in source order
    tokenized_1x = texts.map(
        lambda batch: {"input_ids": tokenizer(batch["text"], verbose=False)["input_ids"]},
        batched=True,
        remove_columns=["text"],
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    measured = measure(tokenized_1x, a.block_size, pad_id, a.reps)

    out = {
        "seconds": measured["seconds"],
        **judge(measured["seconds"]),
        "same_blocks": measured["same_blocks"],
        "sizes": measured["sizes"],
        "seconds_all_reps": measured["seconds_all_reps"],
        "calls_per_sample": measured["calls_per_sample"],
        "methods": {
            "guide_map": "tokenized.map(group_texts, batched=True, batch_size=1000) -- what the guide runs (one batch here)",
            "guide_one_batch": "group_texts(whole corpus as Python lists), the function alone; lists built before timing",
            "ours": "mlm.data.flat_token_ids + mlm.data.group_blocks -> numpy (blocks, block_size)",
            "ours_dataset": "ours + datasets.Dataset.from_dict (int32), as build_blocks does before saving",
        },
        "command": command,
        "settings": {
            "reps": a.reps,
            "block_size": a.block_size,
            "corpus": "gensim_wiki, every document, input_ids only",
            "tokenizer": type(tokenizer).__name__,
        },
        "machine": {
            "python": platform.python_version(),
            "datasets": datasets.__version__,
            "numpy": np.__version__,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "total_wall_s": time.perf_counter() - t_all,
    }
    emit(report(out), out, a.json)
    return 0 if all(out["same_blocks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
