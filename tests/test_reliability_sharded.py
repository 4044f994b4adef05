"""Directory checkpoints (FSDP2, DeepSpeed) never run code and never block a requeue (issue 29.1, 29.2).

One real two-process FSDP2 run (gloo) saves steps 2 and 4. Crafted copies of its step 4 carry a
pickle whose loading writes a marker file, in a model entry or in the optimiser's `lr`; they go
through the real resume (`train.py`, two processes, `ckpt_path=last`), export and `infer.py`. A
copy whose newest step is a save killed midway resumes from step 2. DeepSpeed needs a GPU, so its
`latest` tag is checked through the same entry points up to where DeepSpeed would take over.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_train, tiny_run
from test_reliability_checkpoints import REFUSED, Payload

from magitrain.checkpoint.export import read_training_checkpoint
from magitrain.checkpoint.resume import checkpoint_meta
from magitrain.checkpoint.safe_load import CorruptCheckpointError, UnsafeCheckpointError
from magitrain.launch import train

pytestmark = pytest.mark.slow


def _train_py(run: Path, shards: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python train.py` of a tiny FSDP2 run over two gloo processes into `run`."""
    args = tiny_run(shards, "trainer.devices=2", "strategy=fsdp2", "data.shuffle=false", *extra)
    args += ["callbacks.model_checkpoint.every_n_train_steps=2", f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def fsdp2_run(latent_shards, tmp_path_factory) -> Path:
    """A finished two-process FSDP2 run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("fsdp2") / "run"
    result = _train_py(run, latent_shards, "trainer.max_steps=4")
    assert result.returncode == 0, result.stderr[-4000:]
    assert (run / "checkpoints" / "step00000004.ckpt" / ".metadata").is_file()
    return run


def _copy_run(fsdp2_run: Path, to: Path) -> Path:
    shutil.copytree(fsdp2_run, to, symlinks=True)
    shutil.rmtree(to / "starts")  # the resume below gives its own command line
    return to


def _plant(ckpt: Path, key: str, marker: Path) -> None:
    """Make the entry `key` of the distributed checkpoint `ckpt` a pickle that writes `marker`:
    the pickle is appended to a shard file and `.metadata` points the entry at it, as bytes."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    metadata = pickle.loads((ckpt / ".metadata").read_bytes())
    assert key in metadata.state_dict_metadata, sorted(metadata.state_dict_metadata)
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    shard = ckpt / "__0_0.distcp"
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload.getvalue())
    for index in [i for i in metadata.storage_data if i.fqn == key]:
        del metadata.storage_data[index]
    info = next(iter(metadata.storage_data.values()))
    metadata.storage_data[MetadataIndex(key)] = dataclasses.replace(
        info, relative_path=shard.name, offset=offset, length=len(payload.getvalue())
    )
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))


def _keys(ckpt: Path, prefix: str, suffix: str = "") -> list[str]:
    metadata = pickle.loads((ckpt / ".metadata").read_bytes())
    return sorted(k for k in metadata.state_dict_metadata if k.startswith(prefix) and k.endswith(suffix))


def test_crafted_fsdp2_entries_never_run_in_resume_export_or_inference(fsdp2_run, latent_shards, tmp_path):
    """A pickle in a model entry or the optimiser's `lr` ran on every rank at `ckpt_path=last`
    (torch's DCP planner unpickles non-tensor entries with weights_only=False), and in export
    and `infer.py` for a network key the metadata declares as bytes."""
    from magitrain import export

    marker = tmp_path / "PAYLOAD_RAN"
    model_run = _copy_run(fsdp2_run, tmp_path / "model_entry")
    ckpt = model_run / "checkpoints" / "step00000004.ckpt"
    key = _keys(ckpt, "state_dict.model.")[0]
    _plant(ckpt, key, marker)
    refused = f"{ckpt} entry {key} {REFUSED}"

    with pytest.raises(UnsafeCheckpointError, match=refused):
        export.main([str(ckpt), str(tmp_path / "out")])
    sys.path.insert(0, str(REPO))
    import infer

    common = ["model=tiny", "codecs=tiny", "prompt=hi", "seconds=0.36", "resolution=64x32"]
    with pytest.raises(UnsafeCheckpointError, match=refused):
        infer.main([f"ckpt={ckpt}", *common, f"out={tmp_path / 'a.mp4'}"])
    result = _train_py(model_run, latent_shards, "trainer.max_steps=6", "ckpt_path=last")
    assert result.returncode != 0 and refused in result.stderr, result.stderr[-3000:]

    optim_run = _copy_run(fsdp2_run, tmp_path / "optim_entry")
    ckpt = optim_run / "checkpoints" / "step00000004.ckpt"
    key = _keys(ckpt, "optimizer_0.param_groups.", ".lr")[0]
    _plant(ckpt, key, marker)
    result = _train_py(optim_run, latent_shards, "trainer.max_steps=6", "ckpt_path=last")
    assert result.returncode != 0 and f"{ckpt} entry {key} {REFUSED}" in result.stderr, result.stderr[-3000:]
    assert not marker.exists()


def test_a_save_killed_midway_and_a_truncated_file_step_back_to_the_previous_checkpoint(
    fsdp2_run, latent_shards, tmp_path, caplog
):
    """A directory checkpoint killed mid-save (only `.distcp` files) or a truncated newest file
    made every later `ckpt_path=last` fail: the requeued job exited 2 and was not requeued again."""
    run = _copy_run(fsdp2_run, tmp_path / "partial")
    newest = run / "checkpoints" / "step00000004.ckpt"
    for name in (".metadata", "meta.pt"):  # what a kill before DCP's and Lightning's last writes leaves
        (newest / name).unlink()
    assert not list((run / "checkpoints").glob("*.partial"))  # the finished run left none
    result = _train_py(run, latent_shards, "trainer.max_steps=4", "ckpt_path=last")
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"ckpt_path=last: skipping {newest}" in result.stdout
    assert f"resuming from {run / 'checkpoints' / 'step00000002.ckpt'}" in result.stdout
    # step 4 again, from step 2 through the weights-only reader: the same as the run straight through
    want, _ = read_training_checkpoint(fsdp2_run / "checkpoints" / "step00000004.ckpt")
    got, _ = read_training_checkpoint(newest)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)

    # a single-file run: the newest file truncated
    single = tmp_path / "single"
    overrides = tiny_run(latent_shards, "callbacks.model_checkpoint.every_n_train_steps=2")
    train(compose_train([*overrides, "trainer.max_steps=4"], single))
    step4 = single / "checkpoints" / "step00000004.ckpt"
    step4.write_bytes(step4.read_bytes()[:2000])
    with pytest.raises(CorruptCheckpointError, match=f"{step4} is not a readable torch file"):
        train(compose_train([*overrides, "trainer.max_steps=5", f"ckpt_path={step4}"], tmp_path / "x"))
    with caplog.at_level(logging.WARNING, logger="magitrain"):
        resumed = train(compose_train([*overrides, "trainer.max_steps=5", "ckpt_path=last"], single))
    assert f"ckpt_path=last: skipping {step4}" in caplog.text
    assert resumed.global_step == 5 and checkpoint_meta(step4)["global_step"] == 4  # trained from step 2
