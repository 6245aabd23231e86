"""Whole-word and span masking, mask-rate schedules: statistics, guarantees, and Hugging Face's whole-word masking."""

import random

import numpy as np
import pytest
import torch
from transformers import DataCollatorForLanguageModeling

from mlm.config import MaskingConfig, UserError, span_length_mean
from mlm.masking import EVAL_STREAM, MLMCollator, scheduled_probability, word_start_table
from tests.conftest import WORDS

# words that WordPiece splits into several pieces, so whole-word masking differs from token masking
LONG_WORDS = (
    "photosynthesis thermodynamics misunderstanding electromagnetism unbelievably spectroscopy "
    "nucleosynthesis astrophysicist biochemistry hydrodynamics paleontology cartographer"
).split()


def long_sentences(n: int, seed: int = 0):
    rng = random.Random(seed)
    vocab = WORDS + LONG_WORDS * 3
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(8, 30))).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="module")
def blocks(tokenizer):
    """3000 blocks of 64 token ids, [CLS]/[SEP] inside as in grouped text."""
    ids = tokenizer(long_sentences(4000, seed=3))["input_ids"]
    flat = np.array([t for doc in ids for t in doc], dtype=np.int64)
    n = min(len(flat) // 64, 3000)
    return flat[: n * 64].reshape(n, 64)


def collate(tokenizer, blocks, seed=0, stream=0, index=None, **kw):
    index = np.arange(len(blocks)) if index is None else index
    return MLMCollator(tokenizer, MaskingConfig(**kw), seed=seed, stream=stream)({"input_ids": blocks, "index": index})


def word_ids(tokenizer, row):
    """Word number of each token, by reading the token strings (independent of word_start_table)."""
    out, word = [], -1
    specials = set(tokenizer.all_special_ids)
    prev_special = True
    for tok_id, tok in zip(row.tolist(), tokenizer.convert_ids_to_tokens(row.tolist())):
        if tok_id in specials or prev_special or not tok.startswith("##"):
            word += 1
        out.append(word)
        prev_special = tok_id in specials
    return np.array(out)


def test_word_start_table_reads_wordpiece(tokenizer):
    table = word_start_table(tokenizer)
    assert table.shape == (len(tokenizer),)
    pieces = tokenizer.convert_tokens_to_ids(["photos", "##yn", "the", "##s", "[CLS]"])
    assert table[pieces].tolist() == [True, False, True, False, True]


@pytest.mark.parametrize(
    "kind,marker,size", [("ByteLevelBPETokenizer", "\u0120", 400), ("SentencePieceBPETokenizer", "\u2581", 120)]
)
def test_word_start_table_reads_bpe_and_sentencepiece(kind, marker, size):
    """Vocabularies trained here (RoBERTa-style byte-level BPE, SentencePiece-style): the marker starts words."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    trainer = getattr(tokenizers, kind)()
    trainer.train_from_iterator(long_sentences(500), vocab_size=size, special_tokens=["<s>", "</s>", "<pad>", "<mask>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=trainer._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", mask_token="<mask>"
    )
    table = word_start_table(tok)
    ids = tok(" thermodynamics of the photosynthesis")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert len(pieces) > 4  # the long words are split
    assert [bool(table[i]) for i in ids] == [p.startswith(marker) for p in pieces]
    assert sum(table[i] for i in ids) == 4  # four words, however many pieces


@pytest.mark.parametrize("strategy,tol", [("token", 0.005), ("whole_word", 0.008), ("span", 0.012)])
@pytest.mark.parametrize("rate", [0.15, 0.3])
def test_masked_fraction_and_guarantees(blocks, tokenizer, strategy, tol, rate):
    out = collate(tokenizer, blocks, mlm_probability=rate, strategy=strategy)
    original = torch.as_tensor(blocks)
    chosen = out["labels"] != -100
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    # ~170k candidate tokens; tolerances are > 4 standard errors (words and spans move tokens in groups)
    assert chosen.sum().item() / (~special).sum().item() == pytest.approx(rate, abs=tol)
    assert not (chosen & special).any()
    assert torch.equal(out["labels"][chosen], original[chosen])
    assert torch.equal(out["input_ids"][~chosen], original[~chosen])
    assert (chosen & (out["input_ids"] == tokenizer.mask_token_id)).sum().item() / chosen.sum().item() == pytest.approx(
        0.8, abs=0.03
    )


@pytest.mark.parametrize("strategy", ["whole_word", "span"])
def test_no_word_is_partly_chosen_and_replacement_is_per_word(blocks, tokenizer, strategy):
    out = collate(tokenizer, blocks[:400], mlm_probability=0.3, strategy=strategy)
    split_words = 0
    for row in range(400):
        words = word_ids(tokenizer, blocks[row])
        chosen = (out["labels"][row] != -100).numpy()
        masked = (out["input_ids"][row] == tokenizer.mask_token_id).numpy()
        for w in np.unique(words):
            members = words == w
            split_words += members.sum() > 1 and chosen[members].any()
            assert chosen[members].all() or not chosen[members].any()
            if chosen[members].any():
                assert masked[members].all() or not masked[members].any()  # one 80/10/10 draw per word
    assert split_words > 100  # the corpus really has multi-piece words


def test_whole_word_statistics_match_huggingface(tokenizer):
    """Same sentences through Hugging Face's whole_word_mask (word = pieces with no gap in the text) and ours."""
    texts = long_sentences(3000, seed=5)
    enc = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=48,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    ids = np.array(enc["input_ids"])
    torch.manual_seed(0)
    hf_collator = DataCollatorForLanguageModeling(
        tokenizer, mlm_probability=0.15, whole_word_mask=True
    )  # forces 100% [MASK]
    hf = hf_collator(
        [
            {"input_ids": i, "offset_mapping": o, "special_tokens_mask": s}
            for i, o, s in zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"])
        ]
    )
    ours = collate(tokenizer, ids, mask_replace_prob=1.0, random_replace_prob=0.0, strategy="whole_word")
    original = torch.as_tensor(ids)
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    continuation = torch.tensor(
        [t.startswith("##") for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
    )[original]

    def stats(labels, inputs):
        chosen = labels != -100
        runs = torch.diff(torch.nn.functional.pad(chosen.int(), (1, 0)), dim=1) == 1
        return {
            "rate": chosen.sum().item() / (~special).sum().item(),
            "continuation_share": (chosen & continuation).sum().item() / chosen.sum().item(),
            "masked_share": (chosen & (inputs == tokenizer.mask_token_id)).sum().item() / chosen.sum().item(),
            "special_chosen": (chosen & special).sum().item(),
        }

    ref, mine = stats(hf["labels"], hf["input_ids"]), stats(ours["labels"], ours["input_ids"])
    assert ref["special_chosen"] == mine["special_chosen"] == 0
    assert mine["masked_share"] == ref["masked_share"] == 1.0
    assert mine["rate"] == pytest.approx(ref["rate"], abs=0.012)
    assert mine["continuation_share"] == pytest.approx(ref["continuation_share"], abs=0.02)
    assert mine["continuation_share"] > 0.2  # whole words: pieces are chosen with their word


def test_span_lengths_follow_the_clipped_geometric(tokenizer):
    """Runs of masked words inside a row (not touching its ends) are the sampled spans: spans never touch."""
    p, max_len = 0.2, 10
    ids = tokenizer(long_sentences(10000, seed=9), add_special_tokens=False)["input_ids"]
    flat = np.array([t for doc in ids for t in doc], dtype=np.int64)
    blocks = flat[: (len(flat) // 128) * 128].reshape(-1, 128)[:1500]
    out = collate(tokenizer, blocks, mlm_probability=0.15, strategy="span", span_geometric_p=p, span_max_words=max_len)
    runs, weights = [], np.zeros(max_len + 1)
    pmf = np.array([0] + [p * (1 - p) ** (l - 1) for l in range(1, max_len)] + [(1 - p) ** (max_len - 1)])
    for row in range(len(blocks)):
        words = word_ids(tokenizer, blocks[row])
        n = words[-1] + 1
        chosen_words = np.zeros(n, dtype=bool)
        chosen_words[words[(out["labels"][row] != -100).numpy()]] = True
        edges = np.flatnonzero(np.diff(np.concatenate([[0], chosen_words.astype(int), [0]])))
        for start, end in zip(edges[::2], edges[1::2]):
            if start > 0 and end < n:
                runs.append(end - start)
        # a span of length l lies strictly inside a row of n words at n - l - 1 of its possible starts
        weights += pmf * np.maximum(n - np.arange(max_len + 1) - 1, 0)
    expected = (np.arange(max_len + 1) * weights).sum() / weights.sum()
    assert len(runs) > 3000 and max(runs) <= max_len, len(runs)
    print(f"mean interior span {np.mean(runs):.3f} words, expected {expected:.3f}")
    assert np.mean(runs) == pytest.approx(expected, abs=0.21)  # ~3300 runs, sd 3 words: 4 standard errors
    assert span_length_mean(p, max_len) == pytest.approx((pmf * np.arange(max_len + 1)).sum())  # 4.46


def test_span_rate_is_the_same_at_every_word_position():
    """The first segment starts in the stationary state: a block's first words are not masked less often."""
    from mlm.masking import span_mask

    starts = torch.ones(20000, 48, dtype=torch.bool)  # one token per word
    masked, _ = span_mask(starts, torch.arange(20000), seed=0, stream=0, probability=0.15, p=0.2, max_len=10)
    per_position = masked.float().mean(0)
    # 20000 rows per position: standard error ~0.0025 per position (spans make neighbours correlated, not noisier)
    assert per_position[:3].tolist() == pytest.approx([0.15] * 3, abs=0.012)
    assert per_position.mean().item() == pytest.approx(0.15, abs=0.006)
    assert (per_position - 0.15).abs().max() < 0.015


@pytest.mark.parametrize("strategy", ["whole_word", "span"])
def test_masks_depend_only_on_seed_stream_and_index(blocks, tokenizer, strategy):
    whole = collate(tokenizer, blocks[:8], seed=5, stream=2, strategy=strategy)
    part = collate(
        tokenizer, blocks[[6, 2]], seed=5, stream=2, index=np.array([6, 2]), strategy=strategy
    )  # as on another rank
    assert torch.equal(part["labels"], whole["labels"][[6, 2]]) and torch.equal(
        part["input_ids"], whole["input_ids"][[6, 2]]
    )
    assert torch.equal(collate(tokenizer, blocks[:8], seed=5, stream=2, strategy=strategy)["labels"], whole["labels"])
    assert not torch.equal(
        collate(tokenizer, blocks[:8], seed=5, stream=3, strategy=strategy)["labels"], whole["labels"]
    )
    assert not torch.equal(
        collate(tokenizer, blocks[:8], seed=5, stream=EVAL_STREAM, strategy=strategy)["labels"], whole["labels"]
    )


def test_schedule_values_at_start_middle_and_end():
    linear = MaskingConfig(mlm_probability=0.3, final_probability=0.15, schedule="linear")
    cosine = MaskingConfig(mlm_probability=0.3, final_probability=0.15, schedule="cosine")
    constant = MaskingConfig(mlm_probability=0.3)
    assert [scheduled_probability(linear, x) for x in (0, 0.25, 0.5, 1, 1.5)] == pytest.approx(
        [0.3, 0.2625, 0.225, 0.15, 0.15]
    )
    assert [scheduled_probability(cosine, x) for x in (0, 0.5, 1)] == pytest.approx([0.3, 0.225, 0.15])
    assert scheduled_probability(cosine, 0.25) == pytest.approx(0.3 - 0.15 * (1 - np.cos(np.pi / 4)) / 2)
    assert {scheduled_probability(constant, x) for x in (0, 0.5, 1)} == {0.3}
    # training at its own rate while evals keep mlm_probability
    train_rate = MaskingConfig(mlm_probability=0.15, train_probability=0.3)
    assert {scheduled_probability(train_rate, x) for x in (0, 0.5, 1)} == {0.3}
    ramp = MaskingConfig(mlm_probability=0.15, train_probability=0.4, final_probability=0.2, schedule="linear")
    assert [scheduled_probability(ramp, x) for x in (0, 0.5, 1)] == pytest.approx([0.4, 0.3, 0.2])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(schedule="linear"), "needs masking.final_probability"),
        (dict(strategy="span", mlm_probability=0.9), "most span masking"),
        (dict(final_probability=1.0, schedule="cosine"), "masking.final_probability=1.0"),
        (dict(train_probability=0.0), "masking.train_probability=0.0"),
    ],
)
def test_bad_masking_values_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message) as info:
        MaskingConfig(**overrides).validate()
    assert "\n" not in str(info.value)


def test_show_cli_prints_each_strategy(capsys):
    from mlm.mask_preview import main

    main(["--show", "Photosynthesis and thermodynamics are unbelievably hard.", "--probability", "0.4", "--seed", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["token", "whole_word", "span"]
    assert any("[" in line.split(None, 1)[1].replace("[CLS]", "").replace("[SEP]", "") for line in lines[1:])


def test_plot_cli_draws_the_schedules(tmp_path, capsys):
    from mlm.mask_preview import main

    main(["--plot", str(tmp_path / "schedules.png"), "--probability", "0.3", "--final", "0.15"])
    assert (tmp_path / "schedules.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'schedules.png'}"
