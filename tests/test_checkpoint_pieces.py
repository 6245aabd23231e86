"""A run's state is checkpointed as named pieces (mlm/checkpoint.py): a new piece of state is one registration."""

import json

import pytest
import torch

from mlm import checkpoint
from mlm.parallel import read_tensor_file
from tests.test_precision import FACTS, checkpoints, fresh_accelerate_state, setup, step  # noqa: F401 (a fixture)


class Counter:
    """A new piece of run state, as its owner writes it: state_dict and load_state_dict, nothing else."""

    def __init__(self, count: int, tensor: bool = False):
        self.count, self.tensor = count, tensor

    def state_dict(self):
        return {"count": torch.tensor(self.count) if self.tensor else self.count}

    def load_state_dict(self, saved) -> None:
        self.count = int(saved["count"])


WHERE = {  # scope -> where the checkpoint keeps the counter
    "main": lambda path: torch.load(path / "counter.pt")["count"],
    "rank": lambda path: json.loads((path / "counter-0.json").read_text())["count"],
    "state": lambda path: json.loads((path / "state.json").read_text())["counter"]["count"],
    "layout": lambda path: int(read_tensor_file(path / "counter.safetensors")["count"]),
}


@pytest.mark.parametrize("scope", list(WHERE))
def test_a_new_piece_of_state_is_one_registration(fresh_accelerate_state, tmp_path, scope):
    parts = setup("no")
    step(parts, 0)
    saved = checkpoints(parts, tmp_path)  # the pieces a trainer registers
    saved.pieces["counter"] = checkpoint.Piece(Counter(7, tensor=scope == "layout"), scope)  # the one registration
    path = saved.save(1, FACTS)
    assert checkpoint.verify(path) is None and WHERE[scope](path) == 7  # hashed in the manifest with the rest

    resumed = setup("no", seed=1)
    fresh = checkpoints(resumed, tmp_path)
    counter = Counter(0, tensor=scope == "layout")
    fresh.pieces["counter"] = checkpoint.Piece(counter, scope)
    fresh.load(checkpoint.resolve_resume("auto", tmp_path))
    assert counter.count == 7
    assert all(torch.equal(a, b) for a, b in zip(parts[1].parameters(), resumed[1].parameters()))  # the rest too


def test_a_piece_the_checkpoint_lacks_is_corrupt_unless_it_says_how_to_start_fresh(fresh_accelerate_state, tmp_path):
    parts = setup("no")
    path = checkpoints(parts, tmp_path).save(1, FACTS)  # written without a counter
    later = checkpoints(parts, tmp_path)
    later.pieces["counter"] = Counter(3)
    with pytest.raises(checkpoint.CorruptCheckpoint, match="it holds no counter, which this version always writes"):
        later.load(path)
    started = []
    later.pieces["counter"] = checkpoint.Piece(Counter(3), fresh=started.append)
    later.load(path)
    assert started == [path]
