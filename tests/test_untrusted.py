"""Checkpoints, run dirs and model folders from others are data, never code (issue 28, "what the harness trusts").

Each test plants the hostile file (a pickle whose __reduce__ touches a marker file, a model folder with an
auto_map and the Python it names, a `${oc.env:...}` in a saved config), hashes it into the manifest where a
checkpoint is concerned (so verification passes), and asserts the marker never appears and the refusal is
one line that quotes no advice to switch a safety off."""

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlm import checkpoint, export, predict
from mlm.config import UserError
from mlm.parallel import FullyShard, Replicated
from mlm.untrusted import RefusedPickle
from tests.conftest import TINY_RUN, compose
from tests.test_downstream import QUICK
from tests.test_export import RUN, ckpt, run_dir  # noqa: F401  (run_dir: the module's finished 4-step run)

SECRET = "s3cr3t-do-not-print-4711"
pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled"
)  # dcp.save/load in one process, on purpose


class Payload:
    """Unpickling this runs `touch <marker>`: the marker's absence shows nothing of it ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def rehash(path: Path) -> None:
    """The manifest rewritten to the files as they are now: the checkpoint verifies, as a planted one would."""
    files = {
        str(p.relative_to(path)): checkpoint.file_record(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != checkpoint.MANIFEST
    }
    (path / checkpoint.MANIFEST).write_text(
        json.dumps({"step": json.loads((path / "state.json").read_text())["step"], "files": files})
    )
    assert checkpoint.verify(path) is None


def copied(run: Path, tmp_path: Path, step: int = 4) -> Path:
    """A copy of one checkpoint of `run`, in a run directory of its own."""
    target = tmp_path / "run" / "checkpoints" / ckpt(run, step).name
    shutil.copytree(ckpt(run, step), target)
    return target


def edit_state(path: Path, edit) -> None:
    state = json.loads((path / "state.json").read_text())
    edit(state)
    (path / "state.json").write_text(json.dumps(state))
    rehash(path)


def one_line(text: str) -> str:
    assert text.count("\n") == 1 and text.startswith("error: "), text
    assert "weights_only" not in text and "trust_remote_code=True" not in text, text  # no advice to switch a safety off
    return text


def test_the_planted_payload_is_live(tmp_path):
    """The control: plain pickle runs it (so a test below that finds no marker shows a refusal, not a dud)."""
    pickle.loads(pickle.dumps(Payload(tmp_path / "ran")))
    assert (tmp_path / "ran").exists()


# ---------------------------------------------------------------- FSDP shards: .metadata and non-tensor entries


def sharded_copy(run: Path, tmp_path: Path) -> Path:
    """ckpt-4 of `run` with its weights as torch.distributed.checkpoint shards (as an FSDP run writes them)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from mlm.models import build_model

    path = copied(run, tmp_path)
    model = build_model(compose(TINY_RUN).model, 32, seed=0)[0]
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(path / "sharded"))
    (path / "model.safetensors").unlink()
    rehash(path)
    return path


