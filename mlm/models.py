"""Build a masked-LM and its tokenizer from a ModelConfig, and the MLM objective around it.

Builders are chosen by name from `BUILDERS`. `MLMObjective` is the module the training loop
runs (and that DDP wraps): it returns the *sum* of masked-token losses and the number of masked
tokens, so perplexity and gradient normalisation can be computed over any set of batches.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pickle
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel

from mlm.config import ModelConfig, UserError
from mlm.hub import hub_reachable, offline_mode
from mlm.masking import masked_positions_of
from mlm.untrusted import refusal, remote_code_of

log = logging.getLogger(__name__)

# model_type -> the MLM head as a function (model, hidden states of the masked positions) -> vocabulary logits.
# Sparse prediction needs it; other model types fall back to the model's own dense forward.
MLM_HEADS: Dict[str, Callable[[PreTrainedModel, torch.Tensor], torch.Tensor]] = {
    "bert": lambda m, h: m.cls(h),
    "roberta": lambda m, h: m.lm_head(h),
    "xlm-roberta": lambda m, h: m.lm_head(h),
    "camembert": lambda m, h: m.lm_head(h),
    "deberta-v2": lambda m, h: m.cls(h),
    # DistilBertForMaskedLM.forward spelled out: transform, activation, norm, projector
    "distilbert": lambda m, h: m.vocab_projector(m.vocab_layer_norm(m.activation(m.vocab_transform(h)))),
    # ModernBertForMaskedLM runs the same two modules on its own sparse path (config.sparse_prediction)
    "modernbert": lambda m, h: m.decoder(m.head(h)),
}
# Learned position tables that reserve slots for the padding offset (RoBERTa family: 514 = 512 + 2).
POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}
# dataset.document_attention: model types whose forward takes position_ids (absolute, learned) and hands a 4-D
# attention mask to the attention functions as it is (transformers' create_bidirectional_mask). Not ModernBERT
# (it unpads the batch itself and its local layers window the mask) nor DeBERTa (relative positions).
DOCUMENT_ATTENTION_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert")
DOCUMENT_ATTENTION_BACKENDS = ("sdpa", "eager")  # the two mask forms document_mask builds


def resolve_path(name_or_path: str) -> str:
    """`package:<module>/<subdir>` -> the folder inside an installed package; anything else unchanged."""
    if not name_or_path.startswith("package:"):
        return name_or_path
    module, _, subdir = name_or_path[len("package:") :].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model package {module!r} is not installed: pip install {module.replace('_', '-')}")
    return str(Path(list(spec.submodule_search_locations)[0]) / subdir)


def _hub_call(what: str, name: str, fn: Callable, *args, fetch: bool = True, **kwargs):
    """A from_pretrained call: local files first; the hub only when it answers (else one clear UserError).

    With fetch=False (a name read from a file, not typed by the user) never the hub. A model folder
    with code of its own (auto_map) is refused before transformers reads it unless trust_remote_code
    is set, and pickled weights that are more than tensors are refused in our words (torch's advise
    weights_only=False)."""
    code = remote_code_of(name) if os.path.isdir(name) and not kwargs.get("trust_remote_code") else None
    if code:
        raise UserError(
            f"{what} {name!r} ships Python code of its own ({code} has an auto_map) and this command runs "
            "none from a model folder: refused, nothing of it was run"
        )
    try:
        return _refusing_code(what, name, fn, *args, local_files_only=True, **kwargs)
    except OSError as e:  # transformers raises OSError (or subclasses) for missing files and repos
        if os.path.isdir(name):
            raise UserError(f"{what} {name!r}: {str(e).strip().splitlines()[0][:300]}") from e
    if not fetch:
        raise UserError(
            f"{what} {name!r} is not on this machine (no such directory, not in the Hugging Face cache), and a name "
            f"read from a file is never fetched; download it yourself (hf download {name}) and run this again"
        )
    if offline_mode() or not hub_reachable():
        raise UserError(
            f"{what} {name!r} is not a local directory nor in the Hugging Face cache, and the hub is unreachable "
            f"(offline?); download it where there is network and set model.name_or_path=/path/to/dir"
        )
    try:
        return _refusing_code(what, name, fn, *args, **kwargs)
    except OSError as e:
        raise UserError(f"{what} {name!r}: {str(e).strip().splitlines()[0][:300]}") from e


def _refusing_code(what: str, name: str, fn: Callable, *args, **kwargs):
    """`fn`, its refusals of code (a hub repo's auto_map, a pickled payload) as one UserError line."""
    try:
        return fn(*args, **kwargs)
    except pickle.UnpicklingError as e:  # weights-only loading of pytorch_model.bin met more than tensors
        raise UserError(f"{what} {name!r}: its weights file {refusal(e)}: refused, nothing of it was run") from None
    except ValueError as e:
        if not refuses_remote_code(e):
            raise
        raise UserError(
            f"{what} {name!r} ships Python code of its own and this command runs none: refused, nothing of it was run"
        ) from None


def refuses_remote_code(e: ValueError) -> bool:
    """transformers' refusal of a repo's own code (dynamic_module_utils: "... contains custom code which must be executed
    ... pass the argument `trust_remote_code=True`"), not any error that mentions the flag (a hub kernel's does)."""
    return "custom code" in str(e) and "trust_remote_code=True" in str(e)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


def has_tokenizer(folder: str) -> bool:
    return any((Path(folder) / f).exists() for f in TOKENIZER_FILES)


def check_saved_model(name: str, give: str) -> None:
    """A directory given as a saved model (predict, downstream) has a config.json and tokenizer files, else one line
    ending in `give`, what that command takes; a name that is no directory is left to the hub lookup, unless it can only
    be a path (absolute, ./ or ~, or more than one '/': a hub id is 'name' or 'org/name')."""
    if not os.path.isdir(name):
        if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
            raise UserError(f"{name} is not a saved model (no such directory); {give}")
        return
    lacks = (
        "config.json"
        if not (Path(name) / "config.json").is_file()
        else None
        if has_tokenizer(name)
        else "tokenizer files"
    )
    if lacks:
        raise UserError(f"{name} is not a saved model (no {lacks}); {give}")


def load_tokenizer(cfg: ModelConfig, fetch: bool = True):
    name = resolve_path(cfg.tokenizer or cfg.name_or_path)
    if os.path.isdir(name) and not has_tokenizer(name):
        raise UserError(f"model directory {name} has no tokenizer files; set model.tokenizer=<dir or hub id>")
    tok = _hub_call(
        "tokenizer", name, AutoTokenizer.from_pretrained, name, trust_remote_code=cfg.trust_remote_code, fetch=fetch
    )
    if tok.mask_token is None:
        raise UserError(f"tokenizer {name!r} has no mask token, so it cannot be used for masked language modeling")
    return tok


def _apply_dropout(config, dropout: float | None) -> None:
    if dropout is None:
        return
    for key, value in list(config.to_dict().items()):
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, dropout)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a load report for the (expected) new MLM head; we log our own line instead."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def build_pretrained(cfg: ModelConfig, tokenizer, fetch: bool = True) -> PreTrainedModel:
    name = resolve_path(cfg.name_or_path)
    config = _hub_call(
        "model", name, AutoConfig.from_pretrained, name, trust_remote_code=cfg.trust_remote_code, fetch=fetch
    )
    _apply_dropout(config, cfg.dropout)
    with _quiet_transformers():
        model, info = _hub_call(
            "model",
            name,
            AutoModelForMaskedLM.from_pretrained,
            name,
            config=config,
            output_loading_info=True,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            dtype=torch.float32,
            fetch=fetch,
        )
    if info.get("missing_keys"):
        log.info("new (randomly initialised) weights: %s", ", ".join(sorted(info["missing_keys"])))
    model.mlm_new_weights = frozenset(info.get("missing_keys") or ())
    return model


