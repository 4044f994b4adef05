"""Released checkpoint layout: sharded round trip, dtype conversion, strict loading with named errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from magitrain.checkpoint import CheckpointMismatchError, load_official, save_official
from magitrain.model import MagiHumanDiT, golden_tiny, tiny


def _same_weights(a, b):
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_sharded_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MagiHumanDiT(tiny())
    out = save_official(model, tmp_path / "ckpt", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded = load_official(MagiHumanDiT(tiny()), out)
    assert _same_weights(model, loaded)


def test_bf16_export_converts_floats_but_keeps_rope_bands(tmp_path):
    torch.manual_seed(0)
    model = MagiHumanDiT(tiny())
    out = save_official(model, tmp_path / "bf16", dtype=torch.bfloat16)
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors |= load_file(f)
    assert tensors["block.layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert tensors["adapter.rope.bands"].dtype == torch.float32
    reloaded = load_official(MagiHumanDiT(tiny()), out)  # converted back to the model's float32
    w = reloaded.block.layers[1].mlp.down_proj.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, model.block.layers[1].mlp.down_proj.weight.detach().bfloat16().float())


def test_single_file_and_meta_model(golden_dir):
    with torch.device("meta"):
        model = MagiHumanDiT(golden_tiny())
    load_official(model, golden_dir / "weights_tiny.safetensors")
    ref = load_file(golden_dir / "weights_tiny.safetensors")
    assert all(not p.is_meta for p in model.parameters())
    qkv = model.block.layers[0].attention.linear_qkv.weight
    assert qkv.dtype == torch.float32 and torch.equal(
        qkv, ref["block.layers.0.attention.linear_qkv.weight"].float()
    )


def test_strict_load_names_missing_unexpected_and_misshaped_keys(tmp_path):
    torch.manual_seed(0)
    state = MagiHumanDiT(tiny()).state_dict()
    del state["final_linear_audio.weight"]
    state["block.layers.99.mlp.extra.weight"] = torch.zeros(3)
    state["adapter.video_embedder.weight"] = torch.zeros(5, 5)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_official(MagiHumanDiT(tiny()), tmp_path)
    msg = str(err.value)
    assert "1 missing: final_linear_audio.weight" in msg
    assert "1 unexpected: block.layers.99.mlp.extra.weight" in msg
    assert "1 wrongly shaped: adapter.video_embedder.weight (checkpoint [5, 5], model [64, 192])" in msg


def test_mismatch_lists_a_few_keys_with_counts(tmp_path):
    save_official(MagiHumanDiT(tiny()), tmp_path / "small")
    with pytest.raises(CheckpointMismatchError, match=r"\d+ wrongly shaped: .*, \.\.\."):
        load_official(MagiHumanDiT(golden_tiny()), tmp_path / "small")


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_official(MagiHumanDiT(tiny()), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors.index.json"):
        load_official(MagiHumanDiT(tiny()), tmp_path / "empty")
    out = save_official(MagiHumanDiT(tiny()), tmp_path / "ckpt", max_shard_size="40KB")
    next(out.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        load_official(MagiHumanDiT(tiny()), out)


def test_an_index_pointing_outside_its_folder_is_refused(tmp_path):
    """issue 29.11: a released index whose weight_map names `../x` or `/abs/x` was loaded from there."""
    out = save_official(MagiHumanDiT(tiny()), tmp_path / "ckpt", max_shard_size="40KB")
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name, shard = next(iter(index["weight_map"].items()))
    (tmp_path / shard).write_bytes((out / shard).read_bytes())  # the same shard, outside the folder
    for outside in (f"../{shard}", str(tmp_path / shard)):
        index["weight_map"][name] = outside
        index_file.write_text(json.dumps(index))
        with pytest.raises(CheckpointMismatchError, match=f"weight_map.*{name}.*points outside"):
            load_official(MagiHumanDiT(tiny()), out)


def test_bf16_export_uses_the_release_dtype_of_every_tensor(golden_dir, tmp_path):
    """Block linears in bf16, norms / embedders / heads / RoPE in float32: the released tiny table."""
    from safetensors import safe_open

    with safe_open(golden_dir / "weights_tiny.safetensors", framework="pt") as f:
        released = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {"BF16", "F32"} <= set(released.values())
    model = load_official(MagiHumanDiT(golden_tiny()), golden_dir / "weights_tiny.safetensors")
    out = save_official(model, tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size="100KB")
    ours = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            ours |= {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert ours == released


def test_export_writes_the_architecture_and_infer_needs_no_model(tmp_path):
    """A tiny training checkpoint exported, then `infer.py ckpt=EXPORT` without `model=`."""
    import dataclasses
    import stat

    import infer
    from magitrain.checkpoint.export import export
    from magitrain.checkpoint.official import read_config

    torch.manual_seed(0)
    config = tiny(coords_style="v1")
    state = {f"model.{k}": v for k, v in MagiHumanDiT(config).state_dict().items()}
    torch.save(
        {"state_dict": state, "hyper_parameters": {"model": dataclasses.asdict(config)}},
        tmp_path / "run.ckpt",
    )
    previous = os.umask(0o027)  # a known umask for this process
    try:
        out = export(tmp_path / "run.ckpt", tmp_path / "export", dtype="bf16")
    finally:
        os.umask(previous)
    assert read_config(out) == config.replace(activation_checkpointing=False)
    for shard in out.glob("*.safetensors"):
        assert stat.S_IMODE(shard.stat().st_mode) == 0o640  # the user's umask, not safetensors' 0600
    clip = tmp_path / "clip.mp4"
    infer.main(
        [f"ckpt={out}", "codecs=tiny", "prompt=hello", "seconds=0.32", "resolution=64x32", f"out={clip}"]
    )
    assert clip.stat().st_size > 0
    (out / "config.json").unlink()  # a folder without it: the preset decides (magihuman_15b here)
    with pytest.raises(CheckpointMismatchError, match="missing"):
        infer.main([f"ckpt={out}", "codecs=tiny", "prompt=hello", f"out={clip}"])


def test_config_json_with_an_unknown_field_is_named(tmp_path):
    from magitrain.checkpoint.official import read_config

    out = save_official(MagiHumanDiT(tiny()), tmp_path / "ckpt")
    text = (out / "config.json").read_text().replace('"head_dim"', '"head_size"')
    (out / "config.json").write_text(text)
    with pytest.raises(
        ValueError, match=r"config.json has fields MagiHumanConfig does not know: \['head_size'\]"
    ):
        read_config(out)
