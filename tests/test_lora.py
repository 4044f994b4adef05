"""LoRA on CPU at tiny size: only adapters train, per-modality adapters in sandwich layers, the small
checkpoint resumes exactly, adapter / merged export, `infer.py lora=`, the fp8 base and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_train, straight_and_resumed, tiny_run
from safetensors import safe_open
from safetensors.torch import save_file

from magitrain.checkpoint import load_official, save_official
from magitrain.errors import UserError
from magitrain.export import main as export_main
from magitrain.launch import train
from magitrain.lora import LoraConfig, LoraFlowMatchingModule, add_adapter, apply_adapters, build_frozen_base
from magitrain.lora.adapters import lora_layers, merge_adapter, read_adapter, set_active
from magitrain.model import MagiHumanDiT, golden_tiny, tiny
from magitrain.model.layout import SequenceLayout

RANK = 4


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_official(MagiHumanDiT(tiny()), tmp_path_factory.mktemp("lora_base") / "base")


def lora_run(shards: Path, init: Path, *extra: str) -> list[str]:
    return tiny_run(
        shards,
        "recipe=lora_base",
        f"init={init}",
        f"module.lora.rank={RANK}",
        "module.optim.lr=1e-2",  # toy steps: adapters visibly move
        *extra,
    )


def inputs(seed: int = 0, text: int = 5):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 48, 3, 4, 6, generator=g),
        torch.randn(1, 9, 64, generator=g),
        torch.randn(1, text, 64, generator=g),
    )


def base_params(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen parameters under their released names."""
    return {
        k.replace(".base_layer.", "."): v
        for k, v in network.state_dict().items()
        if ".lora_A." not in k and ".lora_B." not in k
    }


# ----- training ---------------------------------------------------------------------------------
def test_only_adapters_train_and_the_base_stays_bit_identical(latent_shards, base_ckpt, tmp_path):
    trainer = train(compose_train(lora_run(latent_shards, base_ckpt, "trainer.max_steps=4"), tmp_path))
    module = trainer.lightning_module
    assert trainer.global_step == 4
    model = module.model
    want = base_params(build_frozen_base(tiny(), str(base_ckpt), "bf16"))
    got = base_params(model)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    qkv = model.block.layers[1].attention.linear_qkv
    assert qkv.get_base_layer().weight.dtype == torch.bfloat16  # no float32 copy of the base
    assert not any(p.requires_grad for k, p in model.named_parameters() if ".lora_" not in k)

    trained = {k: p for k, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".default." in k and p.dtype == torch.float32 for k, p in trained.items())
    assert all(float(p.abs().max()) > 0 for k, p in trained.items() if ".lora_B." in k)  # B left zero
    optimizer = trainer.optimizers[0]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trained.values()}
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())

    # EMA: a shadow of the adapters only, stepping behind them
    shadow, live = module.ema_parameters()
    assert len(shadow) == len(live) == len(trained) and module.ema is None
    assert all(not s.requires_grad for s in shadow)
    assert any(not torch.equal(s, p) for s, p in zip(shadow, live, strict=True))

    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(".lora_A." in k or ".lora_B." in k for k in ckpt["state_dict"])
    assert {k.split(".lora_")[1].split(".")[1] for k in ckpt["state_dict"]} == {"default", "ema"}


