"""tokenizer=wordpiece|bpe|unigram: the run's own tokenizer, trained on its training split only, equal to one trained
with `tokenizers` directly, cached by content, refused where it cannot work, saved with final/ and checkpoints."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from datasets import Dataset
from tokenizers import implementations

from mlm import tokenizer_training
from mlm.config import UserError
from mlm.data.blocks import _cache_key
from mlm.data.identity import tokenizer_serialization
from mlm.tokenizer_training import run_tokenizer, training_texts
from tests.conftest import TINY_RUN, compose, run_in_process, sentences

KINDS = ("wordpiece", "bpe", "unigram")
BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MLM_CACHE", str(cache))
    return cache


def settings(corpus, kind, *extra, model="tiny"):
    return compose(
        [f"model={model}", f"tokenizer={kind}", "tokenizer.vocab_size=300", *TINY_RUN[2:], f"dataset.path={corpus}"]
        + list(extra)
    )


def reference_train_texts(corpus, test_size=0.2, seed=42):
    """The training split as `datasets` draws it (what the block build mirrors), in corpus order."""
    docs = [line for line in Path(corpus).read_text().splitlines() if line.strip()]
    rows = Dataset.from_dict({"text": docs, "index": list(range(len(docs)))})
    train = rows.train_test_split(test_size=test_size, seed=seed)["train"]
    return [text for _, text in sorted(zip(train["index"], train["text"]))], docs


def reference(kind, texts, vocab_size=300):
    """The same tokenizer trained by `tokenizers`' own implementations of BERT's, RoBERTa's and SentencePiece's."""
    if kind == "wordpiece":
        tok = implementations.BertWordPieceTokenizer(lowercase=True)
        tok.train_from_iterator(
            texts, vocab_size, min_frequency=2, special_tokens=BERT, limit_alphabet=1 << 20
        )  # no limit, as ours
    elif kind == "bpe":
        tok = implementations.ByteLevelBPETokenizer()
        tok.train_from_iterator(texts, vocab_size, min_frequency=2, special_tokens=ROBERTA, show_progress=False)
    else:
        tok = implementations.SentencePieceUnigramTokenizer()
        tok.train_from_iterator(texts, vocab_size, special_tokens=BERT, unk_token="[UNK]", show_progress=False)
    return tok


def same_training(kind, ours, ref) -> bool:
    """The same tokenizer as far as `tokenizers` trains the same one twice: BPE exactly; Unigram the same pieces with
    scores equal up to float summation order; WordPiece the same size and most of the same pieces (two trainings here
    share 91% to 100%: its trainer breaks ties between equally frequent pairs in hash-map order,
    huggingface/tokenizers#1794)."""
    if kind == "bpe":
        return ours == ref
    if kind == "unigram":
        a, b = dict(map(tuple, ours["vocab"])), dict(map(tuple, ref["vocab"]))
        return a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-2 for k in a)
    return len(ours["vocab"]) == len(ref["vocab"]) and len(ours["vocab"].keys() & ref["vocab"].keys()) > 0.8 * len(
        ours["vocab"]
    )


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_equals_tokenizers_own_and_round_trips(kind, corpus, own_cache, tmp_path):
    from transformers import AutoTokenizer

    model = "scratch_distilroberta" if kind == "bpe" else "tiny"  # a roberta model gets RoBERTa's special tokens
    tok = run_tokenizer(settings(corpus, kind, model=model))
    texts, docs = reference_train_texts(corpus)
    ref = reference(kind, texts)
    assert same_training(kind, json.loads(tok.backend_tokenizer.to_str())["model"], json.loads(ref.to_str())["model"])
    specials = ROBERTA if kind == "bpe" else BERT
    assert tok.convert_ids_to_tokens(list(range(5))) == specials and tok.mask_token == specials[4]
    held_out = [d for d in docs if d not in set(texts)][:20]
    first, last = tok.convert_tokens_to_ids([specials[0], specials[2]] if kind == "bpe" else specials[2:4])
    for text in held_out:  # each document framed as the family's pretrained tokenizers frame it
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok(text)["input_ids"] == [first, *ids, last] and tok.unk_token_id not in ids
        assert kind != "bpe" or ids == ref.encode(text, add_special_tokens=False).ids
    # saved and loaded as a model directory's tokenizer: the same ids, the same special tokens
    tok.save_pretrained(tmp_path / "saved")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert [loaded(t)["input_ids"] for t in held_out] == [tok(t)["input_ids"] for t in held_out]
    assert loaded.all_special_tokens == tok.all_special_tokens and loaded.mask_token_id == 4
    expected = held_out if kind == "bpe" else [t.lower() for t in held_out] if kind == "wordpiece" else None
    if expected:  # byte-level BPE gives the text back exactly; WordPiece lowercased
        decoded = [loaded.decode(tok(t)["input_ids"], skip_special_tokens=True) for t in held_out]
        assert decoded == expected if kind == "bpe" else [d.replace(" .", ".") for d in decoded] == expected


