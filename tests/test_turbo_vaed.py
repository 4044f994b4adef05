"""Turbo-VAED against its facts sheet (/work/shared/TURBO_VAED.md): the released parameter names
and shapes, the layer semantics, the sliding-window plan and its stitching, the de-normalisation
rounding, strict loading of the release's checkpoint layout, and its place in the codecs."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from magitrain.checkpoint import CheckpointMismatchError
from magitrain.codecs import build_tiny_codecs
from magitrain.codecs.pretrained import load_turbo_vaed
from magitrain.codecs.tiny import tiny_turbo_vaed
from magitrain.codecs.turbo_vaed import TurboVAED, TurboVideoDecoder, Upsampler, window_plan
from magitrain.codecs.video import LATENTS_MEAN, LATENTS_STD
from magitrain.errors import UserError

# §1.1: the released JSON, training-only keys included (diffusers must drop them).
RELEASED_JSON = {
    "_class_name": "AutoencoderKLTurboVAED", "_diffusers_version": "0.32.0.dev0", "in_channels": 3,
    "out_channels": 3, "latent_channels": 48, "decoder_block_out_channels": [64, 128, 256, 512],
    "decoder_layers_per_block": [2, 2, 2, 3, 3], "decoder_spatio_temporal_scaling": [False, True, True, True],
    "decoder_spatio_only": [False, True, False, False], "decoder_is_dw_conv": [False] * 5,
    "decoder_dw_kernel_size": 5, "decoder_causal": False, "patch_size": 2, "patch_size_t": 1,
    "use_unpatchify": True, "resnet_norm_eps": 1e-6, "scaling_factor": 1, "spatial_compression_ratio": 16,
    "temporal_compression_ratio": 4, "first_chunk_size": 7, "step_size": 7,
    "aligned_feature_projection_mode": "conv-2layer",
    "aligned_feature_projection_dim": [[512, 1024], [512, 1024]], "aligned_blks_indices": [0, 1],
}  # fmt: skip


def _sheet_shapes() -> dict[str, tuple[int, ...]]:
    """§3's concrete list of the 80 tensors, spelled out from the sheet's table."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, *weight):
        shapes[f"decoder.{name}.weight"], shapes[f"decoder.{name}.bias"] = weight, (weight[0],)

    conv("conv_in.conv", 512, 48, 3, 3, 3)
    for j in range(3):
        conv(f"mid_block.resnets.{j}.conv1.conv", 512, 512, 3, 3, 3)
        conv(f"mid_block.resnets.{j}.conv2.conv", 512, 512, 3, 3, 3)
    conv("up_blocks.0.upsamplers.0.time_conv.conv", 1024, 512, 3, 1, 1)
    conv("up_blocks.0.upsamplers.0.resample.1", 512, 512, 3, 3)
    for j in range(3):
        for k in (1, 2):
            conv(f"up_blocks.0.resnets.{j}.conv{k}.conv", 512, 512, 3, 3, 3)
    for i, (c_in, c_out) in enumerate([(512, 256), (256, 128), (128, 64)], start=1):
        conv(f"up_blocks.{i}.conv_in.conv1.conv", c_out, c_in, 3, 3, 3)
        conv(f"up_blocks.{i}.conv_in.conv2.conv", c_out, c_out, 3, 3, 3)
        conv(f"up_blocks.{i}.conv_in.conv_shortcut.conv", c_out, c_in, 1, 1, 1)
        if i == 1:
            conv("up_blocks.1.upsamplers.0.time_conv.conv", 512, 256, 3, 1, 1)
        if i < 3:
            conv(f"up_blocks.{i}.upsamplers.0.resample.1", c_out, c_out, 3, 3)
        for j in range(2):
            for k in (1, 2):
                conv(f"up_blocks.{i}.resnets.{j}.conv{k}.conv", c_out, c_out, 3, 3, 3)
    conv("conv_out.conv", 12, 64, 3, 3, 3)
    return shapes