def test_a_killed_lora_run_resumes_exactly_from_its_small_checkpoint(latent_shards, base_ckpt, tmp_path):
    """20 steps straight == a `train.py` process SIGKILLed after its step-2 checkpoint + a resume."""
    overrides = lora_run(
        latent_shards,
        base_ckpt,
        "trainer.max_steps=20",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.ema.decay=0.9",
    )
    straight, resumed, step2 = straight_and_resumed(overrides, tmp_path)
    small = torch.load(step2, map_location="cpu", weights_only=True)
    base_bytes = sum(
        v.numel() * v.element_size()
        for v in load_official(MagiHumanDiT(tiny()), base_ckpt).state_dict().values()
    )
    adapter_bytes = sum(v.numel() * v.element_size() for v in small["state_dict"].values())
    assert adapter_bytes < 0.2 * base_bytes

    want, got = straight.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert want.keys() == got.keys() and any(".lora_A.ema." in k for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    from test_train_base import step_losses

    straight_losses = step_losses(tmp_path / "straight" / "csv" / "metrics.csv")
    resumed_losses = step_losses(tmp_path / "killed" / "csv_resumed" / "metrics.csv")
    assert sorted(resumed_losses) == list(range(2, 20))
    assert all(resumed_losses[s] == straight_losses[s] for s in resumed_losses)


def test_a_checkpoint_of_other_adapters_or_another_base_is_refused(latent_shards, base_ckpt, tmp_path):
    train(compose_train(lora_run(latent_shards, base_ckpt, "trainer.max_steps=2"), tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    other = lora_run(latent_shards, base_ckpt, "module.lora.targets=[mlp.down_proj]", f"ckpt_path={ckpt}")
    with pytest.raises(UserError, match="missing|unexpected"):
        train(compose_train(other, tmp_path / "b"))
    torch.manual_seed(1)
    other_base = save_official(MagiHumanDiT(tiny()), tmp_path / "other_base")
    with pytest.raises(UserError, match="trained on another base"):
        train(compose_train(lora_run(latent_shards, other_base, f"ckpt_path={ckpt}"), tmp_path / "c"))


# ----- the adapter layer ------------------------------------------------------------------------
def _layer_inputs(network: MagiHumanDiT, n_text: int):
    layout = SequenceLayout(1, 2, 2, 3, 9, n_text)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, layout.seq_len, network.config.hidden_size, generator=g)
    rope = network.adapter.rope(layout.positions("v2"))
    global_mask, local_mask = network._masks(layout, x.device)
    return layout, (x, layout.splits, rope, global_mask, local_mask)


@torch.no_grad()
def _randomise(network: MagiHumanDiT, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    for k, p in network.named_parameters():
        if ".lora_" in k:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("sandwich", ["per_copy", "shared_a"])
def test_sandwich_copies_each_get_their_own_adapter(sandwich):
    torch.manual_seed(0)
    network = build_frozen_base(tiny(), None, "fp32")
    add_adapter(network, LoraConfig(rank=RANK, sandwich=sandwich))
    set_active(network, "default")
    _randomise(network)
    linear = network.block.layers[0].attention.linear_qkv  # a sandwich layer: 3 copies
    out_rows, d = linear.get_base_layer().weight.shape[0] // 3, network.config.hidden_size
    a, b = linear.lora_A["default"].weight, linear.lora_B["default"].weight
    assert tuple(a.shape) == ((3 * RANK, d) if sandwich == "per_copy" else (RANK, d))
    assert tuple(b.shape) == (3 * out_rows, RANK)

    # each modality slice uses its own base copy and its own B (and A): the explicit formula
    splits = (4, 3, 2)
    x = torch.randn(1, sum(splits), d)
    y = linear(x, splits)
    w = linear.get_base_layer().weight
    for c, part in enumerate(x.split(splits, dim=1)):
        a_c = a.chunk(3)[c] if sandwich == "per_copy" else a
        want = part @ w.chunk(3)[c].T + (part @ a_c.T @ b.chunk(3)[c].T) * linear.scaling["default"]
        torch.testing.assert_close(y.split(splits, dim=1)[c], want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_video_copy_adapter_reaches_audio_and_text_only_through_attention():
    torch.manual_seed(0)
    network = build_frozen_base(tiny(), None, "fp32")
    add_adapter(network, LoraConfig(rank=RANK))
    set_active(network, "default")
    _randomise(network)
    layer = network.block.layers[0]  # sandwich
    layout, args = _layer_inputs(network, n_text=0)  # a sequence with no text tokens
    texted, texted_args = _layer_inputs(network, n_text=3)
    nv = layout.splits[0]
    before, before_texted = layer(*args), layer(*texted_args)

    def bump(linear, copy):
        linear.lora_B["default"].weight.chunk(3)[copy].add_(0.5)

    # video copy of the per-token linears (MLP, output projection): only video tokens move
    for linear in (layer.mlp.up_gate_proj, layer.mlp.down_proj, layer.attention.linear_proj):
        bump(linear, 0)
    after, after_texted = layer(*args), layer(*texted_args)
    assert not torch.equal(after[:, :nv], before[:, :nv])
    assert torch.equal(after[:, nv:], before[:, nv:])
    assert torch.equal(after_texted[:, nv:], before_texted[:, nv:])  # audio and text tokens
    # video copy of qkv: audio tokens change too, through attention to the video keys and values
    bump(layer.attention.linear_qkv, 0)
    assert not torch.equal(layer(*args)[:, nv:], after[:, nv:])
    # the text copy of every adapter of the layer changes nothing when there are no text tokens
    before = layer(*args)
    for linear in (
        layer.attention.linear_qkv,
        layer.attention.linear_proj,
        layer.mlp.up_gate_proj,
        layer.mlp.down_proj,
    ):
        bump(linear, 2)
        linear.lora_A["default"].weight.chunk(3)[2].add_(0.5)
    assert torch.equal(layer(*args), before)
    assert not torch.equal(layer(*texted_args)[:, -3:], after_texted[:, -3:])  # but text tokens do


# ----- fp8 base ---------------------------------------------------------------------------------
def test_fp8_base_stores_float8_weights_and_trains_only_adapters(base_ckpt):
    pytest.importorskip("torchao")
    bf16 = build_frozen_base(tiny(), str(base_ckpt), "bf16")
    fp8 = build_frozen_base(tiny(), str(base_ckpt), "fp8")
    weight = fp8.block.layers[0].attention.linear_qkv.weight
    assert weight.qdata.dtype == torch.float8_e4m3fn and tuple(weight.qdata.shape) == tuple(weight.shape)
    for network in (bf16, fp8):
        add_adapter(network, LoraConfig(rank=RANK))
        set_active(network, "default")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v8, a8 = fp8(*inputs())
        v16, a16 = bf16(*inputs())
        loss = v8.square().mean() + a8.square().mean()
    rel = (v8 - v16).norm() / v16.norm()
    assert 0 < rel < 0.1, rel  # fp8 rounding of the weights, nothing worse
    loss.backward()
    grads = {k: p.grad for k, p in fp8.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in k and ".default." in k for k in grads)


# ----- export and inference ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_fp32(latent_shards, base_ckpt, tmp_path_factory):
    """A LoRA run on a float32 base (exact comparisons), its last checkpoint and module."""
    out = tmp_path_factory.mktemp("lora_fp32")
    overrides = lora_run(
        latent_shards, base_ckpt, "module.lora.base_dtype=fp32", "module.lora.sandwich=shared_a"
    )
    trainer = train(compose_train(overrides, out))
    return out / "checkpoints" / "last.ckpt", trainer.lightning_module


def test_the_network_export_of_checkpoint_io_names_the_command_for_a_lora_checkpoint(trained_fp32, tmp_path):
    """Checkpoint I/O imports no recipe (issue 22): the command above it, `python -m magitrain.export`,
    sends LoRA checkpoints to the adapter export; the network export below refuses one, naming the
    command, rather than writing the base with stray adapter tensors."""
    from magitrain.checkpoint.export import export

    ckpt, _ = trained_fp32
    with pytest.raises(UserError, match=r"last.ckpt is a LoRA run's checkpoint: .*magitrain.export"):
        export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_file_has_released_names_and_metadata(trained_fp32, tmp_path):
    ckpt, module = trained_fp32
    export_main([str(ckpt), str(tmp_path / "adapter.safetensors")])
    with safe_open(tmp_path / "adapter.safetensors", framework="pt") as st:
        meta, keys = st.metadata(), set(st.keys())
        a0 = st.get_tensor("block.layers.0.attention.linear_qkv.lora_A.weight")
        b0 = st.get_tensor("block.layers.0.attention.linear_qkv.lora_B.weight")
    assert meta["format"] == "magitrain-lora" and int(meta["rank"]) == RANK and float(meta["alpha"]) == 64.0
    assert meta["sandwich"] == "shared_a" and json.loads(meta["architecture"])["sandwich_layers"] == [0, 3]
    targets = json.loads(meta["targets"])
    assert len(targets) == 16 and keys == {f"{t}.lora_{m}.weight" for t in targets for m in "AB"}
    assert a0.shape == (RANK, 64) and b0.shape == (3 * tiny().qkv_rows, RANK) and a0.dtype == torch.float32
    layer = module.model.block.layers[0].attention.linear_qkv
    assert torch.equal(b0, layer.lora_B["default"].weight)


def test_merged_export_equals_the_model_with_adapters_applied(trained_fp32, base_ckpt, tmp_path):
    ckpt, module = trained_fp32
    export_main([str(ckpt), str(tmp_path / "merged"), "--merge"])
    merged = load_official(MagiHumanDiT(tiny()), tmp_path / "merged").eval()
    base = load_official(MagiHumanDiT(tiny()), base_ckpt).eval()
    with torch.no_grad():
        want, got, plain = module.model.eval()(*inputs()), merged(*inputs()), base(*inputs())
    for w, g, p in zip(want, got, plain, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert (w - p).abs().max() > 1e-3  # the adapter does change the outputs
    # --ema exports the EMA shadow of the adapters
    export_main([str(ckpt), str(tmp_path / "ema.safetensors"), "--ema"])
    export_main([str(ckpt), str(tmp_path / "raw.safetensors")])
    (ema, _, _), (raw, _, _) = (
        read_adapter(tmp_path / "ema.safetensors"),
        read_adapter(tmp_path / "raw.safetensors"),
    )
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in raw)


def _two_adapters(trained_fp32, tmp_path: Path) -> tuple[Path, Path]:
    ckpt, _ = trained_fp32
    first = tmp_path / "first.safetensors"
    export_main([str(ckpt), str(first)])
    tensors, _, _ = read_adapter(first)
    with safe_open(first, framework="pt") as st:
        meta = st.metadata()
    second = tmp_path / "second.safetensors"
    save_file({k: v.flip(0).contiguous() * -0.7 for k, v in tensors.items()}, str(second), metadata=meta)
    return first, second


def test_infer_lora_equals_inference_with_merged_weights(trained_fp32, base_ckpt, tmp_path, monkeypatch):
    first, second = _two_adapters(trained_fp32, tmp_path)
    # several adapters with their own scales == the base with both merged at those scales
    weights = load_official(MagiHumanDiT(tiny()), base_ckpt).state_dict()
    for path, scale in ((first, 0.5), (second, 2.0)):
        tensors, cfg, arch = read_adapter(path)
        merge_adapter(weights, tensors, cfg, arch, scale)
    merged_dir = save_official(weights, tmp_path / "merged")
    from magitrain.inference import load_network

    applied = apply_adapters(load_network(base_ckpt, "tiny"), [str(first), str(second)], [0.5, 2.0]).eval()
    merged = load_network(merged_dir, "tiny").eval()
    with torch.no_grad():
        for a, m in zip(applied(*inputs()), merged(*inputs()), strict=True):
            torch.testing.assert_close(a, m, rtol=1e-5, atol=1e-5)

    # infer.py end to end: lora= at load time vs the merged checkpoint. The clips are compared
    # before mp4 encoding: x264 turns a one-level pixel change into larger, unrelated differences.
    import infer
    from magitrain.inference.pipeline import Generation

    clips = []
    monkeypatch.setattr(Generation, "save", lambda self, path: clips.append(self) or Path(path))
    common = ["model=tiny", "codecs=tiny", "prompt=A man says hello", "seconds=0.32", "resolution=64x32"]
    infer.main([f"ckpt={base_ckpt}", f"lora=[{first},{second}]", "lora_scale=[0.5,2.0]", *common])
    infer.main([f"ckpt={merged_dir}", *common])
    infer.main([f"ckpt={base_ckpt}", *common])
    (lora, merged, base) = clips
    assert lora.video.shape == (3, 9, 32, 64)
    torch.testing.assert_close(lora.video, merged.video, rtol=0, atol=1e-4)
    torch.testing.assert_close(lora.audio, merged.audio, rtol=0, atol=1e-4)
    assert (lora.video - base.video).abs().max() > 1e-2  # the adapters do change the clip


# ----- bad input --------------------------------------------------------------------------------
def test_targets_and_layers_that_match_nothing_are_named():
    network = build_frozen_base(tiny(), None, "fp32")
    with pytest.raises(UserError, match="'mlp.gate_proj' matches no linear"):
        add_adapter(network, LoraConfig(targets=["attention.linear_qkv", "mlp.gate_proj"]))
    with pytest.raises(UserError, match=r"matches no linear"):
        add_adapter(network, LoraConfig(targets=[r"block\.layers\.9\..*"]))
    with pytest.raises(UserError, match=r"indices \[7\] are outside"):
        add_adapter(network, LoraConfig(layers="0-1,7"))
    with pytest.raises(UserError, match="lora.sandwich"):
        LoraConfig(sandwich="stacked")
    # a layer range and a pattern choose exactly their linears
    targets = add_adapter(network, LoraConfig(targets=[r".*\.mlp\..*"], layers=[1, 2]))
    assert targets == [f"block.layers.{i}.mlp.{n}" for i in (1, 2) for n in ("up_gate_proj", "down_proj")]
    assert set(lora_layers(network)) == set(targets)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rank", "abc", "lora.rank must be an integer, got 'abc'"),
        ("rank", 2.5, "lora.rank must be an integer, got 2.5"),
        ("rank", True, "lora.rank must be an integer"),
        ("alpha", "big", "lora.alpha must be a number"),
        ("dropout", 1.5, r"lora.dropout must be in \[0, 1\)"),
        ("layers", "a-b", "lora.layers: 'a-b' is neither an index nor a range"),
        ("layers", [0, "x"], r"lora.layers\[1\] must be an integer, got 'x'"),
        ("layers", [], "lora.layers is empty"),
        ("layers", "3-1", "lora.layers: the range '3-1' is empty"),
        ("layers", " , ", "names no layer"),
        ("layers", 1.5, r"lora.layers\[0\] must be an integer, got 1.5"),
        ("targets", ["linear_(qkv"], "'linear_\\(qkv' is not a valid regular expression"),
    ],
)
def test_bad_lora_config_values_are_named(field, value, message):
    network = build_frozen_base(tiny(), None, "fp32")
    with pytest.raises(UserError, match=message):
        add_adapter(network, LoraConfig(**{field: value}))


def test_adapter_files_for_another_architecture_or_rank_are_refused(trained_fp32, base_ckpt, tmp_path):
    import infer

    ckpt, _ = trained_fp32
    adapter = tmp_path / "adapter.safetensors"
    export_main([str(ckpt), str(adapter)])
    torch.manual_seed(0)
    with pytest.raises(UserError, match="another architecture: its num_layers is 4, the network's is 8"):
        apply_adapters(MagiHumanDiT(golden_tiny()), str(adapter), 1.0)
    # continuing training from an adapter with another rank
    module = LoraFlowMatchingModule(
        model=tiny(), init=str(base_ckpt), lora=LoraConfig(rank=8, sandwich="shared_a", init=str(adapter))
    )
    with pytest.raises(UserError, match=r"lora.init=.* rank=4, this run has 8"):
        module.build_lora_networks()
    # a file whose metadata rank does not match its tensors
    tensors, _, _ = read_adapter(adapter)
    with safe_open(adapter, framework="pt") as st:
        meta = {**st.metadata(), "rank": "2"}
    bad = tmp_path / "bad_rank.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(UserError, match=r"bad_rank.safetensors \(rank 2\).*wrongly shaped"):
        apply_adapters(MagiHumanDiT(tiny()), str(bad), 1.0)
    with pytest.raises(UserError, match="not a magitrain LoRA adapter"):
        apply_adapters(MagiHumanDiT(tiny()), str(base_ckpt / "model-00001-of-00001.safetensors"), 1.0)
    common = [f"ckpt={base_ckpt}", "model=tiny", "codecs=tiny", "prompt=hi", f"out={tmp_path / 'x.mp4'}"]
    for scale in ("strong", "[1.0,2.0]", "true"):
        with pytest.raises(UserError, match="lora_scale"):
            infer.main([*common, f"lora={adapter}", f"lora_scale={scale}"])
    with pytest.raises(UserError, match="lora=.*no such adapter file"):
        infer.main([*common, f"lora={tmp_path / 'missing.safetensors'}"])


def test_merge_of_a_run_without_init_asks_for_the_base(latent_shards, tmp_path):
    overrides = lora_run(latent_shards, "null", "trainer.max_steps=1", "callbacks.ema=null")
    train(compose_train(overrides, tmp_path))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match="--base PATH"):
        export_main([str(ckpt), str(tmp_path / "m"), "--merge"])
    with pytest.raises(UserError, match="no EMA adapter weights"):
        export_main([str(ckpt), str(tmp_path / "e.safetensors"), "--ema"])


@pytest.mark.gpu
@pytest.mark.parametrize("base_dtype", ["bf16", "fp8"])
def test_lora_step_memory_on_gpu(base_dtype):
    """One 256p 5 s LoRA step of the 15B model (random base, r=64, checkpointing): peak memory."""
    from magitrain.model import magihuman_15b

    torch.cuda.reset_peak_memory_stats()
    network = build_frozen_base(magihuman_15b(activation_checkpointing=True), None, base_dtype, "cuda")
    add_adapter(network, LoraConfig(rank=64))
    add_adapter(network, LoraConfig(rank=64), "ema")
    set_active(network, "default")
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    g = torch.Generator("cuda").manual_seed(0)
    video = torch.randn(1, 48, 32, 16, 28, device="cuda", generator=g)  # 448x256, 5 s
    audio = torch.randn(1, 126, 64, device="cuda", generator=g)
    text = torch.randn(1, 100, 3584, device="cuda", generator=g)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            v, a = network(video, audio, text)
            loss = v.float().square().mean() + a.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"LoRA r=64 {base_dtype} base, 256p 5 s step: peak {peak:.1f} GiB")
    assert peak < (46 if base_dtype == "bf16" else 30)


