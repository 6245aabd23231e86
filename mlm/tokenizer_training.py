"""The run's own tokenizer (tokenizer=wordpiece|bpe|unigram), trained on its training split before tokenizing.

- What it learns from: the training split only, the documents `blocks.split_indices` puts there (the same
  permutation the block build draws), so no eval text shapes the vocabulary; with dataset.streaming the
  first tokenizer.max_documents documents after the held-out ones (a stream has no split to count).
  Documents are read one at a time and handed to `tokenizers`' trainer in batches (train_from_iterator):
  memory holds the trainer's counts of words, never the corpus.
- What it is: `tokenizers`' WordPiece (BERT's normalizer and pre-tokenizer), byte-level BPE (RoBERTa's)
  or Unigram (SentencePiece's normalization and Metaspace), with the model family's special tokens
  (BERT's [CLS] [SEP] [PAD] [UNK] [MASK] or RoBERTa's <s> </s> <pad> <unk> <mask>, ids 0..4) and the
  post-processor that adds them around each document, as a borrowed tokenizer does; wrapped as a
  transformers fast tokenizer, so final/ and every checkpoint save it (save_pretrained) and
  pipeline("fill-mask") and mlm.export load it.
- Cached: `<cache root>/tokenizers/<key>.json` (the backend's tokenizer.json), the key a hash of the
  settings that choose the training documents, the local files' content (identity.py's hashes), the
  tokenizer settings and the `tokenizers` version; a second run on the same data and settings reads it.
  The file is read as untrusted input: a regular file (no link), at most MAX_CACHED_BYTES, JSON, and its
  special tokens where this module puts them; anything else is trained again, with one warning. A resume whose entry
  is lost takes the checkpoint's tokenizer.json (read the same way) and caches it.
  In a multi-process job only the main process reads or trains it; the others get its JSON (mlm.train.shared_tokenizer),
  so every process has the same one (training WordPiece/Unigram again may differ; a cache may be node-local).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mlm import faults
from mlm.config import Config, DatasetConfig, TokenizerConfig
from mlm.data.blocks import split_indices
from mlm.data.identity import source_identity
from mlm.data.sources import batched, iter_documents
from mlm.files import NotRegularFile, atomic_write_text, default_cache_root, read_regular

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when what is trained for the same settings changes, so old cache entries are not reused
# a cached tokenizer.json larger than this is not one this code wrote (250k tokens: ~20 MB)
MAX_CACHED_BYTES = 256 << 20
TRAIN_BATCH = 1000  # documents per batch handed to the trainer
# the model types whose tokenizers use RoBERTa's special tokens (tokenizer.special_tokens=auto)
ROBERTA_FAMILY = ("roberta", "xlm-roberta", "camembert", "longformer")
# each style's special tokens in id order, and the transformers name of each
SPECIALS = {
    "bert": {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    },
    "roberta": {
        **{"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "mask_token": "<mask>"},
        **{"cls_token": "<s>", "sep_token": "</s>"},  # the same tokens under BERT's names, as RoBERTa's tokenizer has
    },
}
# the documents a trained tokenizer learns from depend on these dataset settings (blocks-only ones do not)
DOCUMENT_SETTINGS = ("kind", "path", "config_name", "split", "text_field", "include_news", "max_examples", "streaming")


def special_style(cfg: Config) -> str:
    """bert or roberta: tokenizer.special_tokens, or with auto the family of model.arch.model_type."""
    if cfg.tokenizer.special_tokens != "auto":
        return str(cfg.tokenizer.special_tokens.value)
    return "roberta" if cfg.model.arch.get("model_type") in ROBERTA_FAMILY else "bert"


def run_tokenizer(
    cfg: Config, cache_root: Optional[str] = None, resumed: Optional[Path] = None
) -> Optional[PreTrainedTokenizerFast]:
    """The run's trained tokenizer (read from the cache, else from the checkpoint `resumed` and cached, else trained
    and cached); None for tokenizer=pretrained. A resume whose cache entry is lost takes the one it trained with:
    training again may give another (WordPiece, Unigram), which the resume's content check would refuse."""
    if cfg.tokenizer.kind == "pretrained":
        return None
    cache_root = cache_root or default_cache_root()
    style = special_style(cfg)
    path = Path(cache_root) / "tokenizers" / f"{cache_key(cfg, style, cache_root)}.json"
    backend = read_cached(path, style)
    if backend is not None:
        log.info("reusing the trained tokenizer %s", path)
    elif resumed is not None and (resumed / "tokenizer.json").exists():
        backend = read_cached(resumed / "tokenizer.json", style)  # as untrusted as the cache
        if backend is not None:
            log.info("the tokenizer cache has no usable %s: took the tokenizer of %s and cached it", path, resumed)
            store(backend, path)
    if backend is None:
        backend = train_new(cfg, style, path)
    return wrap(backend, style, model_max_length(cfg))


