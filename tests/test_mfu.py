"""perf/mfu: the step's FLOP count against torch's FlopCounterMode, its sparse-head and freezing rules,
the GPU peak table, the cached CPU matmul probe, and a run that reports both."""

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mlm import flops
from mlm.flops import FlopCount, count_flops, cpu_peak, gpu_peak, peak_flops, step_flops
from mlm.models import MLMObjective, build_model
from tests.conftest import TINY_RUN, compose

BATCH, SEQ = 4, 32


def tiny(name="tiny", *overrides):
    """A tiny model with eager attention: its score and value matmuls are plain bmm, which FlopCounterMode counts."""
    cfg = compose([f"model={name}", "model.attn_implementation=eager", *overrides])
    return build_model(cfg.model, SEQ, seed=0)[0]


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (BATCH, SEQ), generator=gen)
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(BATCH, SEQ, generator=gen) < 0.15
    labels[chosen] = ids[chosen]
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def counted_by_torch(model, sparse: bool):
    """FLOPs torch's FlopCounterMode sees in one forward and backward of the objective, and the masked count."""
    objective = MLMObjective(model, sparse=sparse)
    with FlopCounterMode(display=False) as counter:
        loss, masked, _ = objective(**batch())
        loss.backward()
    return counter.get_total_flops(), masked


@pytest.mark.parametrize("name", ["tiny", "tiny_modernbert"])
@pytest.mark.parametrize("sparse", [True, False])
def test_count_matches_flop_counter_mode(name, sparse):
    model = tiny(name)
    expected, masked = counted_by_torch(model, sparse)
    assert 0 < masked < BATCH * SEQ
    assert step_flops(model, SEQ, sparse, BATCH * SEQ, masked) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("overrides", [["model.freeze_embeddings=true"], ["model.freeze_layers=1"]])
def test_frozen_weights_match_flop_counter_mode(overrides):
    for name in ("tiny", "tiny_modernbert"):
        model = tiny(name, *overrides)
        expected, masked = counted_by_torch(model, sparse=True)
        ours = step_flops(model, SEQ, True, BATCH * SEQ, masked)
        # BERT with frozen layers below: the lowest trained layer's Q/K/V input gradients, which autograd
        # skips, are counted (module docstring); 0.8% here. Never an undercount.
        assert expected <= ours <= expected * 1.01, name


def test_sparse_head_costs_exactly_its_share_per_masked_position():
    model = tiny()
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    head = 6 * (hidden * hidden + hidden * vocab)  # transform and vocabulary projection, forward + both gradients
    tokens = BATCH * SEQ
    assert step_flops(model, SEQ, True, tokens, 20) - step_flops(model, SEQ, True, tokens, 12) == 8 * head
    dense = count_flops(model, SEQ, sparse=False)
    assert dense.per_prediction == 0 and dense.of(tokens, 20) == dense.of(tokens, 12)  # the dense head runs everywhere
    assert dense.per_token == pytest.approx(count_flops(model, SEQ, sparse=True).per_token + head)


def test_freezing_removes_exactly_the_gradients_autograd_skips():
    free, frozen_table, frozen_layer = (
        tiny(),
        tiny("tiny", "model.freeze_embeddings=true"),
        tiny("tiny", "model.freeze_layers=1"),
    )
    h, vocab, inter = free.config.hidden_size, free.config.vocab_size, free.config.intermediate_size
    base = count_flops(free, SEQ, True)
    # the word table is the tied decoder: only its weight gradient goes (2 x h x vocab per prediction)
    table = count_flops(frozen_table, SEQ, True)
    assert table.per_token == base.per_token and base.per_prediction - table.per_prediction == 2 * h * vocab
    # layer 0 runs forward only: its 4 h^2 + 2 h inter matmul weights lose both gradients, attention its backward
    layer = count_flops(frozen_layer, SEQ, True)
    layer0 = 4 * h * h + 2 * h * inter
    assert base.per_token - layer.per_token == 4 * layer0 + 8 * SEQ * h
    assert base.per_prediction - layer.per_prediction == 2 * h * vocab  # the embeddings froze with it