@pytest.mark.slow
def test_lora_under_ddp_matches_one_process(tmp_path):
    """Two gloo DDP ranks with batches of 2 == one process with the batch of 4: losses and adapters."""
    from test_train_base import step_losses
    from test_train_distributed import run_train

    from magitrain.data.synthetic import make_latent_dataset

    shards = tmp_path / "four"
    make_latent_dataset(shards, num_samples=4, per_shard=2, latent_shapes=((3, 4, 6),), text_dim=64)
    torch.manual_seed(5)
    save_official(MagiHumanDiT(tiny()), shards / "init")
    lora = (
        "recipe=lora_base",
        f"module.lora.rank={RANK}",
        "module.lora.base_dtype=fp32",
        "module.optim.lr=1e-2",
    )
    run_train(tmp_path / "one", shards, devices=1, strategy="auto", batch_size=4, extra=lora)
    run_train(tmp_path / "ddp", shards, devices=2, strategy="ddp", batch_size=2, extra=lora)
    want, got = (step_losses(tmp_path / run / "csv" / "metrics.csv") for run in ("one", "ddp"))
    assert sorted(got) == [0, 1] and all(got[s] == pytest.approx(want[s], rel=1e-5) for s in want)
    one, ddp = (
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for run in ("one", "ddp")
    )
    assert one.keys() == ddp.keys() and all(".lora_" in k for k in one)
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(float(one[k].abs().max()) > 0 for k in one if ".lora_B.default." in k)