def build_scratch(cfg: ModelConfig, tokenizer, fetch: bool = True) -> PreTrainedModel:  # nothing to fetch
    arch = dict(cfg.arch)
    model_type = arch.pop("model_type", None)
    if not model_type:
        raise UserError("model.source=scratch needs model.arch.model_type (e.g. bert or roberta) and its sizes")
    arch.setdefault("vocab_size", len(tokenizer))
    arch.setdefault("pad_token_id", tokenizer.pad_token_id)
    # ModernBERT's config defaults to its own vocabulary's [CLS]/[SEP] ids; follow the tokenizer instead
    if model_type == "modernbert":
        for key, value in (
            ("cls_token_id", tokenizer.cls_token_id),
            ("sep_token_id", tokenizer.sep_token_id),
            ("bos_token_id", tokenizer.bos_token_id or tokenizer.cls_token_id),
            ("eos_token_id", tokenizer.eos_token_id or tokenizer.sep_token_id),
        ):
            arch.setdefault(key, value)
    config = AutoConfig.for_model(model_type, **arch)
    _apply_dropout(config, cfg.dropout)
    model = AutoModelForMaskedLM.from_config(
        config, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code
    )
    model.mlm_new_weights = frozenset(name for name, _ in model.named_parameters(remove_duplicate=False))
    return model


