"""The in-memory data path: the reference mlm.data's flat-memory build is tested against (training never takes it)."""

from __future__ import annotations

from datasets import Dataset, DatasetDict

from mlm.config import DatasetConfig, UserError
from mlm.data import iter_documents


def load_text(cfg: DatasetConfig) -> DatasetDict:
    """The documents of `iter_documents` -> {'train', 'test'} with one `text` column, split with a fixed seed."""
    ds = Dataset.from_dict({"text": list(iter_documents(cfg))})
    if len(ds) < 2:
        raise UserError(f"the dataset has {len(ds)} non-empty example(s); it needs at least 2 to split off a test set")
    return ds.train_test_split(test_size=cfg.test_size, seed=cfg.split_seed, shuffle=True)


def tokenize(texts: Dataset, tokenizer, cfg: DatasetConfig) -> Dataset:
    """A `Dataset` of texts -> its `input_ids`, each document with the tokenizer's special tokens."""

    def encode(batch):
        # verbose=False: documents longer than the model's maximum are fine here, they get cut into blocks
        return {"input_ids": tokenizer(batch["text"], verbose=False)["input_ids"]}

    return texts.map(
        encode,
        batched=True,
        batch_size=cfg.tokenize_batch_size,
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        remove_columns=texts.column_names,
        desc="tokenize",
    )