def test_peak_table():
    assert gpu_peak("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)  # SXM
    assert gpu_peak("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.5e12)
    assert gpu_peak("NVIDIA H200", "tf32") == pytest.approx(494.7e12)
    assert (
        gpu_peak("NVIDIA A100-SXM4-80GB", "fp16") == gpu_peak("NVIDIA A100 80GB PCIe", "bf16") == pytest.approx(312e12)
    )
    assert gpu_peak("NVIDIA A10", "bf16") == pytest.approx(125e12) and gpu_peak("NVIDIA L4", "fp32") == pytest.approx(
        30.3e12
    )
    assert gpu_peak("NVIDIA GeForce RTX 4090", "bf16") == pytest.approx(165.2e12)
    assert gpu_peak("Tesla V100-SXM2-16GB", "fp16") == pytest.approx(125e12)
    assert gpu_peak("Tesla V100-SXM2-16GB", "bf16") is None  # Volta has no bf16 Tensor Cores
    assert gpu_peak("NVIDIA A10G", "bf16") is None  # no datasheet: unknown, not guessed
    assert gpu_peak("NVIDIA Hypothetical X1", "bf16") is None


def test_an_unknown_gpu_reports_no_mfu_with_one_line(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Hypothetical X1")
    with caplog.at_level(logging.INFO, logger="mlm.flops"):
        assert peak_flops(torch.device("cuda"), torch.bfloat16) is None
    assert "no known bf16 peak for GPU 'NVIDIA Hypothetical X1': perf/mfu is not reported" in caplog.text
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda"), torch.float32) == pytest.approx(66.9e12)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # (monkeypatch cannot restore this attribute)
    try:
        assert peak_flops(torch.device("cuda"), torch.float32) == pytest.approx(
            494.7e12
        )  # fp32 matmuls run as tf32 then
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    utilisation = flops.Utilisation(FlopCount(per_token=1e12, per_prediction=0.0), devices=2)  # no peak found
    assert utilisation.rates(tokens=10, predictions=3, seconds=5.0) == {
        "perf/tflops": 1.0
    }  # no perf/mfu without a peak
    assert flops.run_totals(utilisation, 10, 3, 5.0) == {"train_flops": 1e13, "mfu": None}


def counting_probe(monkeypatch, *rates, busy=False):
    """flops.measure_matmul replaced by one that returns `rates` in turn (the last one from then on) and counts its
    calls, on a machine that is `busy` or quiet."""
    calls = []

    def probe(dtype):
        calls.append(dtype)
        return rates[min(len(calls), len(rates)) - 1]

    monkeypatch.setattr(flops, "measure_matmul", probe)
    monkeypatch.setattr(flops, "machine_busy", lambda: busy)
    return calls


def test_cpu_peak_is_probed_once_per_machine_and_read_back_by_the_next_run(tmp_path, monkeypatch):
    calls = counting_probe(monkeypatch, 123e9)
    assert cpu_peak(torch.float32, 2, str(tmp_path)) == 123e9
    cached = json.loads((tmp_path / flops.PEAK_CACHE).read_text())
    (key,) = cached
    assert cached[key] == {"peak": 123e9, "settled": True}
    assert key.startswith(flops.cpu_identity()) and "| 2 threads | fp32 | torch " in key
    assert "| flags " in key  # two CPUs of one name with other features (AVX-512, AMX) are two machines
    monkeypatch.setattr(flops, "measure_matmul", lambda dtype: pytest.fail("the settled peak was probed again"))
    assert cpu_peak(torch.float32, 2, str(tmp_path)) == 123e9  # the next run reads it
    calls = counting_probe(monkeypatch, 1e9)
    assert cpu_peak(torch.bfloat16, 2, str(tmp_path)) == 1e9 and cpu_peak(torch.float32, 4, str(tmp_path)) == 1e9
    monkeypatch.setattr(flops, "cpu_identity", lambda: "Another CPU | flags 0123456789ab")
    assert cpu_peak(torch.float32, 2, str(tmp_path)) == 1e9
    assert len(calls) == 3 and len(json.loads((tmp_path / flops.PEAK_CACHE).read_text())) == 4  # one entry each


def test_a_probe_on_a_busy_machine_never_lowers_the_peak_and_a_quiet_one_settles_it(tmp_path, monkeypatch):
    calls = counting_probe(monkeypatch, 50e9, 30e9, 80e9, busy=True)  # other jobs share the cores
    assert [cpu_peak(torch.float32, 2, str(tmp_path)) for _ in range(3)] == [50e9, 50e9, 80e9]  # the best so far
    (entry,) = json.loads((tmp_path / flops.PEAK_CACHE).read_text()).values()
    assert entry == {"peak": 80e9, "settled": False} and len(calls) == 3
    calls = counting_probe(monkeypatch, 120e9)  # quiet now
    assert cpu_peak(torch.float32, 2, str(tmp_path)) == 120e9
    assert cpu_peak(torch.float32, 2, str(tmp_path)) == 120e9 and len(calls) == 1  # settled: read back


class Planted:
    """A pickle that would leave a file if anything unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, what: str, key: str) -> None:
    if what == "link":
        target = path.parent / "elsewhere.json"
        target.write_text(json.dumps({key: {"peak": 5e9, "settled": True}}))
        path.symlink_to(target)
    elif what == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer for ever
    elif what == "pickle":
        path.write_bytes(pickle.dumps(Planted(path.parent / "ran")))
    else:
        path.write_text(what.replace("KEY", key))


@pytest.mark.parametrize(
    "what",
    [
        "{not json",
        "[1e12]",
        '{"KEY": 1e12}',
        '{"KEY": {"peak": "1e12", "settled": true}}',
        '{"KEY": {"peak": -5, "settled": true}}',
        '{"KEY": {"peak": 1e300, "settled": true}}',
        '{"KEY": {"peak": NaN, "settled": true}}',
        '{"KEY": {"peak": true, "settled": true}}',
        '{"KEY": {"peak": 5e9, "settled": "yes"}}',
        "[" * 100_000 + "]" * 100_000,
        '{"KEY": {"peak": 5e9, "settled": true}, "pad": "' + "x" * flops.PEAK_CACHE_BYTES + '"}',
        "link",
        "fifo",
        "pickle",
    ],
    ids=lambda what: what[:16],
)
def test_a_corrupt_or_planted_cache_is_ignored_and_rewritten(tmp_path, monkeypatch, what):
    calls = counting_probe(monkeypatch, 7e9)
    key = f"{flops.cpu_identity()} | 1 threads | fp32 | torch {torch.__version__}"
    path = tmp_path / flops.PEAK_CACHE
    plant(path, what, key)
    assert cpu_peak(torch.float32, 1, str(tmp_path)) == 7e9 and len(calls) == 1  # probed, as with no cache
    assert path.is_file() and not path.is_symlink()
    assert json.loads(path.read_text()) == {key: {"peak": 7e9, "settled": True}}
    assert not (tmp_path / "ran").exists()  # read as data: nothing in it was run
    if what == "link":
        assert json.loads((tmp_path / "elsewhere.json").read_text())[key]["peak"] == 5e9  # replaced, not followed


def test_a_cache_keeps_its_good_entries_beside_a_bad_one(tmp_path, monkeypatch):
    counting_probe(monkeypatch, 7e9)
    key = f"{flops.cpu_identity()} | 1 threads | fp32 | torch {torch.__version__}"
    other = {"peak": 3e9, "settled": True}
    (tmp_path / flops.PEAK_CACHE).write_text(json.dumps({"other machine": other, key: "fast"}))
    assert cpu_peak(torch.float32, 1, str(tmp_path)) == 7e9
    assert json.loads((tmp_path / flops.PEAK_CACHE).read_text()) == {
        "other machine": other,
        key: {"peak": 7e9, "settled": True},
    }


def test_cpu_probe_survives_an_unwritable_cache(tmp_path, monkeypatch, caplog):
    counting_probe(monkeypatch, 7e9)
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache directory should be
    with caplog.at_level(logging.WARNING, logger="mlm.flops"):
        assert cpu_peak(torch.float32, 1, str(blocked / "sub")) == 7e9
    assert "cannot cache the CPU matmul peak" in caplog.text


def test_measured_matmul_rate_is_plausible_and_leaves_the_random_stream_alone():
    torch.manual_seed(5)
    rate = flops.measure_matmul(torch.float32, reps=2)
    assert 1e8 < rate < 1e14  # FLOP/s of a real torch.matmul on this CPU (0.1 GFLOP/s .. 100 TFLOP/s)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))  # a resumed run's dropout and masks must not depend on whether it probed


@pytest.mark.slow
def test_a_run_logs_mfu_and_counts_its_flops(corpus, tmp_path):
    from mlm.train import train

    run_dir = tmp_path / "run"
    train(compose([*TINY_RUN, f"dataset.path={corpus}", "trainer.max_steps=4", "trainer.save_model=false"]), run_dir)
    train = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    assert len(train) == 4 and all(0 < r["perf/mfu"] < 1.5 and r["perf/tflops"] > 0 for r in train)
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 < results["mfu"] < 1.5
    # the whole run's FLOPs: every token through the encoder, the head at every masked position logged
    count = count_flops(build_model(compose(TINY_RUN).model, 32, seed=0)[0], 32, sparse=True)
    assert results["train_flops"] == pytest.approx(
        count.of(results["train_tokens"], sum(r["train/masked_tokens"] for r in train))
    )


@pytest.mark.slow
def test_a_run_starved_of_data_reports_its_data_wait_and_warns_once(corpus, tmp_path, monkeypatch, caplog):
    """perf/data_wait (the share of a step spent in next(batches)) in every train record and in results.json; a
    collator that sleeps makes the steps wait on data, which the run says in one warning."""
    import time

    import mlm.train
    from mlm.masking import MLMCollator

    class SlowCollator(MLMCollator):
        def __call__(self, batch):
            time.sleep(0.25)  # a tiny model's step takes ~0.05 s: the step waits on its batch (> 0.2 up to a 1 s step)
            return super().__call__(batch)

    monkeypatch.setattr(mlm.train, "MLMCollator", SlowCollator)
    cfg = compose(
        [*TINY_RUN, f"dataset.path={corpus}", "trainer.max_steps=4", "trainer.log_every=1", "trainer.save_model=false"]
    )
    with caplog.at_level(logging.WARNING, logger="mlm.train"):
        results = mlm.train.train(cfg, tmp_path)
    train = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    assert len(train) == 4 and all(0 <= r["perf/data_wait"] <= 1 and r["perf/tokens_per_s"] > 0 for r in train)
    assert mlm.train.DATA_WAIT_WARN < results["data_wait"] <= 1
    first = next(r["step"] for r in train if r["perf/data_wait"] > mlm.train.DATA_WAIT_WARN)
    warned = [r.getMessage() for r in caplog.records if "for the next batch" in r.getMessage()]
    assert (
        len(warned) == 1 and warned[0].startswith(f"step {first} waited ") and "raise runtime.num_workers" in warned[0]
    )


def test_building_a_run_writes_nothing_and_probes_no_peak_until_one_is_read(corpus, tmp_path, monkeypatch):
    """build_run makes the parts (only the data caches are written: token blocks, source hashes); open_run puts them
    in a run dir; the CPU peak is probed at its first read, once."""
    from mlm.train import build_run, open_run

    cache, cwd = tmp_path / "cache", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MLM_CACHE", str(cache))
    calls = counting_probe(monkeypatch, 9e9)
    run = build_run(compose([*TINY_RUN, f"dataset.path={corpus}", "runtime.mixed_precision=no"]))
    written = [p.relative_to(tmp_path).parts[:2] for p in tmp_path.rglob("*") if p.is_file()]
    assert (
        set(written) == {("cache", "blocks"), ("cache", "hashes")}
        and calls == []
        and run.run_dir is None
        and run.tracker is None
    )
    assert run.utilisation.rates(tokens=1024, predictions=150, seconds=1.0)["perf/mfu"] > 0  # a log step reads it
    assert flops.run_totals(run.utilisation, 1024, 150, 1.0)["mfu"] > 0 and len(calls) == 1  # probed once
    assert json.loads((cache / flops.PEAK_CACHE).read_text()) != {}
    open_run(run, tmp_path / "run")
    run.tracker.finish()
    assert run.state.step == 0 and (tmp_path / "run").is_dir() and list(cwd.iterdir()) == []


def test_a_machine_is_busy_when_its_load_passes_half_its_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "getloadavg", lambda: (2.5, 0.0, 0.0))
    assert flops.machine_busy()
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 9.0, 9.0))  # the last minute is what a probe meets
    assert not flops.machine_busy()
