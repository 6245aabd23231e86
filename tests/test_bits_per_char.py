"""Bits per character of the masked tokens (mlm/characters.py): the per-token character table, the eval's number
against a hand computation, results.json, and sweep summaries that rank runs of different tokenizers by it."""

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import TINY_RUN, run_in_process
from tests.test_sweeps import eval_job, flat_tiny, summary_rows  # noqa: F401 (flat_tiny: a fixture)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXT = [
    "the café's naïve owner didn't open until 9:30, then sold 12 croissants!",
    "über-fast tokenizers cut text differently;   characters stay the same.",
    "a second line\twith tabs and spaces, 東京 and a dash - here",
]


def wrapped(backend):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        mask_token="[MASK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
    )


def trained_tokenizers():
    """A byte-level BPE (RoBERTa's kind), a Unigram with metaspaces (SentencePiece's), a BPE with an end-of-word
    suffix, a BPE whose metaspaces come from Replace normalizer and decoder (Gemma's) and XLM-R's Unigram, each
    trained on TEXT with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(
        TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=alphabet)
    )
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer, unigram.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    unigram.train_from_iterator(
        TEXT, trainers.UnigramTrainer(vocab_size=90, special_tokens=SPECIALS, unk_token="[UNK]")
    )
    suffixed = Tokenizer(models.BPE(unk_token="[UNK]", end_of_word_suffix="</w>"))
    suffixed.pre_tokenizer, suffixed.decoder = pre_tokenizers.Whitespace(), decoders.BPEDecoder(suffix="</w>")
    suffixed.train_from_iterator(
        TEXT, trainers.BpeTrainer(vocab_size=120, special_tokens=SPECIALS, end_of_word_suffix="</w>")
    )
    return {
        "bpe": wrapped(bpe),
        "unigram": wrapped(unigram),
        "bpe </w>": wrapped(suffixed),
        "bpe replace": wrapped(replace_metaspace_bpe()),
        "unigram xlm-r": wrapped(xlmr_unigram()),
    }


def replace_metaspace_bpe():
    """Gemma's, Mistral's and older Llama's kind: no pre-tokenizer, the spaces made "▁" by a Replace normalizer and
    back by a Replace decoder (in Sequences), byte-fallback pieces (<0xE6>) for the characters left out of the vocab
    (limit_alphabet: those seen once in TEXT)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=150, special_tokens=SPECIALS, limit_alphabet=22))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})  # the byte pieces, as in Llama's vocab
    return Tokenizer.from_str(json.dumps(spec))


