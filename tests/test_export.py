"""python -m mlm.export: a checkpoint (whole or FSDP shards) becomes a model directory that Hugging Face's
own loaders read, with exactly the weights of that step; bad checkpoints, arguments and an offline hub
are one line each."""

import json
import shutil
import socket
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlm import checkpoint, export
from mlm.config import UserError
from mlm.parallel import Piece
from mlm.tracking import flat_config
from tests.conftest import TINY_RUN, compose, run_cli

RUN = [
    *TINY_RUN,
    "runtime.mixed_precision=no",
    "trainer.checkpoint_every=2",
    "trainer.max_steps=4",
    "trainer.keep_checkpoints=2",
]
SENTENCES = [
    "The cat sat on the [MASK].",
    "A [MASK] galaxy has a mass.",
    "The river of the city was [MASK] in the war.",
]


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 and its final/ model."""
    from mlm.train import train

    path = tmp_path_factory.mktemp("export") / "run"
    train(compose([*RUN, f"dataset.path={corpus}"]), path)
    assert [p.name for p in (path / "checkpoints").iterdir()] != [] and (path / "final" / "model.safetensors").exists()
    return path


@pytest.fixture(scope="module")
def ema_run_dir(corpus, tmp_path_factory) -> Path:
    """The same run with a weight average (trainer.ema_decay=0.9): ema.safetensors in its checkpoints, and final_ema/."""
    from mlm.train import train

    path = tmp_path_factory.mktemp("export-ema") / "run"
    train(compose([*RUN, "trainer.ema_decay=0.9", f"dataset.path={corpus}"]), path)
    assert (ckpt(path, 4) / "ema.safetensors").exists() and (path / "final_ema" / "model.safetensors").exists()
    return path


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"ckpt-{step:08d}"


def logits(model_dir: Path) -> torch.Tensor:
    """Hugging Face's own loaders on the directory: the logits of SENTENCES (padded to one batch)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**tokenizer(SENTENCES, return_tensors="pt", padding=True)).logits