def test_no_eval_text_reaches_training(tmp_path, own_cache):
    """Each document holds a word of its own: the trained vocabulary has the training documents' words whole, and not
    one held-out document's."""
    corpus = tmp_path / "marked.txt"
    corpus.write_text("\n".join(f"{s} marker{i}x marker{i}x marker{i}x" for i, s in enumerate(sentences(100))))
    tok = run_tokenizer(settings(corpus, "wordpiece", "tokenizer.vocab_size=2000", "tokenizer.min_frequency=1"))
    texts, docs = reference_train_texts(corpus)
    assert list(training_texts(settings(corpus, "wordpiece").dataset, 0)) == texts  # what the trainer is given
    train = {docs.index(t) for t in texts}
    assert len(train) == 80
    whole = {i for i in range(100) if tok.tokenize(f"marker{i}x") == [f"marker{i}x"]}
    assert whole == train


def test_streaming_learns_from_the_documents_after_the_held_out_ones(corpus):
    cfg = settings(
        corpus, "bpe", "dataset.streaming=true", "dataset.streaming_eval_docs=50", "tokenizer.max_documents=30"
    )
    docs = [line for line in Path(corpus).read_text().splitlines() if line.strip()]
    assert list(training_texts(cfg.dataset, cfg.tokenizer.max_documents)) == docs[50:80]