def xlmr_unigram():
    """XLM-R's kind: a Metaspace (prepend_scheme "always") inside a pre-tokenizer Sequence, an NFKC normalizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    tok.train_from_iterator(TEXT, trainers.UnigramTrainer(vocab_size=60, special_tokens=SPECIALS, unk_token="[UNK]"))
    return tok


def test_a_documents_characters_are_the_same_whichever_tokenizer_cut_it(tokenizer):
    from mlm.characters import char_table

    tokenizers = {"MiniLM wordpiece": tokenizer, **trained_tokenizers()}
    for name, tok in tokenizers.items():
        table = char_table(tok)
        assert char_table(tok) is table  # built once per tokenizer
        assert table[tok.all_special_ids].tolist() == [0] * len(tok.all_special_ids)
        for doc in TEXT:  # lowercase already: MiniLM lowercases (and strips accents, which keeps the count)
            ids = tok(doc)["input_ids"]
            pieces = tok.convert_ids_to_tokens(ids)
            assert tok.unk_token_id not in ids, (name, pieces)
            assert len(set(pieces)) > 5  # really cut into pieces, some of them word-inner ones
            assert int(table[ids].sum()) == sum(not c.isspace() for c in doc), (name, doc, pieces)
    assert {"<0xC3>", "<0xA9>", "<0xE6>"} <= set(tokenizers["bpe replace"].tokenize(" ".join(TEXT)))  # é, 東: bytes
    # the tokenizers did cut the text differently (a BPE trained without a pre-tokenizer breaks ties in no fixed
    # order: its cut's length varies from run to run, so the cuts are compared, not their lengths)
    cuts = {name: tuple(tok.convert_ids_to_tokens(tok(TEXT[0])["input_ids"])) for name, tok in tokenizers.items()}
    assert len(set(cuts.values())) == len(cuts)


def test_bits_per_char_is_the_masked_loss_over_the_masked_characters_by_hand(tokenizer):
    """eval/bits_per_char = sum of -ln p(target) over masked tokens / (ln 2 * their characters), the characters counted
    here from the token strings by hand (## removed), the loss from the model's logits."""
    from accelerate import Accelerator
    from datasets import Dataset

    from mlm.config import MaskingConfig
    from mlm.evaluate import eval_collator, evaluate
    from mlm.models import MLMObjective, build_model
    from tests.conftest import compose

    model, _ = build_model(compose(["model=tiny"]).model, 64, seed=0)
    rng = np.random.default_rng(0)
    blocks = Dataset.from_dict({"input_ids": rng.integers(1000, 20000, size=(13, 48)).astype(np.int32)})
    acc = Accelerator(cpu=True)
    objective = MLMObjective(model, sparse=True)
    got = evaluate(objective, blocks, tokenizer, MaskingConfig(), 0, acc, batch_size=4)
    assert evaluate(objective, blocks, tokenizer, MaskingConfig(), 0, acc, batch_size=13) == pytest.approx(got)

    batch = eval_collator(tokenizer, MaskingConfig(), 0)(
        {"input_ids": np.asarray(blocks["input_ids"]), "index": np.arange(13)}
    )
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits.double()
    masked = batch["labels"] != -100
    targets = batch["labels"][masked]
    nats = -torch.log_softmax(logits[masked], -1).gather(1, targets[:, None]).sum().item()
    chars = sum(len(t.removeprefix("##")) for t in tokenizer.convert_ids_to_tokens(targets.tolist()))
    assert got["eval/masked_chars"] == chars and got["eval/masked_tokens"] == len(targets)
    assert got["eval/bits_per_char"] == pytest.approx(nats / (math.log(2) * chars), rel=1e-5)
    assert got["eval/perplexity"] == pytest.approx(math.exp(nats / len(targets)), rel=1e-5)


# ---------------------------------------------------------------- sweep summaries


def tokenizer_job(sweep, name, flat, ppl, bpc, lr, tokenizer=None):
    """A finished job (tests/test_sweeps.eval_job) with the bits per character and tokenizer fingerprint it recorded
    (bpc None: a job of a version before bits per character; tokenizer None: no fingerprint, only its settings)."""
    data = {"sources": None, "tokenizer": tokenizer}
    d = eval_job(sweep, name, flat, ppl, lr, data=data)
    results = json.loads((d / "results.json").read_text())
    if bpc is not None:
        results["bits_per_char"] = bpc
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval/perplexity": ppl, "eval/bits_per_char": bpc}))
    (d / "results.json").write_text(json.dumps(results))
    return d


def test_runs_whose_tokenizers_differ_are_ranked_by_bits_per_character(tmp_path, flat_tiny, monkeypatch):
    from mlm import report

    sweep = tmp_path / "sweep"
    t, u = "t" * 64, "u" * 64
    tokenizer_job(sweep, "0", flat_tiny, 30.0, 1.50, "1e-3", t)
    tokenizer_job(sweep, "1", flat_tiny, 20.0, 1.40, "2e-3", t)
    tokenizer_job(sweep, "2", flat_tiny, 9.0, 1.60, "3e-3", u)  # longer tokens: a lower perplexity, not better
    figures = []
    monkeypatch.setattr(report.pyplot(), "close", figures.append)
    text = report.summarize([sweep]).read_text()
    rows = summary_rows(text)
    assert [(r["job"], r["bits/char"]) for r in rows] == [("1", "1.400"), ("0", "1.500"), ("2", "1.600")]
    assert "| eval |" not in text and "Not comparable" not in text  # one group: the same text, masks
    said = [line for line in text.splitlines() if "Tokenizers differ" in line]
    assert said == [
        "Tokenizers differ between the jobs: ranked by bits per character of the masked tokens (column bits/char; "
        "docs/bits-per-char.md); perplexities are per token, so they are not compared across tokenizers."
    ]
    assert "Best: `optimizer.lr=2e-3` with 1.400 bits per character (perplexity 20.00, not compared)." in text
    panels = figures[0].axes  # summary.png plots what it ranks by
    assert panels[0].get_ylabel() == "final eval bits per character"
    assert sorted(panels[0].collections[0].get_offsets()[:, 1].tolist()) == [1.4, 1.5, 1.6]

    # another mask rate is another eval even so; its group names the tokenizers it mixes
    tokenizer_job(sweep, "3", {**flat_tiny, "masking.mlm_probability": 0.3}, 5.0, 1.0, "4e-3", t)
    text = report.summarize([sweep]).read_text()
    assert "Tokenizers differ between the jobs of eval A: ranked by bits per character" in text
    assert f"- eval A (3 job(s): 1, 0, 2): data.tokenizer={report.MIXED} masking.mlm_probability=0.15; " in text
    assert f"- eval B (1 job(s): 3): data.tokenizer={t} masking.mlm_probability=0.3; best" in text


def test_a_run_without_bits_per_char_is_never_ranked_against_another_tokenizer(tmp_path, flat_tiny):
    from mlm.report import summarize

    t, u = "t" * 64, "u" * 64
    tokenizer_job(tmp_path, "0", flat_tiny, 30.0, 1.5, "1e-3", t)
    tokenizer_job(tmp_path, "1", flat_tiny, 9.0, None, "2e-3", u)  # an older version's results
    text = summarize([tmp_path]).read_text()
    assert "Not comparable: the jobs' evals differ in data.tokenizer;" in text and "Tokenizers differ" not in text


def test_summary_png_plots_every_job_by_perplexity_where_one_lacks_bits_per_char(tmp_path, flat_tiny, monkeypatch):
    """An older run (no bits per character) in a perplexity-ranked group beside a group ranked by bits per character:
    one y axis, so every job is plotted by perplexity and the title says why; with bits per character everywhere,
    by that."""
    from mlm import report

    figures = []
    monkeypatch.setattr(report.pyplot(), "close", figures.append)
    tokenizer_job(tmp_path, "0", flat_tiny, 30.0, 1.5, "1e-3", "t" * 64)
    tokenizer_job(tmp_path, "1", flat_tiny, 9.0, 1.4, "2e-3", "u" * 64)
    older = tokenizer_job(tmp_path, "2", {**flat_tiny, "masking.mlm_probability": 0.3}, 20.0, None, "3e-3")
    text = report.summarize([tmp_path]).read_text()
    assert "- eval A (2 job(s): 1, 0): " in text and "- eval B (1 job(s): 2): " in text
    panel, title = figures[0].axes[0], figures[0]._suptitle.get_text()
    assert panel.get_ylabel() == "final eval perplexity"
    assert sorted(panel.collections[0].get_offsets()[:, 1].tolist()) == [9.0, 20.0, 30.0]
    assert "perplexity plotted (not every job has bits per character): eval A mixes tokenizers" in title
    assert figures[0].axes[-3].get_title() == "eval perplexity"  # the curves: every job's perplexity curve
    assert sum(len(line.get_xdata()) for line in figures[0].axes[-3].get_lines()) == 3

    results = json.loads((older / "results.json").read_text())
    (older / "results.json").write_text(json.dumps({**results, "bits_per_char": 1.1}))  # as a new version's
    report.summarize([tmp_path])
    panel, title = figures[-1].axes[0], figures[-1]._suptitle.get_text()
    assert panel.get_ylabel() == "final eval bits per character" and "perplexity plotted" not in title
    assert sorted(panel.collections[0].get_offsets()[:, 1].tolist()) == [1.1, 1.4, 1.5]


def test_with_one_tokenizer_the_ranking_is_by_perplexity_as_before(tmp_path, flat_tiny):
    from mlm.report import summarize

    # (one tokenizer, one seed: both orders agree in a real sweep; here they do not, to see which is used)
    tokenizer_job(tmp_path, "0", flat_tiny, 30.0, 1.2, "1e-3", "t" * 64)
    tokenizer_job(tmp_path, "1", flat_tiny, 20.0, 1.4, "2e-3", "t" * 64)
    text = summarize([tmp_path]).read_text()
    assert [r["job"] for r in summary_rows(text)] == ["1", "0"]
    assert "Best: `optimizer.lr=2e-3` with perplexity 20.00." in text and "Tokenizers differ" not in text


def test_the_recorded_fingerprint_decides_over_the_settings_that_name_the_tokenizer(tmp_path, flat_tiny):
    from mlm.report import summarize

    small, large = {**flat_tiny, "tokenizer.vocab_size": 500}, {**flat_tiny, "tokenizer.vocab_size": 900}
    tokenizer_job(tmp_path / "same", "0", small, 30.0, 1.2, "1e-3", "t" * 64)
    tokenizer_job(tmp_path / "same", "1", large, 20.0, 1.4, "2e-3", "t" * 64)  # settings differ, the tokenizer not
    assert "Tokenizers differ" not in summarize([tmp_path / "same"]).read_text()
    tokenizer_job(tmp_path / "named", "0", small, 30.0, 1.2, "1e-3")  # no fingerprint: the settings tell
    tokenizer_job(tmp_path / "named", "1", large, 20.0, 1.4, "2e-3")
    text = summarize([tmp_path / "named"]).read_text()
    assert "Tokenizers differ between the jobs" in text and "with 1.200 bits per character" in text


@pytest.mark.slow
def test_a_sweep_over_two_tokenizers_reports_bits_per_char_and_ranks_by_it(corpus, tmp_path):
    """Real tiny runs: the offline WordPiece against a byte-level BPE each run trains on its own training split
    (tokenizer=bpe); results.json, metrics and the summary."""
    from mlm.cli import objective

    sweep = tmp_path / "sweep"
    proc = run_in_process(
        ["-m", *TINY_RUN, f"dataset.path={corpus}", "trainer.max_steps=3", "tokenizer=pretrained,bpe"]
        + ["tokenizer.vocab_size=400", f"hydra.sweep.dir={sweep}"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(2)]
    for r in results:
        assert 0 < r["bits_per_char"] < r["bits_per_char_before"] and r["ema_bits_per_char"] is None
        assert objective(r) == r["bits_per_char"]  # what Optuna minimises
    assert results[0]["data"]["tokenizer"] != results[1]["data"]["tokenizer"]  # the fingerprints differ
    metrics = [json.loads(line) for line in (sweep / "0" / "metrics.jsonl").read_text().splitlines()]
    evals = [m["step"] for m in metrics if "eval/perplexity" in m]
    assert evals[0] == 0 and evals[-1] == 3 and evals == [m["step"] for m in metrics if "eval/bits_per_char" in m]
    text = (sweep / "summary.md").read_text()
    assert "Tokenizers differ between the jobs: ranked by bits per character" in text
    ranked = [float(r["bits/char"]) for r in summary_rows(text)]
    assert ranked == sorted(ranked) and len(ranked) == 2
    assert "bits per character: " in proc.stdout