def exported(source: Path, out: Path, capsys, *flags: str) -> str:
    assert export.main([str(source), str(out), *flags]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def assert_weights_are_the_checkpoints(out: Path, checkpoint_dir: Path, file: str = "model.safetensors") -> None:
    """Every tensor the checkpoint stores (in `file`) is the exported model's tensor of that name (tied names included)."""
    from transformers import AutoModelForMaskedLM

    state = AutoModelForMaskedLM.from_pretrained(out).state_dict()
    saved = load_file(str(checkpoint_dir / file))
    assert saved and all(torch.equal(state[name], tensor) for name, tensor in saved.items())


def test_a_checkpoint_exports_to_the_weights_of_its_step(run_dir, tmp_path, capsys):
    from transformers import pipeline

    out4, out2 = tmp_path / "step4", tmp_path / "step2"
    assert f"exporting {ckpt(run_dir, 4)}\n" in exported(ckpt(run_dir, 4), out4, capsys)
    exported(ckpt(run_dir, 2), out2, capsys)
    final = logits(run_dir / "final")  # the run's own save_pretrained at step 4
    assert torch.allclose(logits(out4), final, rtol=0, atol=1e-6)
    assert (logits(out2) - final).abs().max() > 1e-3  # really step 2's weights, not the newest
    assert_weights_are_the_checkpoints(out4, ckpt(run_dir, 4))
    assert_weights_are_the_checkpoints(out2, ckpt(run_dir, 2))
    text = "The cat sat on the [MASK]."
    ours, theirs = (
        pipeline("fill-mask", model=str(out4))(text, top_k=3),
        pipeline("fill-mask", model=str(run_dir / "final"))(text, top_k=3),
    )
    assert [c["token_str"] for c in ours] == [c["token_str"] for c in theirs]
    assert [c["score"] for c in ours] == pytest.approx([c["score"] for c in theirs], abs=1e-6)


def test_a_checkpoint_is_a_model_directory_that_from_pretrained_and_the_pipeline_load(run_dir):
    """Hugging Face's loaders read ckpt-N itself: the weights of step N (step 4 is final/'s), its files in the manifest."""
    from transformers import pipeline

    from mlm.checkpoint import verify

    final = logits(run_dir / "final")
    assert torch.allclose(logits(ckpt(run_dir, 4)), final, rtol=0, atol=1e-6)
    assert (logits(ckpt(run_dir, 2)) - final).abs().max() > 1e-3  # an older step is its own model
    assert pipeline("fill-mask", model=str(ckpt(run_dir, 4)))(SENTENCES[0])[0]["sequence"].startswith(
        "the cat sat on the"
    )
    manifest = json.loads((ckpt(run_dir, 4) / "manifest.json").read_text())["files"]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= manifest.keys() and verify(
        ckpt(run_dir, 4)
    ) is None


def test_a_run_dir_exports_its_newest_good_checkpoint_and_a_corrupt_one_is_refused(run_dir, tmp_path, capsys, caplog):
    out = exported(run_dir, tmp_path / "newest", capsys)
    assert f"exporting {ckpt(run_dir, 4)} (the newest verified checkpoint of {run_dir})" in out
    assert torch.equal(logits(tmp_path / "newest"), logits(run_dir / "final"))

    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    weights = ckpt(copy, 4) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a few bits flipped, the size kept
    weights.write_bytes(bytes(data))
    assert export.main([str(ckpt(copy, 4)), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: checkpoint {ckpt(copy, 4)}: the checkpoint model.safetensors changed after it was written "
        "(its SHA-256 differs from manifest.json); export another one (or the run directory: its newest good one)\n"
    )
    assert not (tmp_path / "bad").exists()

    out = exported(copy, tmp_path / "older", capsys)
    assert f"exporting {ckpt(copy, 2)} (the newest verified checkpoint of {copy})" in out
    assert f"checkpoint {ckpt(copy, 4)} model.safetensors changed after it was written" in caplog.text
    assert_weights_are_the_checkpoints(tmp_path / "older", ckpt(run_dir, 2))
    assert ckpt(copy, 4).is_dir()  # exporting reads a run dir, it never moves anything in it


def test_ema_exports_the_weight_average_of_the_checkpoint_and_a_run_without_one_is_one_line(
    ema_run_dir, run_dir, tmp_path, monkeypatch, capsys
):
    pushed = []
    monkeypatch.setattr(export, "hub_reachable", lambda: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(
        export,
        "push",
        lambda out, repo, revision, step: pushed.append((repo, revision, step)) or "https://hub/commit/1",
    )
    out = exported(ema_run_dir, tmp_path / "ema", capsys, "--ema", "--push-to-hub", "me/tiny-mlm")
    assert (
        f"exporting the weight average of {ckpt(ema_run_dir, 4)} (the newest verified checkpoint of {ema_run_dir})"
        in out
    )
    assert pushed == [("me/tiny-mlm", "step-4-ema", 4)]  # its own branch: step-4 is the weights'
    averaged = logits(tmp_path / "ema")
    assert torch.allclose(
        averaged, logits(ema_run_dir / "final_ema"), rtol=0, atol=1e-6
    )  # the run's own swap-in and save
    assert (averaged - logits(ema_run_dir / "final")).abs().max() > 1e-3  # the average, not the weights
    assert_weights_are_the_checkpoints(tmp_path / "ema", ckpt(ema_run_dir, 4), "ema.safetensors")
    exported(ckpt(ema_run_dir, 4), tmp_path / "plain", capsys)  # without --ema: the weights, as before
    assert torch.allclose(logits(tmp_path / "plain"), logits(ema_run_dir / "final"), rtol=0, atol=1e-6)

    assert export.main([str(ckpt(run_dir, 4)), str(tmp_path / "none"), "--ema"]) == 2
    assert capsys.readouterr().err == (
        f"error: checkpoint {ckpt(run_dir, 4)} holds no weight average (its run had "
        "trainer.ema_decay=0, off); export it without --ema\n"
    )
    assert not (tmp_path / "none").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_weight_average_that_does_not_fit_the_model_is_refused(ema_run_dir, tiny_model, tmp_path):
    import torch.distributed.checkpoint as dcp

    from mlm.ema import WeightAverage

    read = WeightAverage(tiny_model, 0.0)
    pieces = {"ema": Piece(read)}  # as export reads it
    average = load_file(str(ckpt(ema_run_dir, 4) / "ema.safetensors"))
    copy = tmp_path / "ckpt"
    copy.mkdir()
    save_file({**average, "extra.weight": torch.zeros(1)}, str(copy / "ema.safetensors"))
    with pytest.raises(
        UserError, match=r"its ema does not fit the one built here \(missing \[\], unexpected \['extra.weight'\]\)"
    ):
        checkpoint.read(copy, pieces)
    whole = tmp_path / "whole"  # the FSDP reader: one process, no process group
    dcp.save({"ema": average}, checkpoint_id=str(whole / "sharded"))
    assert checkpoint.read(whole, pieces) == []
    assert read.state_dict().keys() == average.keys()
    assert all(torch.equal(read.state_dict()[k], v) for k, v in average.items())
    dropped = "bert.encoder.layer.1.output.dense.bias"
    (copy / "sharded").mkdir()
    dcp.save({"ema": {k: v for k, v in average.items() if k != dropped}}, checkpoint_id=str(copy / "sharded"))
    with pytest.raises(UserError, match=f"\\(missing \\['{dropped}'\\], unexpected \\[\\]\\)"):
        checkpoint.read(copy, pieces)


def test_the_flat_config_a_checkpoint_keeps_unflattens_to_the_runs_model_config():
    for overrides in (TINY_RUN, ["model=tiny_modernbert", "model.dropout=0.05"], []):
        cfg = compose(overrides)
        assert export.model_config(flat_config(asdict(cfg))) == cfg.model


@pytest.fixture(scope="module")
def tiny_model():
    from mlm.models import build_model

    return build_model(compose(TINY_RUN).model, 32, seed=0)[0]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_weights_that_do_not_fit_the_model_are_refused_whole_and_sharded(tiny_model, tmp_path):
    import torch.distributed.checkpoint as dcp

    from mlm.models import build_model

    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    fresh = build_model(compose(TINY_RUN).model, 32, seed=1)[0]
    dcp.save({"model": state}, checkpoint_id=str(tmp_path / "whole" / "sharded"))
    assert checkpoint.read(tmp_path / "whole", {"model": Piece(fresh)}) == []  # one process, no process group
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())

    dropped = "bert.encoder.layer.1.output.dense.bias"
    partial = {k: v for k, v in state.items() if k != dropped}
    dcp.save({"model": partial}, checkpoint_id=str(tmp_path / "partial" / "sharded"))
    with pytest.raises(
        UserError, match=f"its model does not fit the one built here \\(missing \\['{dropped}'\\], unexpected \\[\\]\\)"
    ):
        checkpoint.read(tmp_path / "partial", {"model": Piece(fresh)})
    shutil.rmtree(tmp_path / "partial" / "sharded")
    save_file({**partial, "extra.weight": torch.zeros(1)}, str(tmp_path / "partial" / "model.safetensors"))
    with pytest.raises(UserError, match=f"missing \\['{dropped}'\\], unexpected \\['extra.weight'\\]"):
        checkpoint.read(tmp_path / "partial", {"model": Piece(fresh)})


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_push_to_an_unreachable_hub_is_one_line_before_any_work(run_dir, tmp_path):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HUB_OFFLINE": None}
    proc = run_cli([str(run_dir), str(tmp_path / "out"), "--push-to-hub", "me/tiny-mlm"], env=env, module="mlm.export")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --push-to-hub me/tiny-mlm: the Hugging Face hub is unreachable (offline?)")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""  # nothing exported, no checkpoint even read
    assert not (tmp_path / "out").exists()


def test_push_in_offline_mode_never_calls_the_hub(run_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: pytest.fail("the hub was called"))
    assert export.main([str(run_dir), str(tmp_path / "out"), "--push-to-hub", "me/tiny-mlm", "--revision", "v1"]) == 2
    assert "the Hugging Face hub is unreachable" in capsys.readouterr().err
    assert export.main([str(run_dir), str(tmp_path / "out"), "--push-to-hub", "not a repo//id"]) == 2
    assert capsys.readouterr().err.startswith("error: --push-to-hub 'not a repo//id': ")


def test_push_uploads_the_export_to_branch_step_n_and_a_refusal_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
    """The hub's side stood in for (no network here): which calls, with what; a refusal keeps the export."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(export, "hub_reachable", lambda: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo, **kw: calls.append(("repo", repo, kw)))
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_branch", lambda self, repo, **kw: calls.append(("branch", repo, kw))
    )

    def upload(self, **kw):
        calls.append(
            (
                "upload",
                kw["repo_id"],
                {"revision": kw["revision"], "files": sorted(p.name for p in Path(kw["folder_path"]).iterdir())},
            )
        )
        return type("Commit", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload)
    assert export.main([str(run_dir), str(tmp_path / "out"), "--push-to-hub", "me/tiny-mlm"]) == 0
    assert calls == [
        ("repo", "me/tiny-mlm", {"exist_ok": True}),
        ("branch", "me/tiny-mlm", {"branch": "step-4", "exist_ok": True}),
        (
            "upload",
            "me/tiny-mlm",
            {
                "revision": "step-4",
                "files": ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"],
            },
        ),
    ]
    assert "pushed to me/tiny-mlm (branch step-4): https://hub/commit/1" in capsys.readouterr().out

    def refused(self, repo, **kw):  # what HfHubHTTPError (an OSError) says without a token
        raise OSError(
            "401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\nInvalid credentials"
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refused)
    assert (
        export.main([str(ckpt(run_dir, 2)), str(tmp_path / "out2"), "--push-to-hub", "me/tiny-mlm", "--revision", "v1"])
        == 2
    )
    assert capsys.readouterr().err == (
        f"error: --push-to-hub me/tiny-mlm: 401 Client Error: Unauthorized for url: "
        f"https://huggingface.co/api/repos/create (the export is in {tmp_path / 'out2'})\n"
    )
    assert (tmp_path / "out2" / "model.safetensors").exists()


def test_bad_arguments_get_a_usage_line_or_one_error_line(run_dir, tmp_path, capsys):
    for argv, message in (
        ([], "the following arguments are required: checkpoint, out"),
        (
            [str(tmp_path / "nowhere"), str(tmp_path / "out")],
            f"no such checkpoint or run directory: {tmp_path / 'nowhere'}",
        ),
        ([str(run_dir), str(tmp_path / "out"), "--revision", "v1"], "--revision needs --push-to-hub"),
    ):
        with pytest.raises(SystemExit) as exit_:
            export.main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: python -m mlm.export") and err.endswith(f"error: {message}\n")

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    inside = ckpt(run_dir, 4) / "hf"
    for source, out, message in (
        (run_dir, full, f"{full} exists and is not empty; export into a new or empty directory"),
        (ckpt(run_dir, 4), inside, f"{inside} is inside {ckpt(run_dir, 4)}"),
        (tmp_path, tmp_path / "out", f"{tmp_path} is neither a checkpoint"),
    ):
        assert export.main([str(source), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert (full / "keep.txt").read_text() == "mine" and not inside.exists()
    (tmp_path / "empty").mkdir()
    assert export.main([str(ckpt(run_dir, 2)), str(tmp_path / "empty")]) == 0  # an empty directory is taken
    assert (tmp_path / "empty" / "config.json").exists()


@pytest.mark.slow
def test_an_fsdp_checkpoint_of_two_processes_exports_in_one(fsdp_runs, tmp_path, capsys):
    """Its weights and (--ema) its weight average, each rank's shard of it assembled here: tests/test_sharding.py's run
    on 2 processes with the weight average (trainer.ema_decay=0.9), shared with tests/test_ema.py."""
    fsdp = fsdp_runs["fsdp_ema"]
    assert (ckpt(fsdp, 4) / "sharded" / ".metadata").exists() and not (ckpt(fsdp, 4) / "model.safetensors").exists()
    assert not (
        ckpt(fsdp, 4) / "config.json"
    ).exists()  # from_pretrained finds no model there, and the note says what does
    assert f"python -m mlm.export {ckpt(fsdp, 4)} <out dir>" in (ckpt(fsdp, 4) / "HOW_TO_LOAD.txt").read_text()
    exported(ckpt(fsdp, 4), tmp_path / "step4", capsys)
    exported(ckpt(fsdp, 2), tmp_path / "step2", capsys)
    final = logits(fsdp / "final")
    assert torch.allclose(logits(tmp_path / "step4"), final, rtol=0, atol=1e-6)
    assert (logits(tmp_path / "step2") - final).abs().max() > 1e-3
    assert (
        load_file(str(tmp_path / "step4" / "model.safetensors")).keys()
        == load_file(str(fsdp / "final" / "model.safetensors")).keys()
    )
    exported(ckpt(fsdp, 4), tmp_path / "ema4", capsys, "--ema")
    averaged = logits(tmp_path / "ema4")
    assert torch.allclose(averaged, logits(fsdp / "final_ema"), rtol=0, atol=1e-6)
    assert (averaged - final).abs().max() > 1e-3