def test_activation_checkpointing_gives_the_same_adapters(latent_shards, base_ckpt, tmp_path):
    runs = {}
    for ac in ("false", "true"):
        extra = ("module.lora.base_dtype=fp32", f"module.parallel.activation_checkpointing={ac}")
        trainer = train(compose_train(lora_run(latent_shards, base_ckpt, *extra), tmp_path / ac))
        assert trainer.lightning_module.model.activation_checkpointing == (ac == "true")
        runs[ac] = {k: v for k, v in trainer.lightning_module.state_dict().items() if ".lora_" in k}
    for k in runs["false"]:
        torch.testing.assert_close(runs["true"][k], runs["false"][k], rtol=1e-6, atol=1e-7, msg=k)


def test_an_fp8_base_run_saves_a_small_checkpoint_and_resumes(latent_shards, base_ckpt, tmp_path):
    """The checkpoint callbacks see (NonFiniteGuard scans) holds the adapters only, never float8 weights."""
    pytest.importorskip("torchao")
    overrides = lora_run(latent_shards, base_ckpt, "module.lora.base_dtype=fp8", "trainer.max_steps=2")
    train(compose_train(overrides, tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    resumed = lora_run(
        latent_shards, base_ckpt, "module.lora.base_dtype=fp8", "trainer.max_steps=3", f"ckpt_path={ckpt}"
    )
    trainer = train(compose_train(resumed, tmp_path / "b"))
    assert trainer.global_step == 3
    got = trainer.lightning_module.state_dict()
    assert got.keys() == saved.keys()


@pytest.mark.parametrize(("strategy", "message"), [("fsdp2", "FSDP2"), ("deepspeed_zero2", "DeepSpeed")])
def test_sharding_strategies_are_refused_for_lora(strategy, message, base_ckpt, tmp_path):
    """The docs promise one device or ddp: FSDP2 and any DeepSpeed stage are refused by name."""
    from hydra.utils import instantiate

    from magitrain.launch import build_strategy

    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    cfg = compose_train(
        ["recipe=lora_base", "model=tiny", f"init={base_ckpt}", f"strategy={strategy}"], tmp_path
    )
    try:
        built = build_strategy(cfg.strategy)
    except Exception as err:  # noqa: BLE001 - some versions refuse a CPU-only machine here
        pytest.skip(f"strategy={strategy} cannot be built here: {err}")
    module = instantiate(cfg.module)

    class _Trainer:  # check_lora_strategy only reads the strategy
        pass

    module._trainer = _Trainer()
    module._trainer.strategy = built
    with pytest.raises(UserError, match=rf"one device or with strategy=ddp.*{message}"):
        module.build_lora_networks()


@torch.no_grad()
def random_adapter(path: Path, config, sandwich: str = "per_copy", seed: int = 3) -> Path:
    """An adapter file of random (nonzero) weights for a network of `config`."""
    from magitrain.lora.adapters import adapter_tensors, metadata, save_adapter

    network = build_frozen_base(config, None, "fp32")
    cfg = LoraConfig(rank=RANK, sandwich=sandwich, targets=["attention.linear_qkv", "mlp.down_proj"])
    targets = add_adapter(network, cfg)
    _randomise(network, seed)
    return save_adapter(
        path, adapter_tensors(network.state_dict(), "default"), metadata(cfg, config, targets)
    )


@torch.no_grad()
def test_per_copy_and_shared_a_adapters_mix_and_equal_their_merge(tmp_path):
    """`infer.py lora=a,b` with one adapter of each sandwich mode == the base with both merged."""
    torch.manual_seed(0)
    base = MagiHumanDiT(tiny())
    released = {k: v.clone() for k, v in base.state_dict().items()}
    files = [
        random_adapter(tmp_path / f"{mode}.safetensors", tiny(), mode, 3 + i)
        for i, mode in enumerate(("shared_a", "per_copy"))
    ]
    scales = [1.0, 0.5]
    applied = build_frozen_base(tiny(), None, "fp32")
    applied.load_state_dict(released)
    apply_adapters(applied, [str(f) for f in files], scales)
    for file, scale in zip(files, scales, strict=True):
        merge_adapter(released, *read_adapter(file), scale)
    merged = MagiHumanDiT(tiny())
    merged.load_state_dict(released)
    want, got = merged(*inputs()), applied(*inputs())
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    assert (want[0] - base(*inputs())[0]).abs().max() > 1e-3  # the adapters do change the output


def test_an_sr_adapter_on_the_base_network_and_vice_versa_is_refused(tmp_path):
    """SR540 has the base's shapes: only coords_style tells their adapters apart."""
    base_adapter = random_adapter(tmp_path / "base.safetensors", tiny())
    sr_adapter = random_adapter(tmp_path / "sr.safetensors", tiny(coords_style="v1"))
    with pytest.raises(
        UserError, match=r"sr.safetensors is an adapter for an SR network, not for the base network"
    ):
        apply_adapters(MagiHumanDiT(tiny()), str(sr_adapter), 1.0)
    with pytest.raises(
        UserError, match=r"base.safetensors is an adapter for the base network, not for an SR"
    ):
        apply_adapters(MagiHumanDiT(tiny(coords_style="v1")), str(base_adapter), 1.0)
    apply_adapters(MagiHumanDiT(tiny(coords_style="v1")), str(sr_adapter), 1.0)  # its own network takes it


def test_a_lora_training_checkpoint_as_ckpt_asks_for_an_exported_adapter(trained_fp32, tmp_path):
    import infer

    ckpt, _ = trained_fp32
    common = ["model=tiny", "codecs=tiny", "prompt=hi", f"out={tmp_path / 'x.mp4'}"]
    with pytest.raises(UserError, match=r"ckpt=.*last.ckpt is a LoRA training checkpoint.*export.*lora="):
        infer.main([f"ckpt={ckpt}", *common])


def test_merge_keeps_the_bases_stored_dtype_by_default(trained_fp32, tmp_path):
    """`--merge` without --dtype writes the block linears in the base's dtype (bf16 as released)."""
    from magitrain.checkpoint.official import BLOCK_LINEAR

    ckpt, _ = trained_fp32
    torch.manual_seed(0)
    bf16_base = save_official(MagiHumanDiT(tiny()), tmp_path / "bf16_base", dtype=torch.bfloat16)
    for out, extra in (("merged", []), ("wide", ["--dtype", "fp32"])):
        export_main([str(ckpt), str(tmp_path / out), "--merge", "--base", str(bf16_base), *extra])
    with (
        safe_open(tmp_path / "merged" / "model-00001-of-00001.safetensors", framework="pt") as st,
        safe_open(tmp_path / "wide" / "model-00001-of-00001.safetensors", framework="pt") as wide,
    ):
        assert any(BLOCK_LINEAR.fullmatch(k) for k in st.keys())
        for k in st.keys():
            got = st.get_tensor(k)
            assert got.dtype == (torch.bfloat16 if BLOCK_LINEAR.fullmatch(k) else torch.float32), k
            # the merge adds in float32, then rounds once to the stored dtype
            assert torch.equal(got, wide.get_tensor(k).to(got.dtype)), k
