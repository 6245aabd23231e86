#!/usr/bin/env python
"""How far can the new MLM head alone get on the frozen encoder? A probe of each encoder layer.

    python benchmarks/head_probe.py [--train-blocks 600 --eval-blocks 200 --epochs 4 --layers 6,5,4,3
                                     --json out.json] [run.py overrides, e.g. model.head_transform_init=random]

The run's config is composed as `python run.py` would (the offline default unless overridden) and
its model is built the same way (new head initialised as configured, unigram output bias from the
training split). The encoder then runs once, without gradients, over --train-blocks training
blocks (masked at masking.train_probability) and --eval-blocks held-out blocks drawn at random
(masked as the run's evals mask them: eval stream, mlm_probability; a sample, so its perplexity
is not the whole split's); the hidden states of every layer at the masked positions are kept.
For each layer in --layers (default: the top four) the new head's weights restart from their
initial values and train alone on that layer's states (AdamW at optimizer.lr x
new_head_lr_scale without schedule or clipping, weight decay on matrices only, batches of 512
positions, --epochs passes); the held-out perplexity is reported before and after each pass.
Layer 0 is the embedding output, layer N the last layer's; the head's initialisation was made
for layer N, so the first number of a lower layer is only where its training starts.

A measurement of the recipe, not of speed: if a head on the frozen encoder stays far above what
the fine-tuned model reaches, the head is not what limits the run, the encoder's adaptation is.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import emit  # benchmarks/common.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@torch.no_grad()
def masked_states(model, blocks, collator, n: int, seed: int):
    """Hidden states of every layer at the masked positions of n blocks (drawn at random), and their targets."""
    picked = np.random.default_rng(seed).permutation(len(blocks))[:n]
    states, targets = None, []
    for i in range(0, len(picked), 32):
        index = picked[i : i + 32]
        batch = collator({"input_ids": np.asarray(blocks.select(index.tolist())["input_ids"]), "index": index})
        hidden = model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), output_hidden_states=True
        ).hidden_states
        rows = [h.reshape(-1, h.shape[-1]).index_select(0, batch["masked_positions"]) for h in hidden]
        states = [[r] for r in rows] if states is None else [s + [r] for s, r in zip(states, rows)]
        targets.append(batch["labels"].reshape(-1).index_select(0, batch["masked_positions"]))
    return [torch.cat(s) for s in states], torch.cat(targets)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-blocks", type=int, default=600)
    parser.add_argument("--eval-blocks", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], help="comma-separated, e.g. 6,5,4,3")
    parser.add_argument("--json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from mlm.overrides import compose
    from mlm.data import build_blocks
    from mlm.data.blocks import flat_token_ids
    from mlm.evaluate import eval_collator, perplexity
    from mlm.masking import MLMCollator, scheduled_probability
    from mlm.models import MLM_HEADS, build_model, init_unigram_bias, new_head_parameters
    from mlm.optim import param_groups

    cfg = compose(args.overrides)
    start = time.perf_counter()
    model, tokenizer = build_model(cfg.model, cfg.block_size, cfg.seed)
    blocks = build_blocks(cfg.dataset, tokenizer, cfg.block_size)
    if cfg.model.head_bias_init == "unigram":
        init_unigram_bias(
            model, torch.from_numpy(np.bincount(flat_token_ids(blocks["train"]))), tokenizer.all_special_ids
        )
    model.eval()
    head_fn, head = MLM_HEADS[model.config.model_type], new_head_parameters(model)
    if not head:
        raise SystemExit(f"{cfg.model.name_or_path}: the model has no new head weights to probe")
    for p in model.parameters():
        p.requires_grad_(False)
    initial = {name: p.detach().clone() for name, p in head.items()}
    depth = model.config.num_hidden_layers
    layers = args.layers or list(range(depth, max(depth - 4, 0), -1))
    if not all(0 <= layer <= depth for layer in layers):
        raise SystemExit(f"--layers {args.layers}: the model has layers 0 (embeddings) to {depth}")

    train_collator = MLMCollator(tokenizer, cfg.masking, cfg.seed, stream=0)
    train_collator.probability = scheduled_probability(cfg.masking, 0.0)  # the training rate, as the loop sets it
    train_x, train_y = masked_states(model, blocks["train"], train_collator, args.train_blocks, cfg.seed)
    eval_x, eval_y = masked_states(
        model, blocks["test"], eval_collator(tokenizer, cfg.masking, cfg.seed), args.eval_blocks, cfg.seed
    )
    what = (
        cfg.model.name_or_path
        if cfg.model.source == "pretrained"
        else f"{cfg.model.source} {cfg.model.arch.get('model_type')}"
    )
    lines = [
        f"{what}: {len(train_y)} training / {len(eval_y)} held-out masked positions "
        f"({args.train_blocks} / {args.eval_blocks} blocks), states of {len(train_x)} layers in {time.perf_counter() - start:.0f} s"
    ]

    def held_out_perplexity(layer: int) -> float:
        with torch.no_grad():
            total = sum(
                F.cross_entropy(
                    head_fn(model, eval_x[layer][i : i + 2048]), eval_y[i : i + 2048], reduction="sum"
                ).item()
                for i in range(0, len(eval_y), 2048)
            )
        return perplexity(total, len(eval_y))

    lr = cfg.optimizer.lr * cfg.optimizer.new_head_lr_scale
    out = {
        "settings": {
            **vars(args),
            "layers": layers,
            "lr": lr,
            "train_positions": len(train_y),
            "eval_positions": len(eval_y),
        },
        "layers": {},
    }
    for layer in layers:
        with torch.no_grad():
            for name, p in head.items():
                p.copy_(initial[name])
                p.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.optimizer.weight_decay, lr), lr=lr
        )  # only the head is trainable
        order = torch.Generator().manual_seed(cfg.seed)
        curve = [held_out_perplexity(layer)]
        for _ in range(args.epochs):
            for batch in torch.randperm(len(train_y), generator=order).split(512):
                loss = F.cross_entropy(head_fn(model, train_x[layer][batch]), train_y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            curve.append(held_out_perplexity(layer))
        out["layers"][str(layer)] = curve
        lines.append(
            f"layer {layer}: held-out perplexity by pass {' -> '.join(f'{x:,.1f}' for x in curve)}  "
            f"(best {min(curve):,.1f}; {time.perf_counter() - start:.0f} s)"
        )
    emit(lines, out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