BUILDERS: Dict[str, Callable[..., PreTrainedModel]] = {"pretrained": build_pretrained, "scratch": build_scratch}


def max_block_size(model: PreTrainedModel) -> int:
    config = model.config
    return getattr(config, "max_position_embeddings", 1 << 30) - POSITION_OFFSET.get(config.model_type, 0)


def build_model(
    cfg: ModelConfig, block_size: int, seed: int, fetch: bool = True, tokenizer=None
) -> Tuple[PreTrainedModel, object]:
    """Tokenizer and model; new weights (scratch models, new heads) are drawn from `seed`. fetch=False: local files only.
    `tokenizer`: one made elsewhere (a trained one: mlm.tokenizer_training) instead of cfg's."""
    if cfg.trust_remote_code:
        log.warning(
            "model.trust_remote_code=true: running the Python code shipped with %s (and its tokenizer)",
            cfg.name_or_path,
        )
    tokenizer = load_tokenizer(cfg, fetch) if tokenizer is None else tokenizer
    torch.manual_seed(seed)
    model = BUILDERS[cfg.source](cfg, tokenizer, fetch=fetch)
    if cfg.freeze_embeddings:  # a tied decoder shares this parameter, so it stays fixed too
        model.get_input_embeddings().weight.requires_grad_(False)
    freeze_layers(model, cfg.freeze_layers)
    if cfg.head_transform_init == "identity":
        init_identity_transform(model)
    limit = max_block_size(model)
    if block_size > limit:
        raise UserError(
            f"block_size={block_size} is larger than the model's {limit} positions; use block_size<={limit}"
        )
    if model.config.vocab_size < len(tokenizer):
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}; they do not belong together"
        )
    return model, tokenizer


def check_document_attention(model: PreTrainedModel) -> None:
    """dataset.document_attention needs a model type and an attention backend it is built for; else one line."""
    model_type, backend = model.config.model_type, model.config._attn_implementation
    if model_type not in DOCUMENT_ATTENTION_TYPES:
        raise UserError(
            f"dataset.document_attention=true is not built for model_type={model_type} (it works for "
            f"{', '.join(DOCUMENT_ATTENTION_TYPES)}); set dataset.document_attention=false"
        )
    if backend not in DOCUMENT_ATTENTION_BACKENDS:
        raise UserError(
            f"dataset.document_attention=true needs model.attn_implementation=sdpa or eager, not {backend} "
            "(the varlen FlashAttention path is not built)"
        )


def document_mask(position_ids: torch.Tensor, backend: str) -> torch.Tensor:
    """The block-diagonal attention mask (batch, 1, L, L) of blocks whose documents start where position_ids is 0:
    boolean (True = attend) for SDPA, additive (0 or the float minimum) for eager attention."""
    document = torch.cumsum(position_ids == 0, dim=1)
    same = document[:, None, :, None] == document[:, None, None, :]
    if backend == "sdpa":
        return same
    return torch.zeros(same.shape, device=same.device).masked_fill_(~same, torch.finfo(torch.float32).min)


def encoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The encoder's stack of transformer layers (BERT's encoder.layer, DistilBERT's transformer.layer, ...)."""
    count = model.config.num_hidden_layers
    for module in model.base_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise UserError(
        f"cannot find the {count} encoder layers of model_type={model.config.model_type}, which "
        "model.freeze_layers and optimizer.layer_lr_decay need; leave them unset for this model"
    )


def freeze_layers(model: PreTrainedModel, n: int) -> None:
    """Fix everything below encoder layer `n`: the embeddings (word table, a tied output projection
    with it, positions, norm) and the bottom `n` layers. Autograd then skips their backward entirely."""
    if n <= 0:
        return
    layers = encoder_layers(model)
    if n >= len(layers):
        raise UserError(
            f"model.freeze_layers={n} would freeze all {len(layers)} encoder layers; use at most {len(layers) - 1}"
        )
    model.get_input_embeddings().requires_grad_(False)
    embeddings = getattr(model.base_model, "embeddings", None)
    if embeddings is not None:
        embeddings.requires_grad_(False)
    for layer in layers[:n]:
        layer.requires_grad_(False)


def head_parameters(model: PreTrainedModel) -> Dict[str, nn.Parameter]:
    """The MLM head's own weights: everything outside the encoder (a tied decoder weight is the encoder's embedding table)."""
    encoder = {id(p) for p in model.base_model.parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) not in encoder}