def test_a_second_run_reads_the_cache_and_the_block_key_follows_the_content(corpus, own_cache, monkeypatch):
    first = run_tokenizer(settings(corpus, "unigram"))
    [entry] = (own_cache / "tokenizers").iterdir()

    def no_training(*args):
        raise AssertionError("trained again")

    with monkeypatch.context() as patched:
        patched.setattr(tokenizer_training, "train_new", no_training)
        again = run_tokenizer(settings(corpus, "unigram"))
        assert tokenizer_serialization(again) == tokenizer_serialization(first)
        with pytest.raises(AssertionError, match="trained again"):  # another setting: another tokenizer
            run_tokenizer(settings(corpus, "unigram", "tokenizer.vocab_size=200"))
    other = run_tokenizer(settings(corpus, "unigram", "tokenizer.vocab_size=200"))
    cfg = settings(corpus, "unigram")
    assert _cache_key(cfg.dataset, first, 32, str(own_cache)) != _cache_key(cfg.dataset, other, 32, str(own_cache))
    assert entry.exists() and len(list(entry.parent.iterdir())) == 2


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("link", "cannot be opened (Too many levels of symbolic links)"),
        ("not json", "is not a tokenizer (JSONDecodeError: "),
        ("not a tokenizer", "is not a tokenizer (Exception: "),
        ("too large", "is larger than 1000 bytes"),
        ("other specials", "does not hold [PAD] [UNK] [CLS] [SEP] [MASK] as ids 0..4"),
    ],
)
def test_a_cached_tokenizer_is_untrusted_input(damage, reason, corpus, own_cache, monkeypatch, tmp_path, caplog):
    good = run_tokenizer(settings(corpus, "bpe"))  # bpe: trained again, the same tokenizer
    [entry] = (own_cache / "tokenizers").iterdir()
    planted = tmp_path / "planted.json"
    planted.write_text(entry.read_text())
    entry.unlink()
    if damage == "link":
        entry.symlink_to(planted)
    elif damage == "not json":
        entry.write_text("{not json")
    elif damage == "not a tokenizer":
        entry.write_text('{"model": 1}')
    elif damage == "too large":
        entry.write_text(planted.read_text())
        monkeypatch.setattr(tokenizer_training, "MAX_CACHED_BYTES", 1000)
    else:  # a valid tokenizer whose [MASK] is not id 4
        swapped = json.loads(planted.read_text())
        vocab = swapped["model"]["vocab"]
        vocab["[MASK]"], vocab["[SEP]"] = vocab["[SEP]"], vocab["[MASK]"]
        entry.write_text(json.dumps(swapped))
    with caplog.at_level(logging.WARNING, logger="mlm.tokenizer_training"):
        again = run_tokenizer(settings(corpus, "bpe"))
    assert f"cached tokenizer {entry} {reason}" in caplog.text and "training it again" in caplog.text
    assert tokenizer_serialization(again) == tokenizer_serialization(good)
    assert not entry.is_symlink() and json.loads(planted.read_text())  # the link's target was not written through


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=minilm", "tokenizer=bpe"], "tokenizer=bpe trains a new vocabulary, which the pretrained model"),
        (["model=tiny", "tokenizer=bpe", "model.tokenizer=x"], "unset model.tokenizer"),
        (["model=tiny", "tokenizer=unigram", "dataset.streaming=true"], "set it, e.g. tokenizer.max_documents="),
        (["model=tiny", "tokenizer=wordpiece", "tokenizer.vocab_size=5"], "tokenizer.vocab_size=5 is too small"),
        (["model=tiny", "tokenizer=wordpiece", "tokenizer.min_frequency=0"], "tokenizer.min_frequency=0 must be"),
    ],
)
def test_impossible_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(UserError, match=message) as refused:
        compose([*overrides, "trainer.max_steps=4"]).validate()
    assert "\n" not in str(refused.value)


# ---------------------------------------------------------------- a run with a trained tokenizer