def test_export_reads_real_shard_metadata_and_refuses_a_planted_pickle(run_dir, tmp_path, capsys):  # noqa: F811
    from safetensors.torch import load_file

    path = sharded_copy(run_dir, tmp_path)
    assert export.main([str(path), str(tmp_path / "good")]) == 0  # the allow-list takes what dcp.save writes
    good = load_file(str(tmp_path / "good" / "model.safetensors"))
    assert all(torch.equal(good[k], v) for k, v in load_file(str(ckpt(run_dir, 4) / "model.safetensors")).items())
    capsys.readouterr()

    marker = tmp_path / "pwned"
    (path / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    rehash(path)
    assert export.main([str(path), str(tmp_path / "out")]) == 2
    err = one_line(capsys.readouterr().err)
    assert err == (
        f"error: checkpoint {path}: sharded/.metadata names posix.system, which checkpoint metadata never holds: "
        "refused, nothing of it was run\n"
    )
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_planted_non_tensor_entry_is_loaded_weights_only(tmp_path):
    """dcp's default planner torch.load-s non-tensor entries with weights_only=False; ours does not."""
    import torch.distributed.checkpoint as dcp

    from mlm.dcp_reader import SafeReader, load

    marker = tmp_path / "pwned"
    dcp.save({"x": torch.ones(2), "lr": 0.5, "evil": Payload(marker)}, checkpoint_id=str(tmp_path / "d"))
    target = {"x": torch.zeros(2), "lr": 0.0}
    load(target, SafeReader(str(tmp_path / "d")))  # plain values load
    assert torch.equal(target["x"], torch.ones(2)) and target["lr"] == 0.5
    with pytest.raises(RefusedPickle, match="non-tensor entry evil names posix.system: refused, nothing of it was run"):
        load({"evil": None}, SafeReader(str(tmp_path / "d")))
    assert not marker.exists()


def test_shard_metadata_that_points_outside_its_directory_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    from mlm.dcp_reader import SafeReader

    dcp.save({"x": torch.ones(2)}, checkpoint_id=str(tmp_path / "d"))
    metadata = SafeReader(str(tmp_path / "d")).read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = "../../secret"
    (tmp_path / "d" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(RefusedPickle, match=r"d/.metadata points at '../../secret', outside its checkpoint directory"):
        SafeReader(str(tmp_path / "d")).read_metadata()


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group in this process, as FullyShard needs (torchrun's would be the same, with more ranks)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sharded_module(seed: int):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    fully_shard(module[0])
    fully_shard(module)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    layout = FullyShard()
    layout.root = module
    return layout, module, optimizer


def test_the_fsdp_load_takes_real_shards_and_refuses_a_planted_pickle(process_group, tmp_path):
    saved_layout, saved, saved_optimizer = sharded_module(seed=0)
    saved_layout.save(tmp_path, saved_layout.pieces(saved, saved_optimizer), main=True)
    layout, module, optimizer = sharded_module(seed=1)
    pieces = layout.pieces(module, optimizer)
    assert (
        layout.load(tmp_path, pieces, "cpu") == []
    )  # real metadata and the optimizer's param_groups (non-tensor entries)
    assert all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(module.parameters(), saved.parameters()))
    assert optimizer.param_groups[0]["betas"] == saved_optimizer.param_groups[0]["betas"]

    marker = tmp_path / "pwned"
    (tmp_path / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(
        RefusedPickle, match="^sharded/.metadata names posix.system, which checkpoint metadata never holds"
    ):
        layout.load(tmp_path, pieces, "cpu")
    assert not marker.exists()


# ---------------------------------------------------------------- *.pt files and state.json of a resume


class OneProcess:
    num_processes, is_main_process, process_index, device, scaler = 1, True, 0, torch.device("cpu"), None

    def wait_for_everyone(self):
        pass


def test_a_planted_optimizer_pickle_is_set_aside_in_our_words(run_dir, tmp_path):  # noqa: F811
    from mlm.models import build_model

    path = copied(run_dir, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "x": Payload(marker)}, path / "optimizer.pt")
    rehash(path)
    model = build_model(compose(TINY_RUN).model, 32, seed=0)[0]
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(UserError) as refused:
        checkpoint.load_newest(
            "auto",
            path.parent.parent,
            lambda p: Replicated().load(p, Replicated().pieces(model, optimizer), "cpu"),
            OneProcess(),
        )
    assert "ckpt-00000004: RefusedPickle: optimizer.pt names posix.system: refused, nothing of it was run" in str(
        refused.value
    )
    assert "weights_only" not in str(refused.value) and not marker.exists()
    assert (path.parent / f"corrupt-{path.name}" / "optimizer.pt").exists()  # set aside, kept for a look


def test_a_damaged_pt_file_is_refused_without_torchs_advice(tmp_path):
    from mlm.untrusted import load_weights_only

    (tmp_path / "scheduler.pt").write_bytes(b"not a torch file")
    with pytest.raises(RefusedPickle) as refused:
        load_weights_only(tmp_path / "scheduler.pt", "scheduler.pt")
    assert (
        str(refused.value)
        == "scheduler.pt is not plain tensors and values (Unsupported operand 110): refused, nothing of it was run"
    )


@pytest.mark.parametrize(
    "edit, reason",
    [
        (
            lambda s: s["train_state"].update(bogus=1),
            "state.json's train_state holds bogus, which this version never writes",
        ),
        (
            lambda s: [s["train_state"].pop(k) for k in ("best_perplexity", "tokens")],
            "state.json's train_state has no best_perplexity, tokens, which this version always writes",
        ),
        (lambda s: s.pop("global_batch"), "state.json has no global_batch of type int"),
        (lambda s: s.update(step=99), "state.json says step 99 but its train_state step 4"),
        (
            lambda s: s["data"].update(sources=[["only-one"]]),
            'state.json\'s "data.sources" is not a list of \\[path, sha256\\] pairs',
        ),
        (
            lambda s: s["data"].update(sources="abc"),
            'state.json\'s "data.sources" is not a list of \\[path, sha256\\] pairs',
        ),
        (lambda s: s["data"].update(tokenizer=5), 'state.json\'s "data.tokenizer" is not a sha256 string'),
        (lambda s: s.update(data="abc"), 'state.json\'s "data" is a JSON str, not an object'),
        (lambda s: s.update(data=7), 'state.json\'s "data" is a JSON int, not an object'),
        (lambda s: s.update(config=["a"]), "state.json has no config of type dict"),
        (lambda s: s.update(stream_shards="2"), 'state.json\'s "stream_shards" is "2", not a number of shards'),
    ],
)
def test_a_state_json_that_verifies_with_unknown_or_missing_keys_is_set_aside(run_dir, tmp_path, edit, reason, caplog):  # noqa: F811
    from mlm.train import TrainState

    path = copied(run_dir, tmp_path)
    edit_state(path, edit)
    trainer = checkpoint.Checkpoints(path.parent.parent, {"train_state": checkpoint.Piece(TrainState(), "state")}, None)
    with pytest.raises(UserError, match=f"no checkpoint in .* loads \\(ckpt-00000004: CorruptCheckpoint: {reason}\\)"):
        checkpoint.load_newest("auto", path.parent.parent, trainer.load, OneProcess())
    assert f"checkpoint {path} failed to load" in caplog.text and (path.parent / f"corrupt-{path.name}").is_dir()


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda s: s["train_state"].update(bogus=1), "train_state holds bogus, which this version never writes"),
        (lambda s: s["data"].update(sources=[["only-one"]]), '"data.sources" is not a list of [path, sha256] pairs'),
    ],
)
def test_a_resume_sets_a_checkpoint_with_an_unknown_state_key_aside_and_uses_the_older_one(
    run_dir, corpus, tmp_path, caplog, edit, reason
):  # noqa: F811
    from mlm.train import train

    caplog.set_level(logging.INFO)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "final")
    (copy / "results.json").unlink()
    edit_state(ckpt(copy, 4), edit)
    results = train(compose([*RUN, f"dataset.path={corpus}"]), copy)
    assert reason in caplog.text
    assert f"resumed from {ckpt(copy, 2)} at step 2" in caplog.text and results["steps"] == 4
    assert (copy / "checkpoints" / f"corrupt-{ckpt(copy, 4).name}").is_dir()