def test_released_config_has_the_sheets_parameter_names_and_shapes():
    with torch.device("meta"):
        model = TurboVAED.from_config(RELEASED_JSON)
        default = TurboVAED()
    expected = _sheet_shapes()
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(expected) == 80 and state == expected
    assert {k: tuple(v.shape) for k, v in default.state_dict().items()} == expected  # defaults = release
    assert sum(v.numel() for v in model.state_dict().values()) == 107_122_892  # §3 total
    assert list(model.buffers()) == []  # mean/std are not buffers
    # §1.3 / §2.3: ReLU first in the resnets of up blocks with an upsampler, SiLU elsewhere
    relu = {name for name, m in model.named_modules() if getattr(m, "relu_first", False)}
    assert relu == {
        f"decoder.up_blocks.{i}.resnets.{j}" for i, n in ((0, 3), (1, 2), (2, 2)) for j in range(n)
    }


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("decoder_causal", True, "decoder_causal"),
        ("decoder_is_dw_conv", [True] + [False] * 4, "depthwise"),
        ("use_unpatchify", False, "pixel-shuffle"),
        ("temporal_compression_ratio", 8, "temporal_compression_ratio=8"),
        ("decoder_spatio_only", [False, True], "decoder_spatio_only has 2 entries"),
    ],
)
def test_unsupported_configs_are_refused_by_name(key, value, message):
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        TurboVAED.from_config({**RELEASED_JSON, key: value})


def test_window_plan_follows_the_sheet():
    # §5's worked table: (N, pad, windows [start, end), first flag on window 0 only)
    table = {
        1: (6, [(0, 7)]),
        7: (0, [(0, 7)]),
        8: (6, [(0, 8), (6, 14)]),
        21: (0, [(0, 8), (6, 15), (13, 21)]),
        26: (2, [(0, 8), (6, 15), (13, 22), (20, 28)]),
        32: (3, [(0, 8), (6, 15), (13, 22), (20, 29), (27, 35)]),
    }
    for n, (pad, spans) in table.items():
        got_pad, windows = window_plan(n, 7, 7, 4)
        assert (got_pad, [(w.start, w.end) for w in windows]) == (pad, spans), n
        assert [w.is_first_chunk for w in windows] == [True] + [False] * (len(spans) - 1)
    for n in range(1, 41):  # frames: first window 4T-3, others 4T, minus trims and padding = 4N-3
        pad, windows = window_plan(n, 7, 7, 4)
        frames = sum(
            4 * (w.end - w.start) - 3 * w.is_first_chunk - w.trim_front - w.trim_back for w in windows
        )
        assert frames - 4 * pad == 4 * n - 3


@pytest.fixture(scope="module")
def tiny() -> TurboVAED:
    torch.manual_seed(0)
    return tiny_turbo_vaed().eval()


def latents(n: int, h: int = 2, w: int = 3, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 48, n, h, w, generator=torch.Generator().manual_seed(seed))


