"""What the data's content hashes cost at start-up: the source files' (mlm/data/identity.py) and the block cache's check.

    .venv/bin/python benchmarks/data_hash.py [--text-mb 600] [--tokens 107e6] [--repeats 3]

Writes a text corpus of --text-mb MB and a block cache entry of --tokens token ids (random ids in
blocks of 128, written as build_blocks writes them), then times, with the files hot in the page cache:
- hashing the corpus the first time (identity.file_sha256 without a remembered hash) and again (a stat);
- the cache entry's check as a start finds it (the hash remembered at build: a stat per file), the check
  when no hash is remembered (e.g. a cache copied elsewhere: both Arrow files hashed), and opening the
  entry (Dataset.from_file: memory maps).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
from datasets.arrow_writer import ArrowWriter

from mlm.data import blocks, identity


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_corpus(path: str, megabytes: int) -> None:
    line = (
        "the galaxy milky way spiral mass gravity orbit earth moon sun heat atom electron field force " * 2 + "\n"
    ).encode()
    chunk = line * ((1 << 20) // len(line) + 1)
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(chunk[: 1 << 20])


def write_entry(path: str, tokens: int) -> None:
    os.makedirs(path)
    rng = np.random.default_rng(0)
    for split, share in (("train", 0.8), ("test", 0.2)):
        writer = ArrowWriter(features=blocks.BLOCK_FEATURES, path=os.path.join(path, f"{split}.arrow"))
        for _ in range(max(1, int(tokens * share) // (128 << 13))):
            writer.write_table(blocks._blocks_table(rng.integers(0, 30000, size=(1 << 13, 128), dtype=np.int32)))
        writer.finalize()
    files = {f"{s}.arrow": blocks._file_record(os.path.join(path, f"{s}.arrow")) for s in blocks.SPLITS}
    with open(os.path.join(path, blocks.META), "w") as f:
        json.dump({"format": blocks.BLOCKS_FORMAT_VERSION, "files": files}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-mb", type=int, default=600)
    parser.add_argument("--tokens", type=float, default=107e6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="data-hash-")
    try:
        corpus, memo, entry = (
            os.path.join(root, "corpus.txt"),
            os.path.join(root, "cache"),
            os.path.join(root, "cache", "blocks", "k"),
        )
        write_corpus(corpus, args.text_mb)
        write_entry(entry, int(args.tokens))
        forget = lambda: shutil.rmtree(os.path.join(memo, identity.HASHES), ignore_errors=True)  # noqa: E731
        identity.file_sha256(corpus, memo)  # page cache warm
        first = timed(lambda: (forget(), identity.file_sha256(corpus, memo)), args.repeats)
        again = timed(lambda: identity.file_sha256(corpus, memo), args.repeats)
        arrow_bytes = sum(os.path.getsize(os.path.join(entry, f"{s}.arrow")) for s in blocks.SPLITS)
        for split in blocks.SPLITS:  # as build_blocks does once the entry is in place
            arrow = os.path.join(entry, f"{split}.arrow")
            identity.remember_sha256(arrow, blocks._file_record(arrow)["sha256"], memo)
        check = timed(lambda: blocks._entry_problem(entry, memo), args.repeats)
        unremembered = timed(lambda: (forget(), blocks._entry_problem(entry, memo)), args.repeats)
        opening = timed(lambda: blocks._open_blocks(entry), args.repeats)
        print(
            json.dumps(
                {
                    "corpus_mb": args.text_mb,
                    "corpus_first_hash_s": round(first, 3),
                    "corpus_gb_per_s": round(args.text_mb / 1024 / first, 2),
                    "corpus_rehash_s": round(again, 5),
                    "arrow_mb": round(arrow_bytes / 2**20),
                    "cache_check_s": round(check, 5),
                    "cache_check_unremembered_s": round(unremembered, 3),
                    "cache_open_s": round(opening, 4),
                },
                indent=1,
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
