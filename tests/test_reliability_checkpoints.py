"""Checkpoints never run code: a real checkpoint plus one object whose unpickling would write a marker
file goes through every entry point that accepts a checkpoint; the payload never runs and the error
names the file and says that it holds non-tensor objects."""

from __future__ import annotations

import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_train, tiny_run

from magitrain.checkpoint.atomic_io import AtomicCheckpointIO
from magitrain.checkpoint.resume import checkpoint_meta, newest_checkpoint
from magitrain.checkpoint.safe_load import (
    UnsafeCheckpointError,
    check_deepspeed_checkpoint,
    read_dcp_metadata,
)
from magitrain.launch import train

REFUSED = "holds non-tensor objects"


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file exists iff the pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def real_ckpt(latent_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real")
    train(compose_train(tiny_run(latent_shards, "trainer.max_steps=2"), out))
    return out / "checkpoints" / "step00000002.ckpt"


@pytest.fixture
def crafted(real_ckpt, tmp_path) -> tuple[Path, Path]:
    """(crafted checkpoint, marker): the real checkpoint with a Payload among its hyper-parameters."""
    ckpt = torch.load(real_ckpt, map_location="cpu", weights_only=True)
    marker = tmp_path / "PAYLOAD_RAN"
    ckpt["hyper_parameters"]["note"] = Payload(marker)
    path = tmp_path / "crafted.ckpt"
    torch.save(ckpt, path)
    return path, marker


def test_our_checkpoints_hold_only_tensors_and_plain_values(real_ckpt):
    ckpt = torch.load(real_ckpt, map_location="cpu", weights_only=True)  # raises if anything else
    assert {"state_dict", "optimizer_states", "callbacks", "hyper_parameters", "MagiDataModule"} <= set(ckpt)


def test_train_py_refuses_a_crafted_ckpt_path_and_a_planted_last(crafted, latent_shards, tmp_path, script):
    path, marker = crafted
    result = script("train.py", *tiny_run(latent_shards, f"ckpt_path={path}", f"hydra.run.dir={tmp_path}"))
    assert result.returncode != 0 and not marker.exists()
    assert f"{path} {REFUSED}" in result.stdout + result.stderr

    run = tmp_path / "b"
    (run / "checkpoints").mkdir(parents=True)
    planted = run / "checkpoints" / "last.ckpt"
    planted.write_bytes(path.read_bytes())
    result = script("train.py", *tiny_run(latent_shards), "ckpt_path=last", f"hydra.run.dir={run}")
    assert result.returncode != 0 and not marker.exists()
    assert f"{planted} {REFUSED}" in result.stdout + result.stderr


def test_lightnings_own_load_is_weights_only(crafted):
    path, marker = crafted
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()


def test_export_cli_refuses_a_crafted_checkpoint(crafted, tmp_path):
    from magitrain import export

    path, marker = crafted
    with pytest.raises(UnsafeCheckpointError, match=f"{path} {REFUSED}"):
        export.main([str(path), str(tmp_path / "out")])
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_infer_py_refuses_a_crafted_ckpt_and_sr_ckpt(crafted, tmp_path, monkeypatch):
    from magitrain.checkpoint import save_official
    from magitrain.model import MagiHumanDiT, tiny

    monkeypatch.syspath_prepend(str(REPO))
    import infer

    path, marker = crafted
    base = save_official(MagiHumanDiT(tiny()), tmp_path / "base")
    common = ["model=tiny", "codecs=tiny", "prompt=hi", "seconds=0.36", "resolution=64x32"]
    with pytest.raises(UnsafeCheckpointError, match=f"{path} {REFUSED}"):
        infer.main([f"ckpt={path}", *common, f"out={tmp_path / 'a.mp4'}"])
    with pytest.raises(UnsafeCheckpointError, match=f"{path} {REFUSED}"):
        infer.main(
            [
                f"ckpt={base}",
                f"sr_ckpt={path}",
                "sr=128x64",
                "sr_model=tiny",
                *common,
                f"out={tmp_path / 'b.mp4'}",
            ]
        )
    assert not marker.exists()


def test_distributed_and_deepspeed_checkpoint_directories_are_checked(real_ckpt, tmp_path):
    """FSDP2 directories: DCP unpickles `.metadata` with plain pickle, so it is checked first.
    DeepSpeed directories: every file loads weights-only with exactly DeepSpeed's own classes allowed."""
    import torch.distributed.checkpoint as dcp
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    marker = tmp_path / "PAYLOAD_RAN"
    fsdp = tmp_path / "fsdp.ckpt"
    dcp.save({"state_dict": {"w": torch.ones(2)}}, checkpoint_id=fsdp)
    torch.save({"global_step": 5}, fsdp / "meta.pt")
    read_dcp_metadata(fsdp)
    assert checkpoint_meta(fsdp)["global_step"] == 5
    (fsdp / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match=f"{fsdp / '.metadata'} {REFUSED}"):
        checkpoint_meta(fsdp)

    ds = tmp_path / "ds.ckpt"
    (ds / "checkpoint").mkdir(parents=True)
    (ds / "latest").write_text("checkpoint")
    states = ds / "checkpoint" / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "global_step": 7}, states)
    optim = ds / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(
        {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2)}}, optim
    )
    check_deepspeed_checkpoint(ds)
    assert checkpoint_meta(ds)["global_step"] == 7
    torch.save({"optimizer_state_dict": {"loss_scaler": Payload(marker)}}, optim)
    with pytest.raises(UnsafeCheckpointError, match=f"{optim} {REFUSED}"):
        checkpoint_meta(ds)
    assert not marker.exists()