def tokenizer_from_text(cfg: Config, text: str) -> PreTrainedTokenizerFast:
    """The run's tokenizer from the main process's tokenizer.json (mlm.train.shared_tokenizer: trusted, in memory)."""
    return wrap(Tokenizer.from_str(text), special_style(cfg), model_max_length(cfg))


def cache_key(cfg: Config, style: str, cache_root: str) -> str:
    """A hash of everything that decides the trained tokenizer: its settings, the training documents, the library."""
    data = cfg.dataset
    chosen = [k for k in DOCUMENT_SETTINGS if not (k == "path" and data.kind == "local")]  # a local path: its content
    chosen += ["streaming_eval_docs"] if data.streaming else ["test_size", "split_seed"]
    sources = source_identity(data, cache_root)
    blob = [
        FORMAT_VERSION,
        {k: getattr(data, k) for k in chosen},
        [sha for _, sha in sources] if sources is not None else None,
        {**vars(cfg.tokenizer), "special_tokens": style},
        tokenizers.__version__,
    ]
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_texts(data: DatasetConfig, max_documents: int) -> Iterator[str]:
    """The training split's documents in corpus order, one at a time (the first `max_documents`; 0: all)."""
    limit = max_documents or None
    if data.streaming:  # the first streaming_eval_docs documents are the eval set (mlm.data.streaming)
        first = data.streaming_eval_docs
        yield from itertools.islice(iter_documents(data, streaming=True), first, first + limit)
        return
    num_docs = sum(1 for _ in iter_documents(data))
    in_train = np.zeros(num_docs, dtype=bool)  # one byte a document
    in_train[split_indices(num_docs, data.test_size, data.split_seed)["train"]] = True
    yield from itertools.islice((text for text, keep in zip(iter_documents(data), in_train) if keep), limit)


def train_new(cfg: Config, style: str, path: Path) -> Tokenizer:
    """Train on the training split, streamed in batches, and save to the cache."""
    tcfg = cfg.tokenizer
    log.info(
        "training a %s tokenizer of %d tokens on the training split of %s (once per data and settings; cached in %s)",
        tcfg.kind,
        tcfg.vocab_size,
        cfg.dataset.path or cfg.dataset.kind,
        path,
    )
    faults.reached("tokenizer")
    start = time.perf_counter()
    backend, trainer = untrained(tcfg, style)
    counted = _Counter(training_texts(cfg.dataset, tcfg.max_documents))
    backend.train_from_iterator(batched(counted, TRAIN_BATCH), trainer=trainer)
    add_post_processor(backend, style)
    log.info(
        "trained the tokenizer on %d documents (%d characters) in %.1f s: %d tokens",
        counted.documents,
        counted.characters,
        time.perf_counter() - start,
        backend.get_vocab_size(),
    )
    store(backend, path)
    return backend


