"""Text corpora -> token blocks. No masking here (see masking.py).

sources.py    a corpus's documents (gensim sample, hub, local files), one at a time (`iter_documents`)
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
)
from mlm.data.sources import iter_documents

__all__ = [
    "BLOCKS_FORMAT_VERSION",
    "build_blocks",
    "flat_token_ids",
    "group_blocks",
    "iter_documents",
    "pack_blocks",
    "split_indices",
]