def test_last_is_the_newest_step_and_steps_over_a_corrupt_one(real_ckpt, tmp_path, caplog):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    ckpt = torch.load(real_ckpt, map_location="cpu", weights_only=True)
    for step, name in ((2, "step00000002.ckpt"), (9, "a-name-that-sorts-first.ckpt"), (5, "last.ckpt")):
        torch.save({**ckpt, "global_step": step}, ckpt_dir / name)
    torch.save({**ckpt, "global_step": 7}, tmp_path / "hpc_ckpt_3.ckpt")
    assert newest_checkpoint(ckpt_dir, tmp_path) == ckpt_dir / "a-name-that-sorts-first.ckpt"
    (ckpt_dir / "step00000011.ckpt").write_bytes((ckpt_dir / "step00000002.ckpt").read_bytes()[:1000])
    assert newest_checkpoint(ckpt_dir, tmp_path) == ckpt_dir / "a-name-that-sorts-first.ckpt"
    assert "skipping" in caplog.text and "step00000011.ckpt is not a readable torch file" in caplog.text


def test_a_deepspeed_tag_leaving_its_directory_is_refused(latent_shards, tmp_path, monkeypatch):
    """issue 29.1: `latest` = "../payload" (or a tag directory that is a link) sent DeepSpeed to files
    that were never checked, which it loads with weights_only=False. DeepSpeed refuses the CPU, so
    the check is run through every entry point up to where DeepSpeed would take over."""
    from magitrain import export
    from magitrain.parallel.strategies import DeepSpeedStrategy

    monkeypatch.syspath_prepend(str(REPO))
    import infer

    marker = tmp_path / "PAYLOAD_RAN"
    payload = tmp_path / "payload"
    payload.mkdir()
    torch.save({"module": {"w": torch.ones(2)}, "global_step": 7}, payload / "mp_rank_00_model_states.pt")
    torch.save(
        {"optimizer_state_dict": {"loss_scaler": Payload(marker)}}, payload / "zero_pp_rank_0_optim.pt"
    )
    escaping, linked = tmp_path / "escaping.ckpt", tmp_path / "linked.ckpt"
    escaping.mkdir()
    (escaping / "latest").write_text("../payload")
    linked.mkdir()
    (linked / "latest").write_text("checkpoint")
    (linked / "checkpoint").symlink_to(payload)
    common = ["model=tiny", "codecs=tiny", "prompt=hi", "seconds=0.36", "resolution=64x32"]
    for ds in (escaping, linked):
        refused = f"{ds / 'latest'} names the tag .* not a directory inside"
        with pytest.raises(UnsafeCheckpointError, match=refused):
            train(compose_train([*tiny_run(latent_shards), f"ckpt_path={ds}"], tmp_path / "run"))
        with pytest.raises(UnsafeCheckpointError, match=refused):
            DeepSpeedStrategy(stage=2).load_checkpoint(ds)  # the strategy's own load, before DeepSpeed's
        with pytest.raises(UnsafeCheckpointError, match=refused):
            export.main([str(ds), str(tmp_path / "out")])
        with pytest.raises(UnsafeCheckpointError, match=refused):
            infer.main([f"ckpt={ds}", *common, f"out={tmp_path / 'a.mp4'}"])
    assert not marker.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real 9 MiB file system (tmpfs): room for one tiny-model checkpoint (6 MiB), not two."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9M", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_a_short_error_and_keeps_the_earlier_checkpoint(latent_shards, small_disk, tmp_path):
    """issue 29.13: a disk filling up mid-save ended the run in a 100-line traceback (`unexpected
    pos`), naming neither the folder nor the space left."""
    from magitrain.checkpoint.atomic_io import DiskFullError
    from magitrain.cli import user_message

    ckpt_dir = small_disk / "checkpoints"
    overrides = tiny_run(
        latent_shards,
        "trainer.max_steps=4",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        f"callbacks.model_checkpoint.dirpath={ckpt_dir}",
    )
    with pytest.raises(DiskFullError) as failed:
        train(compose_train(overrides, tmp_path / "run"))
    message = user_message(failed.value)
    assert message.startswith(f"no space left to write checkpoint step00000004.ckpt in {ckpt_dir} (")
    assert "MiB free" in message and len(message.splitlines()) == 1
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "step00000002.ckpt"]  # no .tmp
    assert checkpoint_meta(ckpt_dir / "last.ckpt")["global_step"] == 2
