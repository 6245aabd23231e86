"""See what masking does: one sentence masked by each strategy, and plots of the mask-rate schedules.

    python -m mlm.mask_preview --show "some sentence" [--probability 0.3 --seed 2 --examples 3]
    python -m mlm.mask_preview --plot schedules.png --probability 0.3 --final 0.15 [--run <run dir>]

A tool for people, kept out of mlm/masking.py so the library module needs neither argparse nor
matplotlib; everything shown is computed by mlm.masking itself (MLMCollator, scheduled_probability).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mlm.config import MaskingConfig, ModelConfig, UserError
from mlm.masking import MLMCollator, scheduled_probability
from mlm.models import load_tokenizer
from mlm.report import pyplot


def _render(tokenizer, original: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor) -> str:
    """One line: what the model sees, chosen tokens in brackets ([MASK], [~random], [=kept])."""
    words = []
    for orig, seen, label in zip(
        tokenizer.convert_ids_to_tokens(original.tolist()),
        tokenizer.convert_ids_to_tokens(inputs.tolist()),
        labels.tolist(),
    ):
        if label == -100:
            words.append(orig)
        elif seen == tokenizer.mask_token:
            words.append("[MASK]")
        else:
            words.append(f"[={orig}]" if seen == orig else f"[~{seen}]")
    return " ".join(words)


def show(text: str, tokenizer, cfg: MaskingConfig, seed: int, examples: int = 1) -> str:
    """The same sentence masked by each strategy, from a fixed seed (examples = how many draws each)."""
    ids = torch.tensor([tokenizer(text)["input_ids"]] * examples, dtype=torch.int64)
    lines = [
        f"{len(ids[0])} tokens, mlm_probability={cfg.mlm_probability}, seed={seed}; [MASK] = mask token, "
        "[~x] = replaced by random token x, [=x] = chosen but kept"
    ]
    for strategy in ("token", "whole_word", "span"):
        collate = MLMCollator(tokenizer, MaskingConfig(**{**cfg.__dict__, "strategy": strategy}), seed=seed)
        out = collate({"input_ids": ids.numpy(), "index": np.arange(examples)})
        for row in range(examples):
            lines.append(f"{strategy:<10}  {_render(tokenizer, ids[row], out['input_ids'][row], out['labels'][row])}")
    return "\n".join(lines)


def plot_schedules(path: str, start: float, final: float, run_dir: Optional[str] = None) -> None:
    """The mask rate over training for each schedule, from `scheduled_probability` itself; with
    `run_dir`, also the rates a finished run logged (train/mlm_probability in its metrics.jsonl)."""
    plt = pyplot()  # matplotlib, imported here: --show alone never pays for it
    progress = np.linspace(0, 1, 201)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for schedule in ("constant", "linear", "cosine"):
        cfg = MaskingConfig(mlm_probability=start, final_probability=final, schedule=schedule)
        ax.plot(progress, [scheduled_probability(cfg, x) for x in progress], label=f"masking.schedule={schedule}")
    if run_dir:
        steps = json.loads((Path(run_dir) / "results.json").read_text())["steps"]
        logged = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        logged = [(r["step"], r["train/mlm_probability"]) for r in logged if "train/mlm_probability" in r]
        # the rate used for step s was set before it, at fraction (s - 1) / steps
        ax.plot(
            [(s - 1) / steps for s, _ in logged],
            [p for _, p in logged],
            "k.",
            ms=4,
            label=f"logged by a run ({steps} steps)",
        )
    ax.set_xlabel("fraction of training (steps, or time budget)")
    ax.set_ylabel("train/mlm_probability")
    ax.set_title(f"mask rate from mlm_probability={start} to final_probability={final}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mlm.mask_preview",
        description="Show the masking strategies on a sentence, or plot the mask-rate schedules.",
    )
    parser.add_argument("--show", metavar="TEXT", help="a sentence to mask with each strategy")
    parser.add_argument(
        "--tokenizer", default=ModelConfig().name_or_path, help="tokenizer (default: the offline MiniLM one)"
    )
    parser.add_argument(
        "--probability",
        type=float,
        default=MaskingConfig.mlm_probability,
        help="mlm_probability (the schedule's start with --plot)",
    )
    parser.add_argument("--final", type=float, default=0.15, help="--plot: final_probability")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=1, help="--show: draws per strategy (examples 0, 1, ...)")
    parser.add_argument("--plot", metavar="PNG", help="write a plot of the mask-rate schedules")
    parser.add_argument("--run", metavar="DIR", help="--plot: also the rates this finished run logged")
    args = parser.parse_args(argv)
    if not (args.show or args.plot):
        parser.error("give --show TEXT and/or --plot PNG")
    try:
        if args.show:
            cfg = MaskingConfig(mlm_probability=args.probability)
            cfg.validate()
            print(
                show(args.show, load_tokenizer(ModelConfig(name_or_path=args.tokenizer)), cfg, args.seed, args.examples)
            )
        if args.plot:
            plot_schedules(args.plot, args.probability, args.final, args.run)
            print(f"wrote {args.plot}")
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