def new_head_parameters(model: PreTrainedModel) -> Dict[str, nn.Parameter]:
    """Head weights the checkpoint did not have (randomly initialised by the builder)."""
    new = getattr(model, "mlm_new_weights", frozenset())
    aliases = {}  # a tied bias has two names (e.g. BERT's cls.predictions.bias and .decoder.bias)
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), set()).add(name)
    return {name: p for name, p in head_parameters(model).items() if aliases[id(p)] & new}


@torch.no_grad()
def init_identity_transform(model: PreTrainedModel) -> None:
    """A new head's square Linear layers (the transform before the vocabulary projection) start as the identity map.

    The projection onto the (tied, pretrained) embedding table then starts from the encoder's own
    output instead of a random mix of it (measured on the offline default: 300 steps, perplexity
    175 -> 140; before training it changes little)."""
    new = {id(p) for p in new_head_parameters(model).values()}
    done = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) in new and module.in_features == module.out_features:
            module.weight.copy_(torch.eye(module.in_features))
            if module.bias is not None:
                module.bias.zero_()
            done.append(name)
    log.info("head transform initialised to the identity: %s", ", ".join(done) or "no new square layer found")


@torch.no_grad()
def init_unigram_bias(model: PreTrainedModel, token_counts: torch.Tensor, special_ids) -> None:
    """A new head's output bias starts as log unigram frequencies (add-one smoothed) of the training tokens.

    Before any training the head then predicts the corpus's token frequencies rather than a uniform
    distribution over the vocabulary. Special tokens are never prediction targets and count 0."""
    vocab = model.config.vocab_size
    biases = [(n, p) for n, p in new_head_parameters(model).items() if p.ndim == 1 and p.numel() == vocab]
    if not biases:  # a pretrained head keeps its own bias
        log.warning(
            "model.head_bias_init=unigram: the model has no new output bias of size %d (its head is pretrained); "
            "left as it is",
            vocab,
        )
        return
    counts = torch.zeros(vocab, dtype=torch.float64)
    counts[: len(token_counts)] = token_counts.double()[:vocab]
    counts[list(special_ids)] = 0
    log_freq = torch.log((counts + 1) / (counts.sum() + vocab))
    for name, p in biases:
        p.copy_(log_freq.to(p.dtype))
    log.info(
        "head output bias initialised to log unigram frequencies of %d training tokens: %s",
        int(counts.sum()),
        ", ".join(n for n, _ in biases),
    )


class MLMObjective(nn.Module):
    """forward(batch) -> (sum of masked-token cross-entropy in fp32, number of masked tokens, correct predictions).

    Correct predictions are counted in eval mode only (None in training, where nothing reads them:
    the argmax over the vocabulary is not free on a CPU).

    With `sparse=True` the head (transform + vocabulary projection) runs only on masked positions:
    ~15% of the tokens, and for small models the projection is a large share of all FLOPs.
    The loss is the same as the dense one up to float rounding.
    """

    def __init__(self, model: PreTrainedModel, sparse: bool):
        super().__init__()
        self.model = model
        self.head_fn = MLM_HEADS.get(model.config.model_type)
        if sparse and self.head_fn is None:
            log.warning(
                "sparse prediction is not wired for model_type=%s; using the dense head", model.config.model_type
            )
        self.sparse = sparse and self.head_fn is not None
        # RoBERTa numbers positions from its padding_idx + 1 (transformers' create_position_ids_from_input_ids)
        config = model.config
        self.position_offset = config.pad_token_id + 1 if config.model_type in POSITION_OFFSET else 0

    def forward(self, input_ids, labels, attention_mask=None, masked_positions=None, position_ids=None):
        # Flat indices of the masked tokens. The collator computes them on the host, where the
        # labels are made; finding them here (boolean indexing) would make the host wait for the
        # device on every micro-batch of a GPU run.
        if masked_positions is None:
            masked_positions = masked_positions_of(labels)
        targets = labels.reshape(-1).index_select(0, masked_positions)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if position_ids is not None:  # dataset.document_attention: attend within each document, positions restart
            inputs["attention_mask"] = document_mask(position_ids, self.model.config._attn_implementation)
            inputs["position_ids"] = position_ids + self.position_offset
        if self.sparse:  # only the masked positions go through the head
            hidden = self.model.base_model(**inputs).last_hidden_state
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, masked_positions)
            logits = self.head_fn(self.model, hidden)
        else:
            logits = self.model(**inputs).logits
            logits = logits.reshape(-1, logits.shape[-1]).index_select(0, masked_positions)
        logits = logits.float()  # the softmax and loss stay in fp32 under autocast
        loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        correct = None if self.model.training else (logits.argmax(-1) == targets).sum()
        return loss_sum, targets.numel(), correct
