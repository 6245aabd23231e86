"""Text corpora -> token blocks. No masking here (see masking.py).

sources.py    loaders (registry) -> raw examples -> text, in memory (`load_text`) or one document at a time
blocks.py     documents -> cached train/test token blocks on disk, in flat memory (`build_blocks`)
streaming.py  documents -> blocks packed on the fly for training without preprocessing (`dataset.streaming=true`)
"""

from mlm.data.blocks import (
    BLOCKS_FORMAT_VERSION,
    build_blocks,
    flat_token_ids,
    group_blocks,
    pack_blocks,
    split_indices,
    tokenize,
)
from mlm.data.sources import LOADERS, iter_documents, load_text, select_text

__all__ = [
    "BLOCKS_FORMAT_VERSION",
    "LOADERS",
    "build_blocks",
    "flat_token_ids",
    "group_blocks",
    "iter_documents",
    "load_text",
    "pack_blocks",
    "select_text",
    "split_indices",
    "tokenize",
]
