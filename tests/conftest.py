"""Shared fixtures: the real Hydra config (composed, then shrunk), the offline tokenizer, tiny corpora."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a of and to in is was for on that with as by at from his her it an were are which this be or has had "
    "science star planet light water energy cell river city king war music language theory number system "
    "galaxy milky way spiral mass gravity orbit earth moon sun heat atom electron field force"
).split()


def sentences(n: int, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))).capitalize() + "." for _ in range(n)]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Block caches go to a temporary directory, never the user's."""
    os.environ["MLM_CACHE"] = str(tmp_path_factory.mktemp("mlm-cache"))
    yield


@pytest.fixture(autouse=True)
def _torch_threads():
    """A run trained in process with runtime.num_threads sets torch's thread count for the whole process: put it back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    from mlm.config import ModelConfig
    from mlm.models import load_tokenizer

    return load_tokenizer(ModelConfig())


def compose(overrides: List[str] = ()):
    """The real config from conf/, composed by Hydra with overrides, as the typed Config."""
    from mlm.overrides import compose as compose_config

    return compose_config(overrides)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """One text file of 500 generated sentences that every end-to-end run may read (never written to)."""
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("\n".join(sentences(500)))
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(sentences(400)))
    return path


@pytest.fixture
def eli5_file(tmp_path) -> Path:
    """A jsonl file with the ELI5 (eli5_category) schema: answers is a struct of lists."""
    rng = random.Random(1)
    rows = []
    for i in range(60):
        n = rng.randint(1, 3)
        rows.append(
            {
                "q_id": f"q{i}",
                "title": f"Why does thing {i} happen?",
                "selftext": "",
                "category": "Physics",
                "subreddit": "askscience",
                "answers": {
                    "a_id": [f"a{i}_{j}" for j in range(n)],
                    "text": sentences(n, seed=i * 7 + 3),
                    "score": [rng.randint(1, 50) for _ in range(n)],
                    "text_urls": [[] for _ in range(n)],
                },
                "title_urls": [],
                "selftext_urls": [],
            }
        )
    path = tmp_path / "eli5.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


TINY_RUN = [
    "model=tiny",
    "trainer=debug",
    "experiment=none",
    "dataset=local",
    "block_size=32",
]  # a plain tiny model: no head recipe


def as_typed(args, cwd: Path = ROOT) -> str:
    """The command run_cli runs from `cwd`, as a stop line gives it back (mlm.rundir.resume_command names the Python as
    called from there: a venv inside the checkout is `.venv/bin/python`)."""
    from mlm.rundir import python_name

    with contextlib.chdir(cwd):
        return shlex.join([python_name(), str(ROOT / "run.py"), *args])


def run_cli(
    args: List[str], cwd: Path = ROOT, env=None, timeout: int = 600, module: str | None = None
) -> subprocess.CompletedProcess:
    """Run `python run.py ...` (or `python -m module ...`) as a user would."""
    cmd = [sys.executable, "-m", module] if module else [sys.executable, str(ROOT / "run.py")]
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None unsets a variable
    return subprocess.run(cmd + list(args), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