def sheet_denormalize(z: torch.Tensor) -> torch.Tensor:
    """§1.4 verbatim: z / (1.0 / std) + mean with fp32 tables, cast back to z's dtype."""
    mean = torch.tensor(LATENTS_MEAN, dtype=torch.float32).view(1, 48, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(LATENTS_STD, dtype=torch.float32).view(1, 48, 1, 1, 1)
    return (z / inv_std + mean).to(z.dtype)


@torch.no_grad()
def test_tiny_config_decodes_the_right_shapes(tiny):
    for n in (1, 2, 7, 8, 9):
        assert tiny.decode(latents(n, 2, 3, batch=2)).shape == (2, 3, 4 * n - 3, 32, 48)
    # one window: a first chunk of T latents gives 4T-3 frames, any other chunk 4T (§4)
    z = latents(3)
    assert tiny.decoder(z, is_first_chunk=True).shape == (1, 3, 9, 32, 48)
    assert tiny.decoder(z, is_first_chunk=False).shape == (1, 3, 12, 32, 48)
    with pytest.raises(ValueError, match=r"\[B, 48, T, h, w\]"):
        tiny.decode(torch.zeros(1, 16, 2, 2, 2))


@torch.no_grad()
def test_sliding_window_equals_a_single_window_when_the_clip_fits(tiny):
    z = latents(7)
    assert torch.equal(tiny.decode(z), tiny.decoder(sheet_denormalize(z), is_first_chunk=True))
    # a shorter clip is padded with its last latent to one 7-frame window, then trimmed
    short = sheet_denormalize(latents(4))
    padded = torch.cat([short, short[:, :, -1:].repeat(1, 1, 3, 1, 1)], dim=2)
    assert torch.equal(tiny.decode(latents(4)), tiny.decoder(padded, is_first_chunk=True)[:, :, :13])


@torch.no_grad()
def test_longer_clips_stitch_windows_as_the_sheet_says(tiny):
    z = sheet_denormalize(latents(15))  # N' = 21: windows [0,8)F, [6,15), [13,21)
    z = torch.cat([z, z[:, :, -1:].repeat(1, 1, 6, 1, 1)], dim=2)
    first = tiny.decoder(z[:, :, 0:8], is_first_chunk=True)[:, :, :-4]
    middle = tiny.decoder(z[:, :, 6:15], is_first_chunk=False)[:, :, 4:-4]
    last = tiny.decoder(z[:, :, 13:21], is_first_chunk=False)[:, :, 4:]
    expected = torch.cat([first, middle, last], dim=2)[:, :, : -6 * 4]
    out = tiny.decode(latents(15))
    assert out.shape[2] == 57 and torch.equal(out, expected)
    # the windows matter: one pass over the whole clip gives other pixels (no state between calls)
    whole = tiny.decoder(sheet_denormalize(latents(15)), is_first_chunk=True)
    assert whole.shape == out.shape and not torch.allclose(whole, out, atol=1e-4)


def test_denormalisation_divides_by_the_fp32_reciprocal():
    with torch.device("meta"):
        model = TurboVAED()
    z32 = latents(4, 8, 8)
    ours = model.denormalize(z32)
    assert ours.dtype == torch.float32 and torch.equal(ours, sheet_denormalize(z32))
    std = torch.tensor(LATENTS_STD).view(1, 48, 1, 1, 1)
    mean = torch.tensor(LATENTS_MEAN).view(1, 48, 1, 1, 1)
    assert not torch.equal(ours, z32 * std + mean)  # the product rounds differently (sheet §1.4)
    # bf16 latents: computed in fp32 (the tables stay fp32), rounded to bf16 once
    z16 = z32.bfloat16()
    ours16 = model.denormalize(z16)
    assert ours16.dtype == torch.bfloat16
    assert torch.equal(ours16, (z16.float() / (1.0 / std) + mean).bfloat16())
    assert not torch.equal(ours16, (z16 / (1.0 / std).bfloat16() + mean.bfloat16()))  # not bf16 tables


@torch.no_grad()
def test_bf16_decoder_keeps_fp32_statistics(tiny):
    # .to(bf16) casts the weights but not the de-normalisation tables; the output is bf16
    model = tiny_turbo_vaed().to(torch.bfloat16)
    model.load_state_dict(tiny.state_dict())
    z = latents(2).bfloat16()
    out = model.decode(z)
    assert out.dtype == torch.bfloat16
    padded = sheet_denormalize(z)
    padded = torch.cat([padded, padded[:, :, -1:].repeat(1, 1, 5, 1, 1)], dim=2)
    assert torch.equal(out, model.decoder(padded, is_first_chunk=True)[:, :, :5])


@torch.no_grad()
def test_temporal_upsampler_interleaves_split_halves_and_drops_frame_0():
    c = 2
    up = Upsampler(c, temporal=True)
    eye = torch.eye(c)
    up.time_conv.conv.weight.zero_()
    up.time_conv.conv.weight[:c, :, 1, 0, 0] = eye  # split 0: the frame itself
    up.time_conv.conv.weight[c:, :, 1, 0, 0] = 2 * eye  # split 1: twice the frame
    up.time_conv.conv.bias.zero_()
    up.resample[1].weight.zero_()
    up.resample[1].weight[:, :, 1, 1] = eye  # identity 2-D conv: leaves the nearest x2
    up.resample[1].bias.zero_()
    x = torch.randn(1, c, 3, 2, 2)
    nearest = x.repeat_interleave(2, -1).repeat_interleave(2, -2)
    out = up(x, is_first_chunk=False)
    assert out.shape == (1, c, 6, 4, 4)
    torch.testing.assert_close(out[:, :, 0::2], nearest)  # frame 2t: split 0 of frame t
    torch.testing.assert_close(out[:, :, 1::2], 2 * nearest)  # frame 2t+1: split 1
    torch.testing.assert_close(up(x, is_first_chunk=True), out[:, :, 1:])


@torch.no_grad()
def test_output_head_unpatchify_reads_width_offset_first(tiny):
    # §2.6: pixel (row 2h+dy, col 2w+dx, colour c) = conv_out channel c*4 + dx*2 + dy
    from magitrain.codecs.turbo_vaed import unpatchify

    x = torch.arange(12 * 2 * 3, dtype=torch.float32).view(1, 12, 1, 2, 3)
    out = unpatchify(x, 2)
    for c, dx, dy, h, w in [(0, 0, 0, 0, 0), (1, 1, 0, 1, 2), (2, 0, 1, 1, 1), (2, 1, 1, 0, 2)]:
        assert out[0, c, 0, 2 * h + dy, 2 * w + dx] == x[0, c * 4 + dx * 2 + dy, 0, h, w]


# ---------------------------------------------------------------- loading


def release_files(model: TurboVAED, folder, *, prefix: str = "module.", edit=None):
    """The release's layout: a JSON config and a .ckpt with ema_state_dict + training extras."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {**RELEASED_JSON, **{k: v for k, v in model.config.items() if not k.startswith("_")}}
    (folder / "TurboV3-Wan22-TinyShallow_7_7.json").write_text(json.dumps(config))
    ema = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    for i in range(2):  # the 8 training-only alignment-head tensors (§6)
        for j, (c_in, c_out) in enumerate([(512, 1024), (1024, 1024)]):
            ema[f"{prefix}aligned_feature_projection_heads.{i}.{j}.conv.weight"] = torch.zeros(
                c_out, c_in, 1, 1, 1
            )
            ema[f"{prefix}aligned_feature_projection_heads.{i}.{j}.conv.bias"] = torch.zeros(c_out)
    if edit:
        edit(ema)
    ckpt = folder / "checkpoint-340000.ckpt"
    torch.save({"current_step": 340000, "state_dict": {}, "ema_state_dict": ema, "optimizer_state": {}}, ckpt)
    return ckpt


@torch.no_grad()
def test_release_checkpoint_loads_strictly(tiny, tmp_path):
    ckpt = release_files(tiny, tmp_path / "turbo_vae")
    loaded = TurboVAED.from_release(ckpt, ckpt.parent / "TurboV3-Wan22-TinyShallow_7_7.json")
    z = latents(9)
    assert torch.equal(loaded.decode(z), tiny.decode(z))
    # without the DDP prefix too; and the codecs loader finds the one JSON beside the .ckpt
    bare = release_files(tiny, tmp_path / "bare", prefix="")
    assert torch.equal(load_turbo_vaed(str(bare), None, torch.float32).decode(z), tiny.decode(z))
    bf16 = load_turbo_vaed(str(ckpt), None, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and not bf16.training


def test_release_checkpoint_errors_name_the_keys(tiny, tmp_path):
    config = tmp_path / "x" / "TurboV3-Wan22-TinyShallow_7_7.json"

    def load(edit):
        ckpt = release_files(tiny, tmp_path / "x", edit=edit)
        return TurboVAED.from_release(ckpt, config)

    with pytest.raises(CheckpointMismatchError, match=r"1 missing: decoder\.conv_out\.conv\.bias"):
        load(lambda sd: sd.pop("module.decoder.conv_out.conv.bias"))
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected: decoder\.norm_out\.weight"):
        load(lambda sd: sd.update({"module.decoder.norm_out.weight": torch.ones(8)}))
    with pytest.raises(CheckpointMismatchError, match=r"wrongly shaped: decoder\.conv_in\.conv\.bias"):
        load(lambda sd: sd.update({"module.decoder.conv_in.conv.bias": torch.ones(7)}))
    torch.save({"state_dict": {}}, tmp_path / "x" / "plain.ckpt")
    with pytest.raises(KeyError, match=r"plain.ckpt has no 'ema_state_dict' \(found \['state_dict'\]\)"):
        TurboVAED.from_release(tmp_path / "x" / "plain.ckpt", config)
    (tmp_path / "x" / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"turbo_vaed_path: .*junk.ckpt is not a loadable torch checkpoint"):
        TurboVAED.from_release(tmp_path / "x" / "junk.ckpt", config)
    with pytest.raises(FileNotFoundError, match="nowhere.json does not exist"):
        TurboVAED.from_release(tmp_path / "x" / "junk.ckpt", tmp_path / "nowhere.json")
    (tmp_path / "x" / "other.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds 2 .json files.*turbo_vaed_config"):
        load_turbo_vaed(str(tmp_path / "x" / "junk.ckpt"), None, torch.float32)
    with pytest.raises(UserError, match="turbo_vaed_path is not set.*codecs.video_decoder=wan"):
        load_turbo_vaed(None, None, torch.float32)


@torch.no_grad()
def test_save_pretrained_folder_round_trips(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "turbo")
    z = latents(8)
    assert torch.equal(TurboVAED.from_pretrained(tmp_path / "turbo").decode(z), tiny.decode(z))
    assert torch.equal(
        load_turbo_vaed(str(tmp_path / "turbo"), None, torch.float32).decode(z), tiny.decode(z)
    )
    with pytest.raises(ValueError, match="turbo_vaed_path: .*_class_name=None"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text("{}")
        load_turbo_vaed(str(tmp_path / "empty"), None, torch.float32)


# ---------------------------------------------------------------- as the codecs' video decoder


@torch.no_grad()
def test_codecs_choose_the_video_decoder():
    wan = build_tiny_codecs(seed=0)
    turbo = instantiate(OmegaConf.merge(OmegaConf.load("conf/codecs/tiny.yaml"), {"video_decoder": "turbo"}))
    assert wan.video_decoder is wan.video and wan.video_decoder_name == "wan"
    assert isinstance(turbo.video_decoder, TurboVideoDecoder) and turbo.video_decoder_name == "turbo"
    # the other codecs are the same weights either way: only the decoder differs
    torch.testing.assert_close(
        turbo.video.encode(torch.zeros(1, 3, 5, 32, 32)), wan.video.encode(torch.zeros(1, 3, 5, 32, 32))
    )
    z = latents(3)
    pixels = turbo.video_decoder.decode(z)
    raw = turbo.video_decoder.model.decode(z)
    assert pixels.shape == wan.video_decoder.decode(z).shape == (1, 3, 9, 32, 48)
    assert pixels.dtype == torch.float32 and torch.equal(pixels, raw.clamp(-1, 1))
    with pytest.raises(ValueError, match="video_decoder must be one of"):
        build_tiny_codecs(video_decoder="vae")
