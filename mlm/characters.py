"""How many characters of text each token stands for: the denominator of bits per character.

Bits per character of the masked tokens (what every eval reports beside perplexity):

    BPC = sum over masked positions of -ln p(target) / (ln 2 * sum over masked positions of chars(target))

chars(token) counts the non-whitespace characters of the token's surface text, with the tokenizer's own
markers removed: WordPiece's continuing-subword prefix (`##ing` = 3), a BPE end-of-word suffix (`</w>`),
SentencePiece's metaspace (`▁the` = 3; written by a Metaspace pre-tokenizer or a Replace normalizer) and
byte-level BPE's byte alphabet (`Ġthe` = 3; a multi-byte UTF-8 character counts once, at the token holding its
first byte; `<0xE2>` byte-fallback pieces likewise). Special
tokens ([CLS], [SEP], [PAD], [MASK], [UNK], <s>...) count 0: the collator never masks them, so they are in
neither sum. Whitespace counts 0 because where a tokenizer puts it (before a word, after it, nowhere) is a
choice of how text is cut, not text. So summed over all tokens of a document, chars gives the document's
non-whitespace character count after the tokenizer's normalizer, whichever tokenizer cut it
(tests/test_bits_per_char.py holds WordPiece, BPE and Unigram to it): a loss per character compares tokenizers
where a loss per token cannot. Caveats (docs/bits-per-char.md): the count is of normalised text (lowercasing
keeps it; accent stripping keeps it; NFKC can change it, e.g. "ﬁ" -> "fi"), and the text a [UNK] stands for is
in neither sum.
"""

from __future__ import annotations

import functools
import json
import math
import weakref
from typing import Any, Dict, List

import torch

_TABLES: "weakref.WeakKeyDictionary[Any, torch.Tensor]" = weakref.WeakKeyDictionary()


def char_table(tokenizer) -> torch.Tensor:
    """(len(tokenizer),) int64: chars(token id), built once per tokenizer object and kept while it lives."""
    table = _TABLES.get(tokenizer)
    if table is None:
        rules = surface_rules(tokenizer)
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        table = torch.tensor([surface_chars(t or "", rules) for t in tokens], dtype=torch.int64)
        table[sorted(set(tokenizer.all_special_ids))] = 0
        _TABLES[tokenizer] = table
    return table


def surface_rules(tokenizer) -> Dict[str, Any]:
    """The markers a tokenizer writes into its token strings, from its fast backend's own description (a slow
    tokenizer: the markers most of its tokens carry, as masking.word_start_table tells word starts)."""
    if getattr(tokenizer, "is_fast", False):
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        parts = _components(spec.get("pre_tokenizer")) + _components(spec.get("decoder"))
        model = spec.get("model") or {}
        return {
            "prefix": model.get("continuing_subword_prefix") or "",
            "suffix": model.get("end_of_word_suffix") or "",
            "byte_level": any(p.get("type") == "ByteLevel" for p in parts),
            "metaspace": _metaspaces(spec),
        }
    tokens = list(tokenizer.get_vocab())
    counts = {m: sum(t.startswith(m) for t in tokens) for m in ("##", "\u0120", "\u2581")}
    marker = max(counts, key=counts.get)
    return {
        "prefix": "##" if marker == "##" else "",
        "suffix": "",
        "byte_level": marker == "\u0120",
        "metaspace": ["\u2581"] if marker == "\u2581" else [],
    }


def _metaspaces(spec: Dict[str, Any]) -> List[str]:
    """The character(s) a fast tokenizer writes for a space: a Metaspace pre-tokenizer's or decoder's replacement, or
    (Gemma, Mistral, older Llama) that of a Replace normalizer (" " -> "▁") or a Replace decoder ("▁" -> " ")."""
    found = []
    for p in _components(spec.get("normalizer")) + _components(spec.get("pre_tokenizer")):
        if p.get("type") == "Metaspace":
            found.append(p.get("replacement", "\u2581"))
        elif p.get("type") == "Replace" and p.get("pattern") == {"String": " "}:
            found.append(p.get("content") or " ")
    for p in _components(spec.get("decoder")):
        if p.get("type") == "Metaspace":
            found.append(p.get("replacement", "\u2581"))
        elif p.get("type") == "Replace" and p.get("content") == " ":
            found.append((p.get("pattern") or {}).get("String") or " ")
    return [m for m in dict.fromkeys(found) if not m.isspace()]


def _components(spec: Any) -> List[Dict[str, Any]]:
    """A normalizer's, pre-tokenizer's or decoder's parts, a Sequence's flattened."""
    if not isinstance(spec, dict):
        return []
    inner = spec.get("normalizers") or spec.get("pretokenizers") or spec.get("decoders")
    return [p for s in inner for p in _components(s)] if inner else [spec]


def surface_chars(token: str, rules: Dict[str, Any]) -> int:
    """The non-whitespace characters of one token string under `rules` (surface_rules')."""
    if token.startswith("<0x") and token.endswith(">") and len(token) == 6:  # a byte-fallback piece
        return _utf8_chars(bytes([int(token[3:5], 16)]))
    if rules["prefix"] and token.startswith(rules["prefix"]) and token != rules["prefix"]:
        token = token[len(rules["prefix"]) :]
    if rules["suffix"] and token.endswith(rules["suffix"]):
        token = token[: -len(rules["suffix"])]
    for replacement in rules["metaspace"]:
        token = token.replace(replacement, " ")
    if rules["byte_level"]:
        decoder = _byte_decoder()
        if all(c in decoder for c in token):
            return _utf8_chars(bytes(decoder[c] for c in token))
    return sum(not c.isspace() for c in token)


def _utf8_chars(data: bytes) -> int:
    """Characters begun in these bytes, whitespace aside: a whole character decodes as itself; a lead byte of one cut
    off at the end counts 1; a continuation byte (the rest of a character begun in an earlier token) counts 0."""
    text = data.decode("utf-8", errors="surrogateescape")  # an undecodable byte b becomes U+DC00+b
    return sum(not (c.isspace() or 0xDC80 <= ord(c) <= 0xDCBF) for c in text)


@functools.cache
def _byte_decoder() -> Dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def masked_chars(labels: torch.Tensor, table: torch.Tensor) -> int:
    """The characters of the masked targets (labels != -100) of a batch, on the host."""
    targets = labels[labels != -100]
    return int(table[targets].sum())


def bits_per_char(loss_sum: float, chars: int) -> float:
    """Masked-token loss (nats, summed) per character of the masked tokens, in bits; NaN where no character was masked."""
    return loss_sum / (math.log(2) * chars) if chars else float("nan")