def store(backend: Tokenizer, path: Path) -> None:
    """Cache `backend` at `path` (atomically; a failed write only logs)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, backend.to_str(), shared=True)  # several runs may train the same one at once
    except OSError as e:
        log.warning("cannot cache the trained tokenizer in %s (%s); the next run trains it again", path, e.strerror)


class _Counter:
    """An iterator over texts that counts what went through it."""

    def __init__(self, texts: Iterator[str]):
        self.texts, self.documents, self.characters = texts, 0, 0

    def __iter__(self):
        for text in self.texts:
            self.documents += 1
            self.characters += len(text)
            yield text


def untrained(tcfg: TokenizerConfig, style: str):
    """(the empty backend tokenizer of tcfg.kind, its trainer): `tokenizers`' own recipes for BERT's WordPiece,
    RoBERTa's byte-level BPE and SentencePiece's Unigram (tokenizers.implementations), with `style`'s special tokens."""
    specials = special_tokens(tcfg, style)
    unk = SPECIALS[style]["unk_token"]
    common = dict(vocab_size=tcfg.vocab_size, special_tokens=specials, show_progress=False)
    if tcfg.kind == "wordpiece":
        backend = Tokenizer(models.WordPiece(unk_token=unk))
        backend.normalizer = normalizers.BertNormalizer(lowercase=tcfg.lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        return backend, trainers.WordPieceTrainer(min_frequency=tcfg.min_frequency, **common)
    if tcfg.kind == "bpe":  # every byte is in the alphabet: no text is unknown
        backend = Tokenizer(models.BPE())
        if tcfg.lowercase:
            backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        return backend, trainers.BpeTrainer(min_frequency=tcfg.min_frequency, initial_alphabet=alphabet, **common)
    backend = Tokenizer(models.Unigram())
    steps = [normalizers.Nmt(), normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    backend.normalizer = normalizers.Sequence(steps + ([normalizers.Lowercase()] if tcfg.lowercase else []))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return backend, trainers.UnigramTrainer(unk_token=unk, **common)


def special_tokens(tcfg: TokenizerConfig, style: str) -> List[AddedToken]:
    """`style`'s special tokens in id order. The mask token of bpe and unigram takes the space before it, as RoBERTa's
    does: "is <mask>." then predicts the word with its leading space, the way such vocabularies hold words."""
    mask = SPECIALS[style]["mask_token"]
    return [
        AddedToken(t, special=True, lstrip=t == mask and tcfg.kind != "wordpiece", normalized=False)
        for t in dict.fromkeys(SPECIALS[style].values())
    ]


def add_post_processor(backend: Tokenizer, style: str) -> None:
    """Each document (and pair) framed as `style`'s pretrained tokenizers frame it."""
    names = SPECIALS[style]
    first, last = (
        (names["cls_token"], names["sep_token"]) if style == "bert" else (names["bos_token"], names["eos_token"])
    )
    pair = f"{first} $A {last} $B:1 {last}:1" if style == "bert" else f"{first} $A {last} {last} $B {last}"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{first} $A {last}",
        pair=pair,
        special_tokens=[(t, backend.token_to_id(t)) for t in (first, last)],
    )


def read_cached(path: Path, style: str) -> Optional[Tokenizer]:
    """The cached tokenizer at `path`, trusting none of it (module docstring); None if there is none or it fails."""
    try:
        text = read_regular(path, MAX_CACHED_BYTES)
    except FileNotFoundError:
        return None
    except OSError as e:  # a link planted there (ELOOP), unreadable
        return _rejected(path, f"cannot be opened ({e.strerror})")
    except NotRegularFile as e:  # a pipe or a directory, too large
        return _rejected(path, str(e))
    try:
        if not isinstance(json.loads(text), dict):  # JSON, checked before the library parses it
            return _rejected(path, "is not a JSON object")
        backend = Tokenizer.from_str(text.decode())
    except Exception as e:  # not JSON, too deep, not a tokenizer (the library raises its own exception type)
        return _rejected(path, f"is not a tokenizer ({type(e).__name__}: {str(e)[:200]})")
    specials = list(dict.fromkeys(SPECIALS[style].values()))
    if [backend.token_to_id(t) for t in specials] != list(range(len(specials))):
        return _rejected(path, f"does not hold {' '.join(specials)} as ids 0..{len(specials) - 1}")
    return backend


def _rejected(path: Path, problem: str) -> None:
    log.warning("cached tokenizer %s %s; training it again", path, problem)
    return None


def model_max_length(cfg: Config) -> int:
    """The longest input the model takes (its position table, less the RoBERTa family's padding offset), else the run's
    block size: what pipeline("fill-mask") truncates to."""
    from mlm.models import POSITION_OFFSET

    arch = cfg.model.arch
    positions = arch.get("max_position_embeddings")
    return int(positions) - POSITION_OFFSET.get(arch.get("model_type"), 0) if positions else cfg.block_size


def wrap(backend: Tokenizer, style: str, max_length: int) -> PreTrainedTokenizerFast:
    """The transformers fast tokenizer around `backend`, its special tokens named (save_pretrained writes them)."""
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_length, **SPECIALS[style])
