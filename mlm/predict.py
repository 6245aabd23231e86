"""Fill-mask inference: `python -m mlm.predict <model dir> "The Milky Way is a <mask> galaxy." --top-k 3`.

Accepts `<mask>` or `[MASK]` whatever the model's own mask token is. Each mask is filled
independently (as Hugging Face's fill-mask pipeline does); a filled-in sentence keeps the other
masks as the model's mask token.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Dict, List

import torch

from mlm.config import ModelConfig, UserError
from mlm.errors import exit_code

log = logging.getLogger(__name__)

MASK_SPELLINGS = re.compile(r"<mask>|\[MASK\]")
MAX_MASKS = 8


def to_model_mask(text: str, mask_token: str) -> str:
    return MASK_SPELLINGS.sub(lambda _: mask_token, text)


def encode(tokenizer, text: str, note: bool = True):
    """Tokenize with the model's mask token; returns (encoding, mask positions) or raises UserError.

    A text longer than the model reads at once is cut to the window of tokens around its masks
    (cutting its end instead would lose a mask near the end).
    """
    enc = tokenizer(to_model_mask(text, tokenizer.mask_token), return_tensors="pt", verbose=False)
    positions = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten().tolist()
    if not positions:
        raise UserError(
            f"no mask in {text[:80]!r}{'...' if len(text) > 80 else ''}: write <mask> (or [MASK]) where the word to predict goes"
        )
    if len(positions) > MAX_MASKS:
        raise UserError(f"{len(positions)} masks in one text; at most {MAX_MASKS} are supported")
    limit = tokenizer.model_max_length
    if limit < 1_000_000 and enc["input_ids"].shape[1] > limit:  # an unset limit is a huge number
        return _window(tokenizer, enc, positions, limit, note)
    return enc, positions


def _window(tokenizer, enc, positions: List[int], limit: int, note: bool):
    """The `limit` tokens centred on the masks: the first and last special tokens kept, the rest cut from both ends."""
    n = enc["input_ids"].shape[1]
    width = limit - 2  # room between the leading and trailing special token
    span = positions[-1] - positions[0] + 1
    if tokenizer.num_special_tokens_to_add() != 2 or span > width:
        raise UserError(
            f"the text is {n} tokens, more than the {limit} the model reads at once, and its masks (tokens "
            f"{positions[0]} to {positions[-1]}) do not fit in one window; predict them from shorter texts"
        )
    start = min(max(1, (positions[0] + positions[-1]) // 2 - width // 2), n - 1 - width)
    for key, value in enc.items():
        enc[key] = torch.cat([value[:, :1], value[:, start : start + width], value[:, -1:]], dim=1)
    if note:
        log.warning(
            "the text is %d tokens, more than the %d the model reads at once: predicting from tokens %d-%d, around the mask",
            n,
            limit,
            start,
            start + width - 1,
        )
    return enc, [p - start + 1 for p in positions]


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
            sequence = decode_keeping_masks(tokenizer, filled.tolist())
            candidates.append({"token": token, "score": score, "sequence": sequence})
        results.append(candidates)
    return results


def decode_keeping_masks(tokenizer, ids: List[int]) -> str:
    """The text of `ids` without [CLS]/[SEP]/padding but with the masks not filled in (skip_special_tokens drops them)."""
    dropped = set(tokenizer.all_special_ids) - {tokenizer.mask_token_id}
    return tokenizer.decode([i for i in ids if i not in dropped])


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
    parser.add_argument("--top-k", type=int, default=5, help="candidates shown per mask (1 to the vocabulary size)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k {args.top_k}: give 1 or more candidates per mask")
    return exit_code(lambda: print_predictions(args.model, args.text, args.top_k), args.debug)


def print_predictions(model_path: str, texts: List[str], top_k: int) -> None:
    """Each text's filled-in masks, after every text is checked (before the model loads)."""
    from mlm.models import build_pretrained, check_saved_model, load_tokenizer, resolve_path

    check_saved_model(
        resolve_path(model_path), "give a model directory (a run's final/, an mlm.export output) or a hub id"
    )
    model_cfg = ModelConfig(name_or_path=model_path)
    tokenizer = load_tokenizer(model_cfg)
    if top_k > len(tokenizer):
        raise UserError(f"--top-k {top_k}: the model knows {len(tokenizer)} tokens; give at most {len(tokenizer)}")
    for text in texts:
        encode(tokenizer, text, note=False)
    model = build_pretrained(model_cfg, tokenizer)
    for text in texts:
        print(format_predictions(text, fill_mask(model, tokenizer, text, top_k)))


if __name__ == "__main__":
    sys.exit(main())