# ---------------------------------------------------------------- export: no code, no fetch, no ${...} from a file


def code_folder(tmp_path: Path, marker: Path) -> Path:
    """A model folder whose config.json asks for its own Python (auto_map), which would touch `marker` on import."""
    from mlm.models import build_model

    model, tokenizer = build_model(compose(TINY_RUN).model, 32, seed=0)
    folder = tmp_path / "code"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForMaskedLM": "evil.EvilModel"}
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import BertConfig, BertForMaskedLM\n"
        "class EvilConfig(BertConfig):\n    model_type = 'evil'\n"
        "class EvilModel(BertForMaskedLM):\n    config_class = EvilConfig\n"
    )
    return folder


def pointing_at(folder: Path, trust: bool):
    return lambda s: s["config"].update(
        {
            "model.source": "pretrained",
            "model.name_or_path": str(folder),
            "model.tokenizer": None,
            "model.trust_remote_code": trust,
        }
    )


def test_export_takes_no_trust_remote_code_from_the_checkpoint(run_dir, tmp_path, capsys):  # noqa: F811
    marker = tmp_path / "pwned"
    folder = code_folder(tmp_path, marker)
    path = copied(run_dir, tmp_path)
    edit_state(path, pointing_at(folder, trust=True))
    assert export.main([str(path), str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert one_line(err) == (
        f"error: checkpoint {path}'s run had model.trust_remote_code=true: its model {folder} runs Python code "
        "of its own, and export takes that setting from its own command line only (--trust-remote-code, for "
        "code you have read): refused, nothing loaded\n"
    )
    edit_state(path, pointing_at(folder, trust=False))  # the folder's auto_map alone
    assert export.main([str(path), str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert (
        f"model: {folder} (named by the checkpoint; files on this machine only, no code run)\n" in out
    )  # shown before it loads
    assert one_line(err) == (
        f"error: tokenizer {str(folder)!r} ships Python code of its own ({folder / 'config.json'} has an auto_map) "
        "and this command runs none from a model folder: refused, nothing of it was run\n"
    )
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_export_fetches_no_model_a_checkpoint_names(run_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    from mlm import models

    monkeypatch.setattr(models, "hub_reachable", lambda: pytest.fail("the hub was asked"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    path = copied(run_dir, tmp_path)
    edit_state(
        path, lambda s: s["config"].update({"model.source": "pretrained", "model.name_or_path": "someone/evil-model"})
    )
    assert export.main([str(path), str(tmp_path / "out")]) == 2
    assert one_line(capsys.readouterr().err).startswith(
        "error: tokenizer 'someone/evil-model' is not on this machine (no such directory, not in the Hugging Face cache), and a "
        "name read from a file is never fetched; download it yourself (hf download someone/evil-model)"
    )


def test_export_resolves_no_interpolation_from_a_checkpoint(run_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    path = copied(run_dir, tmp_path)
    leak = "leak/${oc.env:AWS_SECRET_ACCESS_KEY}"
    edit_state(path, lambda s: s["config"].update({"model.tokenizer": leak}))
    assert export.main([str(path), str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert one_line(err) == (
        f"error: checkpoint {path}'s state.json: model.tokenizer holds an interpolation (${{...}}), "
        "which is never resolved from a file; refused\n"
    )
    assert SECRET not in out + err and not (tmp_path / "out").exists()


KERNEL = "kernels-community/flash-attn2"  # a hub kernel: transformers fetches its code through `kernels`, whatever local_files_only says


@pytest.fixture
def no_kernel_fetch(monkeypatch):
    """Offline, and any hub kernel fetch fails the test: nothing read from a file may name code to fetch and run."""
    from transformers.integrations import hub_kernels

    def fetched(*args, **kwargs):
        pytest.fail(f"a hub kernel was fetched: {args}")

    monkeypatch.setattr(hub_kernels, "get_kernel", fetched)
    monkeypatch.setattr(hub_kernels, "get_kernel_hub", fetched, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_export_takes_no_attention_backend_from_the_checkpoint(run_dir, tmp_path, capsys, monkeypatch, no_kernel_fetch):  # noqa: F811
    from mlm import models

    built = []
    build_model = models.build_model
    monkeypatch.setattr(
        models, "build_model", lambda cfg, *a, **k: built.append(cfg.attn_implementation) or build_model(cfg, *a, **k)
    )
    path = copied(run_dir, tmp_path)
    for saved, used in (
        (KERNEL, "sdpa"),
        ("flash_attention_2", "sdpa"),
        ("eager", "eager"),
    ):  # flash: may fall back to a kernel
        edit_state(path, lambda s: s["config"].update({"model.attn_implementation": saved}))
        out = tmp_path / f"out-{used}-{len(built)}"
        assert export.main([str(path), str(out)]) == 0, capsys.readouterr().err
        assert built[-1] == used and (out / "config.json").is_file()
        assert torch.equal(
            load_file(out / "model.safetensors")["bert.embeddings.word_embeddings.weight"],
            load_file(run_dir / "final" / "model.safetensors")["bert.embeddings.word_embeddings.weight"],
        )
    assert KERNEL not in capsys.readouterr().out


def test_only_transformers_refusal_of_a_repos_code_reads_as_shipping_code():
    from transformers.dynamic_module_utils import resolve_trust_remote_code

    from mlm.models import _refusing_code

    def kernel_error():  # a hub kernel's failure that mentions the flag: not a model folder's code
        raise ValueError(
            f"An error occurred while trying to load from '{KERNEL}': pass trust_remote_code=True to kernels"
        )

    with pytest.raises(ValueError, match="An error occurred"):
        _refusing_code("model", "m", kernel_error)
    with pytest.raises(UserError, match="'someone/coded' ships Python code of its own and this command runs none"):
        _refusing_code("model", "someone/coded", resolve_trust_remote_code, False, "someone/coded", False, True)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: s["config"].update({"model.dropout": "abc"}),
            "its model config does not fit this version's (Value 'abc' of type 'str'",
        ),
        (lambda s: s["config"].pop("block_size"), "state.json's config has no block_size or seed; export another one"),
    ],
)
def test_a_checkpoint_config_that_does_not_fit_is_one_line(run_dir, tmp_path, capsys, edit, message):  # noqa: F811
    path = copied(run_dir, tmp_path)
    edit_state(path, edit)
    assert export.main([str(path), str(tmp_path / "out")]) == 2
    assert message in one_line(capsys.readouterr().err)


def test_export_into_dot_works_and_into_its_source_is_one_line(run_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    here = tmp_path / "here"
    here.mkdir()
    inode = os.stat(here).st_ino
    monkeypatch.chdir(here)
    assert export.main([str(ckpt(run_dir, 2)), "."]) == 0, capsys.readouterr().err
    assert os.stat(".").st_ino == os.stat(here).st_ino == inode  # the shell's own directory, not one renamed over it
    assert (
        os.getcwd() == str(here) and not list(tmp_path.glob(".tmp*")) and not list(here.glob(".*"))
    )  # no staging left
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir("."))
    assert torch.equal(
        load_file("model.safetensors")["bert.embeddings.word_embeddings.weight"],
        load_file(ckpt(run_dir, 2) / "model.safetensors")["bert.embeddings.word_embeddings.weight"],
    )
    for out in (run_dir, ckpt(run_dir, 2)):
        assert export.main([str(ckpt(run_dir, 2)), str(out)]) == 2
        assert (
            one_line(capsys.readouterr().err)
            == f"error: {out} exists and is not empty; export into a new or empty directory (nothing is overwritten)\n"
        )


# ---------------------------------------------------------------- predict and downstream on a model folder


@pytest.fixture(scope="module")
def hostile_folders(tmp_path_factory):
    """(marker, folder with its own code, folder whose only weights are a pickle with a payload)."""
    base = tmp_path_factory.mktemp("hostile")
    marker = base / "pwned"
    folder = code_folder(base, marker)
    pickled = base / "pickled"
    shutil.copytree(folder, pickled)
    config = json.loads((pickled / "config.json").read_text())
    config.pop("auto_map")
    config["model_type"] = "bert"
    (pickled / "config.json").write_text(json.dumps(config))
    (pickled / "evil.py").unlink()
    (pickled / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": Payload(marker)}, pickled / "pytorch_model.bin")
    return marker, folder, pickled


def test_predict_refuses_hostile_model_folders_in_one_line(hostile_folders, capsys):
    marker, folder, pickled = hostile_folders
    assert predict.main([str(folder), "a <mask> b"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"error: tokenizer {str(folder)!r} ships Python code of its own ({folder / 'config.json'} "
        "has an auto_map) and this command runs none from a model folder: refused, nothing of it was run\n"
    )
    assert predict.main([str(pickled), "a <mask> b"]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"error: model {str(pickled)!r}: its weights file names posix.system: refused, nothing of it was run\n"
    )
    assert not marker.exists()


def test_downstream_refuses_hostile_model_folders_in_one_line(hostile_folders, capsys):
    from mlm.downstream.__main__ import main

    marker, folder, pickled = hostile_folders
    for model, message in (
        (folder, "ships Python code of its own"),
        (pickled, f"model {str(pickled)!r}: its weights file names posix.system"),
    ):
        assert (
            main(
                [str(model), "downstream=polarity", "downstream.seeds=[0]", "downstream.folds=2", "downstream.epochs=1"]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert one_line(err[err.index("error: ") :]) and message in err
    assert not marker.exists()


def test_predict_and_downstream_take_no_attention_backend_from_a_model_folder(
    run_dir, tmp_path, capsys, no_kernel_fetch
):  # noqa: F811
    from mlm.downstream.protocol import load_classifier

    folder = tmp_path / "model"
    shutil.copytree(run_dir / "final", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "attn_implementation": KERNEL})
    )  # transformers would honour it
    assert load_classifier(str(folder), 2).config._attn_implementation == "sdpa"
    assert predict.main([str(folder), "a <mask> b"]) == 0, capsys.readouterr().err


def classifier_code_folder(tmp_path: Path, marker: Path) -> Path:
    """code_folder with a sequence classifier of its own too: a model that downstream can fine-tune once its code is trusted."""
    folder = code_folder(tmp_path, marker)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModelForSequenceClassification"] = "evil.EvilClassifier"
    (folder / "config.json").write_text(json.dumps(config))
    with open(folder / "evil.py", "a") as f:
        f.write(
            "from transformers import BertForSequenceClassification\n"
            "class EvilClassifier(BertForSequenceClassification):\n    config_class = EvilConfig\n"
        )
    return folder


def test_downstream_runs_a_folders_code_only_when_its_own_command_line_trusts_it(tmp_path, capsys):
    from mlm.downstream.__main__ import main

    marker = tmp_path / "ran"
    folder = classifier_code_folder(tmp_path, marker)
    assert main([str(folder), *QUICK]) == 2
    assert (
        "ships Python code of its own" in one_line(capsys.readouterr().err.splitlines(keepends=True)[-1])
        and not marker.exists()
    )
    assert main([str(folder), *QUICK, "model.trust_remote_code=true"]) == 0, capsys.readouterr().err
    assert (
        marker.exists() and json.loads(capsys.readouterr().out)["task"] == "polarity"
    )  # trusted here: its code ran, as asked


def test_a_runs_own_downstream_phase_trusts_what_its_command_line_trusted(corpus, tmp_path):
    from mlm.train import train

    from omegaconf import OmegaConf

    from mlm.cli import with_downstream

    folder = classifier_code_folder(tmp_path, tmp_path / "ran")
    run = [
        *TINY_RUN,
        f"dataset.path={corpus}",
        "trainer.max_steps=2",
        "model.source=pretrained",
        f"model.name_or_path={folder}",
        "model.trust_remote_code=true",
        "runtime.num_threads=1",  # a tiny model's ops are faster alone than in a thread pool on a busy CPU
        *QUICK,
    ]
    results = train(compose(run), tmp_path / "run")  # its final/ ships the folder's code (an auto_map), trusted here
    assert results["downstream"]["task"] == "polarity" and "auto_map" in json.loads(
        (tmp_path / "run" / "final" / "config.json").read_text()
    )
    asked_again = OmegaConf.structured(compose([*run, "downstream.seeds=[1]"]))  # a finished run asked for another seed
    assert with_downstream(tmp_path / "run", asked_again, results)["downstream"]["seeds"] == [1]


def test_predict_top_k_and_non_model_folders_are_one_line(run_dir, tmp_path, capsys):  # noqa: F811
    final = str(run_dir / "final")
    for k in ("0", "-3"):
        with pytest.raises(SystemExit) as exit_:
            predict.main([final, "a <mask> b", "--top-k", k])
        assert exit_.value.code == 2 and capsys.readouterr().err.endswith(
            f"error: --top-k {k}: give 1 or more candidates per mask\n"
        )
    assert predict.main([final, "a <mask> b", "--top-k", "1000000"]) == 2
    assert one_line(capsys.readouterr().err).startswith("error: --top-k 1000000: the model knows ")
    for folder, lacks in ((tmp_path, "config.json"), (run_dir / "checkpoints", "config.json")):
        assert predict.main([str(folder), "a <mask> b"]) == 2
        err = one_line(capsys.readouterr().err)
        assert (
            err
            == f"error: {folder} is not a saved model (no {lacks}); give a model directory (a run's final/, an mlm.export output) or a hub id\n"
        )
        assert "model.tokenizer" not in err  # predict has no such setting
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "final" / "config.json", bare)
    assert predict.main([str(bare), "a <mask> b"]) == 2
    assert "is not a saved model (no tokenizer files)" in one_line(capsys.readouterr().err)
    gone = tmp_path / "no" / "such"
    assert predict.main([str(gone), "a <mask> b"]) == 2  # a path, not a hub id: no hub lookup, no setting predict lacks
    assert one_line(capsys.readouterr().err) == (
        f"error: {gone} is not a saved model (no such directory); "
        "give a model directory (a run's final/, an mlm.export output) or a hub id\n"
    )


def test_an_fsdp_checkpoint_on_one_process_is_one_line_that_points_nowhere_circular(tmp_path):
    (tmp_path / "sharded").mkdir()
    with pytest.raises(UserError) as refused:
        Replicated().load(tmp_path, {}, "cpu")
    message = str(refused.value)
    assert "several processes" in message and f"python -m mlm.export {tmp_path} <dir>" in message
    assert "use runtime.sharding=none" not in message  # what a one-process runtime.sharding=fsdp says back


def test_metadata_pickled_by_an_older_python_loads_and_its_getattr_reaches_only_enum_members():
    """Python 3.11.2 (Debian 12's python3) pickles an enum member as getattr(EnumClass, "NAME"), where 3.11.7 pickles
    it by value: DCP metadata written there (its memory-format enum) must load, and a getattr to anything but an
    allowed enum's member is refused."""
    import enum
    import io

    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    from mlm.untrusted import MetadataUnpickler

    size = torch.Size([2, 3])
    chunk = ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=size)
    tensor = TensorStorageMetadata(properties=TensorProperties(dtype=torch.float32), size=size, chunks=[chunk])
    metadata = Metadata(state_dict_metadata={"w": tensor})

    class AsPython3112(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, enum.Enum):
                return getattr, (type(obj), obj.name)
            return NotImplemented

    def written(obj, protocol: int) -> bytes:
        out = io.BytesIO()
        AsPython3112(out, protocol=protocol).dump(obj)
        return out.getvalue()

    for protocol in (2, pickle.DEFAULT_PROTOCOL):  # __builtin__.getattr and builtins.getattr
        data = written(metadata, protocol)
        assert b"getattr" in data  # the form the refusal met in CI
        assert MetadataUnpickler(io.BytesIO(data)).load() == metadata

    evil = b"\x80\x02c__builtin__\ngetattr\nctorch\nSize\nX\x0a\x00\x00\x00__reduce__\x86R."  # getattr(Size, ...)
    with pytest.raises(RefusedPickle, match=r"calls getattr\(Size, '__reduce__'\), not an enum member"):
        MetadataUnpickler(io.BytesIO(evil)).load()
