"""What content hashes cost a checkpoint of the default model: save time, and the verify a resume runs.

    .venv/bin/python benchmarks/checkpoint_hash.py [--repeats 3] [overrides ...]

Builds the default run's model and optimizer (one AdamW step, so the optimizer holds its state),
saves a checkpoint the way the loop does, and times: the whole save, hashing its files
(mlm.checkpoint.file_record, as the save does), and verifying it (mlm.checkpoint.verify, as a
resume does). Files are hot in the page cache, as they are right after a save.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mlm import checkpoint
from mlm.overrides import compose
from mlm.models import build_model
from mlm.optim import build_optimizer, build_scheduler
from mlm.parallel import Piece
from mlm.precision import make_accelerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py")
    args = parser.parse_args()
    cfg = compose(args.overrides)
    cfg.runtime.mixed_precision = "no"
    accelerator = make_accelerator(cfg.runtime.mixed_precision)
    model, _ = build_model(cfg.model, cfg.block_size, cfg.seed)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, 10)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    pieces = {"model": Piece(model, "layout"), "optimizer": Piece(optimizer, "layout"), "scheduler": scheduler}
    with tempfile.TemporaryDirectory() as tmp:
        saves, hashes, verifies = [], [], []
        saved = checkpoint.Checkpoints(Path(tmp), pieces, accelerator, model)
        for i in range(args.repeats):
            start = time.perf_counter()
            path = saved.save(i + 1)
            saves.append(time.perf_counter() - start)
            files = [p for p in path.rglob("*") if p.is_file() and p.name != checkpoint.MANIFEST]
            start = time.perf_counter()
            for f in files:
                checkpoint.file_record(f)
            hashes.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert checkpoint.verify(path) is None
            verifies.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in files) / 1e6
    print(f"model {cfg.model.name_or_path}: checkpoint {size:.0f} MB in {len(files)} files; best of {args.repeats}:")
    print(
        f"  save (hashing included) {min(saves):.2f} s | hashing alone {min(hashes):.2f} s "
        f"({size / min(hashes):.0f} MB/s, {min(hashes) / min(saves):.0%} of the save) | verify on resume {min(verifies):.2f} s"
    )
    print("command: .venv/bin/python benchmarks/checkpoint_hash.py " + " ".join(args.overrides))


if __name__ == "__main__":
    main()