RUN = [*TINY_RUN, "tokenizer=bpe", "tokenizer.vocab_size=300", "runtime.mixed_precision=no", "trainer.max_steps=2"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus):
    """A tiny from-scratch run with its own BPE tokenizer, trained once for the module (2 steps, checkpoint at 2)."""
    root = tmp_path_factory.mktemp("trained-tokenizer")
    args = [*RUN, f"dataset.path={corpus}", f"hydra.run.dir={root / 'run'}", "trainer.checkpoint_every=2"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLM_CACHE", str(root / "cache"))
        done = run_in_process(args)
    assert done.returncode == 0, done.stderr
    return root, args, done


@pytest.mark.slow
def test_a_run_trains_its_tokenizer_and_final_fills_a_mask(trained_run, tmp_path):
    from transformers import pipeline

    root, args, done = trained_run
    assert "model: bert from scratch, tokenizer=bpe of 300 tokens" in done.stdout + done.stderr  # the start banner
    final = root / "run" / "final"
    fill = pipeline("fill-mask", model=str(final))
    assert fill.tokenizer.mask_token == "[MASK]" and len(fill.tokenizer) == 300  # model=tiny: BERT's special tokens
    predictions = fill("The galaxy is a [MASK] of stars.", top_k=3)
    assert len(predictions) == 3 and all(p["token_str"] for p in predictions)
    results = json.loads((root / "run" / "results.json").read_text())
    assert (
        results["data"]["tokenizer"]
        == json.loads((root / "run" / "checkpoints" / "ckpt-00000002" / "state.json").read_text())["data"]["tokenizer"]
    )
    # mlm.export rebuilds the model with the tokenizer the checkpoint holds (no tokenizer named anywhere else)
    out = tmp_path / "exported"
    exported = run_in_process([str(root / "run"), str(out)], module="mlm.export")
    assert exported.returncode == 0, exported.stderr
    assert pipeline("fill-mask", model=str(out)).tokenizer.get_vocab() == fill.tokenizer.get_vocab()


def copy_of_trained_run(trained_run, tmp_path, monkeypatch):
    """The shared run and its tokenizer cache, copied for a test to change (the cache becomes MLM_CACHE)."""
    root, args, _ = trained_run
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(root / "run", run_dir, symlinks=True)
    shutil.copytree(root / "cache", cache)
    monkeypatch.setenv("MLM_CACHE", str(cache))
    return run_dir, cache, args


@pytest.mark.slow
def test_a_resume_with_another_tokenizer_is_refused(trained_run, tmp_path, monkeypatch):
    """Its settings are fixed; and the same settings giving another tokenizer (a cache entry replaced, a new `tokenizers`
    release training differently) are refused by content."""
    run_dir, cache, args = copy_of_trained_run(trained_run, tmp_path, monkeypatch)
    more = [*args, f"hydra.run.dir={run_dir}", "trainer.max_steps=4"]
    changed = run_in_process([*more, "tokenizer.vocab_size=280"])
    assert changed.returncode == 2 and "tokenizer.vocab_size=300 there, 280 now" in changed.stderr
    [entry] = (cache / "tokenizers").iterdir()
    other = json.loads(entry.read_text())
    vocab = other["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the same settings, another tokenizer
    entry.write_text(json.dumps(other))
    refused = run_in_process(more)
    assert refused.returncode == 2, refused.stderr
    assert "the training data changed since checkpoint ckpt-00000002: the tokenizer has another vocabulary" in (
        refused.stderr
    )
    assert os.path.exists(run_dir / "checkpoints" / "ckpt-00000002")


@pytest.mark.slow
def test_a_resume_takes_a_lost_tokenizer_from_its_checkpoint(trained_run, tmp_path, monkeypatch):
    """The cache entry deleted before a resume: the tokenizer comes from the checkpoint (not trained again, which for
    WordPiece and Unigram may give another one), goes back in the cache, and the resume's content check passes."""
    run_dir, cache, args = copy_of_trained_run(trained_run, tmp_path, monkeypatch)
    [entry] = (cache / "tokenizers").iterdir()
    before = entry.read_text()
    entry.unlink()

    def no_training(*args):
        raise AssertionError("trained again")

    monkeypatch.setattr(tokenizer_training, "train_new", no_training)
    resumed = run_in_process([*args, f"hydra.run.dir={run_dir}", "trainer.max_steps=4"])
    assert resumed.returncode == 0, resumed.stderr
    output = resumed.stdout + resumed.stderr
    assert f"took the tokenizer of {run_dir / 'checkpoints' / 'ckpt-00000002'} and cached it" in output
    assert "resumed from" in output and json.loads(entry.read_text()) == json.loads(before)
    saved = json.loads((run_dir / "checkpoints" / "ckpt-00000002" / "state.json").read_text())["data"]["tokenizer"]
    assert json.loads((run_dir / "results.json").read_text())["data"]["tokenizer"] == saved


@pytest.mark.slow
def test_several_processes_train_it_once_and_share_it(corpus, tmp_path, own_cache):
    """The main process trains the tokenizer and sends it to the other: rank 1 would be killed if it trained one. The
    cache cannot be written (a file where its tokenizers/ folder goes), so rank 1 cannot read it there either; and
    Unigram, whose training is not deterministic: the two ranks still have the same one."""
    import subprocess

    from tests.conftest import torchrun_command

    own_cache.mkdir()
    (own_cache / "tokenizers").write_text("not a folder")
    args = [a.replace("tokenizer=bpe", "tokenizer=unigram") for a in RUN]
    cmd = torchrun_command(29541, *args, f"dataset.path={corpus}", f"hydra.run.dir={tmp_path / 'run'}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLM_FAULT_KILL_AT": "tokenizer:1", "MLM_FAULT_RANK": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["processes"] == 2
    assert "cannot cache the trained tokenizer" in proc.stdout + proc.stderr and (own_cache / "tokenizers").is_file()
