"""Fill-mask inference: `python -m mlm.predict <model dir> "The Milky Way is a <mask> galaxy." --top-k 3`.

Accepts `<mask>` or `[MASK]` whatever the model's own mask token is. Each mask is filled
independently (as Hugging Face's fill-mask pipeline does).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Dict, List

import torch

from mlm.config import UserError

MASK_SPELLINGS = re.compile(r"<mask>|\[MASK\]")
MAX_MASKS = 8


def to_model_mask(text: str, mask_token: str) -> str:
    return MASK_SPELLINGS.sub(lambda _: mask_token, text)


def encode(tokenizer, text: str):
    """Tokenize with the model's mask token; returns (encoding, mask positions) or raises UserError."""
    enc = tokenizer(to_model_mask(text, tokenizer.mask_token), return_tensors="pt", truncation=True)
    positions = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten().tolist()
    if not positions:
        raise UserError(f"no mask in {text!r}: write <mask> (or [MASK]) where the word to predict goes")
    if len(positions) > MAX_MASKS:
        raise UserError(f"{len(positions)} masks in one text; at most {MAX_MASKS} are supported")
    return enc, positions


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> List[List[Dict]]:
    """For each mask in `text`: the top-k candidates as {token, score, sequence}."""
    enc, positions = encode(tokenizer, text)
    was_training = model.training
    model.eval()
    logits = model(**enc.to(model.device)).logits[0, positions].float()
    model.train(was_training)
    probs = logits.softmax(-1)
    results = []
    for slot, pos in enumerate(positions):
        scores, ids = probs[slot].topk(top_k)
        candidates = []
        for score, tok_id in zip(scores.tolist(), ids.tolist()):
            filled = enc["input_ids"][0].clone()
            filled[pos] = tok_id
            token = tokenizer.decode([tok_id]).strip()
            sequence = tokenizer.decode(filled, skip_special_tokens=True)
            candidates.append({"token": token, "score": score, "sequence": sequence})
        results.append(candidates)
    return results


def format_predictions(text: str, predictions: List[List[Dict]]) -> str:
    lines = [text]
    for slot, candidates in enumerate(predictions):
        if len(predictions) > 1:
            lines.append(f"  mask {slot + 1}:")
        for rank, c in enumerate(candidates, 1):
            lines.append(f"  {rank}. {c['token']:<14} {c['score']:.3f}  {c['sequence']}")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlm-predict", description="Fill <mask> tokens with a trained masked LM.")
    parser.add_argument("model", help="a model directory (e.g. outputs/<run>/final) or hub id")
    parser.add_argument("text", nargs="+", help="text(s) with <mask> or [MASK]")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        from mlm.config import ModelConfig
        from mlm.models import build_pretrained, load_tokenizer

        model_cfg = ModelConfig(name_or_path=args.model)
        tokenizer = load_tokenizer(model_cfg)
        for text in args.text:  # check every text before loading the model
            encode(tokenizer, text)
        model = build_pretrained(model_cfg, tokenizer)
        for text in args.text:
            print(format_predictions(text, fill_mask(model, tokenizer, text, args.top_k)))
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
