"""Codecs with tiny random instances of the real library classes: shapes, strides, rates, the
normalisation, the audio alignment rule, text lengths/padding, offline loading and its errors."""

import json
import shutil

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import T5GemmaConfig, T5GemmaForConditionalGeneration

from magitrain.codecs import AudioCodec, Codecs, build_codecs, build_tiny_codecs, num_latent_frames
from magitrain.codecs.tiny import TINY_TEXT_WIDTH, tiny_audio_vae, tiny_tokenizer
from magitrain.codecs.video import LATENTS_MEAN, LATENTS_STD

SR = 51200  # the audio VAE's own rate: no resampling, 2048 samples per latent frame


@pytest.fixture(scope="module")
def codecs() -> Codecs:
    return build_tiny_codecs(seed=0)


def pixels(frames: int, height: int = 32, width: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1


# ---------------------------------------------------------------- video


def test_video_strides_4x16x16(codecs):
    x = pixels(9)
    latents = codecs.video.encode(x)
    assert latents.shape == (1, 48, 3, 2, 3) and latents.dtype == torch.float32
    assert codecs.video.decode(latents).shape == (1, 3, 9, 32, 48)
    image = codecs.video.encode_image(x[:, :, 0])
    assert image.shape == (1, 48, 1, 2, 3)
    # a 1-frame clip IS the first latent frame: the VAE is causal in time
    torch.testing.assert_close(image[:, :, 0], latents[:, :, 0])


def test_video_normalisation_round_trip(codecs):
    vae, x = codecs.video.vae, pixels(5)
    raw = vae.encode(x).latent_dist.mode()
    mean, std = (
        torch.tensor(LATENTS_MEAN).view(1, 48, 1, 1, 1),
        torch.tensor(LATENTS_STD).view(1, 48, 1, 1, 1),
    )
    latents = codecs.video.encode(x)
    torch.testing.assert_close(latents, (raw - mean) / std)
    torch.testing.assert_close(latents * std + mean, raw)
    torch.testing.assert_close(codecs.video.decode(latents), vae.decode(raw).sample, atol=1e-5, rtol=0)


def test_video_posterior_sampling(codecs):
    x = pixels(1)
    a = codecs.video.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    b = codecs.video.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, codecs.video.encode(x))


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 3, 8, 32, 48), "F=8 is not 4k\\+1"),
        ((1, 3, 9, 40, 48), "height 40 and width 48 must be multiples of 16"),
        ((1, 3, 9, 32, 56), "multiples of 16"),
        ((1, 4, 9, 32, 48), r"\[B, 3, F, H, W\]"),
        ((3, 9, 32, 48), r"\[B, 3, F, H, W\]"),
    ],
)
def test_video_shape_errors(codecs, shape, message):
    with pytest.raises(ValueError, match=message):
        codecs.video.encode(torch.zeros(shape))


def test_video_range_error(codecs):
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        codecs.video.encode(torch.full((1, 3, 1, 32, 32), 255.0))
    with pytest.raises(ValueError, match=r"\[B, 48, T, h, w\]"):
        codecs.video.decode(torch.zeros(1, 16, 2, 2, 2))


def test_video_tiled_decode(codecs):
    latents = torch.randn(1, 48, 2, 6, 10, generator=torch.Generator().manual_seed(0))
    full = codecs.video.decode(latents)
    codecs.video.decode_tile = 64
    try:
        tiled = codecs.video.decode(latents)
    finally:
        codecs.video.decode_tile = None
    assert tiled.shape == full.shape == (1, 3, 5, 96, 160)
    # overlapping tiles blend to an approximation of the full decode (random weights: loose bound;
    # misplaced or unblended tiles would be uncorrelated)
    assert not torch.equal(tiled, full)
    assert torch.corrcoef(torch.stack([full.flatten(), tiled.flatten()]))[0, 1] > 0.6


# ---------------------------------------------------------------- audio


def test_audio_frame_count_rule():
    assert num_latent_frames(5.0) == 126
    assert num_latent_frames(125 / 25) == 126
    assert num_latent_frames(1.0) == 26
    assert num_latent_frames(5.015) == 126  # AAC codec delay does not add a frame


def test_audio_five_seconds_gives_126_frames(codecs):
    wave = 0.1 * torch.randn(1, 2, 5 * 44100, generator=torch.Generator().manual_seed(0))
    latents = codecs.audio.encode(wave, 44100)
    assert latents.shape == (1, 126, 64) and latents.dtype == torch.float32


def test_audio_decodes_to_44k1(codecs):
    latents = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
    audio, rate = codecs.audio.decode(latents)
    # 6 frames * 2048 samples "at 51.2 kHz" = 0.24 s = 6 * 1764 samples at 44.1 kHz
    assert rate == 44100 and audio.shape == (1, 2, 6 * 1764) and audio.abs().max() <= 1
    raw = codecs.audio.vae.decode(latents.transpose(1, 2)).sample
    assert raw.shape == (1, 2, 6 * 2048)


def test_audio_pads_with_silence_to_whole_frames(codecs):
    vae = codecs.audio.vae
    wave = 0.1 * torch.randn(1, 1, SR // 5, generator=torch.Generator().manual_seed(0))  # 0.2 s
    latents = codecs.audio.encode(wave, SR)
    assert latents.shape == (1, 6, 64)
    # the rule, spelled out: mono, duplicated to stereo, zero-padded to 6 * 2048 samples
    padded = torch.nn.functional.pad(wave, (0, 6 * 2048 - wave.shape[-1])).expand(1, 2, -1)
    torch.testing.assert_close(latents, vae.encode(padded).latent_dist.mode().transpose(1, 2))
    # num_frames forces the count (trims or pads) to match a clip's video frames
    assert codecs.audio.encode(wave, SR, num_frames=4).shape == (1, 4, 64)
    assert codecs.audio.encode(wave, SR, num_frames=9).shape == (1, 9, 64)


def test_audio_mono_mix_and_resampling(codecs):
    g = torch.Generator().manual_seed(0)
    left, right = 0.1 * torch.randn(2, 1, 1, 8820, generator=g)  # 0.2 s at 44.1 kHz
    stereo = codecs.audio.encode(torch.cat([left, right], 1), 44100)
    mono = codecs.audio.encode((left + right) / 2, 44100)
    torch.testing.assert_close(stereo, mono)
    assert stereo.shape == (1, 6, 64)


def test_audio_windows_cross_fade():
    vae = tiny_audio_vae()
    windowed = AudioCodec(vae, window_seconds=0.16)  # 4 frames per window, hop 2
    single = AudioCodec(vae, window_seconds=29.0)
    wave = 0.1 * torch.randn(1, 1, 7 * 2048, generator=torch.Generator().manual_seed(0))
    z = windowed.encode(wave, SR, num_frames=7)  # windows start at frames 0, 2, 3
    assert z.shape == (1, 7, 64)
    chunk = lambda a, b: single.encode(wave[..., a * 2048 : b * 2048], SR, num_frames=b - a)
    first, second, last = chunk(0, 4), chunk(2, 6), chunk(3, 7)
    torch.testing.assert_close(z[:, :2], first[:, :2])  # before any overlap: window 0 alone
    torch.testing.assert_close(z[:, 6:], last[:, 3:])  # after the last overlap: last window alone
    # window weights ramp linearly over the overlap (window 0: 1, 1, 1, 1/2 with no fade-in at the
    # clip start; window 1: 1/2, 1, 1, 1/2) and the latents are their weighted mean
    torch.testing.assert_close(z[:, 2], (first[:, 2] + second[:, 0] / 2) / 1.5)
    # clips that fit one window are encoded in one pass
    torch.testing.assert_close(windowed.encode(wave[..., : 4 * 2048], SR, num_frames=4), first)


def test_audio_shape_errors(codecs):
    with pytest.raises(ValueError, match=r"\[B, C, S\]"):
        codecs.audio.encode(torch.zeros(2, 100), SR)
    with pytest.raises(ValueError, match=r"\[B, N, 64\]"):
        codecs.audio.decode(torch.zeros(1, 64, 10))


# ---------------------------------------------------------------- text


def test_text_lengths_and_padding(codecs):
    text = codecs.text
    emb, lengths = text.encode(["a cat", "a dog barks at the mailman", ""])
    assert lengths.tolist() == [6, 27, 1]  # one token per byte + <bos>
    assert emb.shape == (3, 27, TINY_TEXT_WIDTH)
    assert emb[0, 6:].abs().max() == 0 and emb[2, 1:].abs().max() == 0
    assert emb[0, :6].abs().sum(-1).gt(0).all()  # real tokens are not zeroed
    alone, n = text.encode(["a cat"])
    assert n.tolist() == [6] and alone.shape == (1, 6, TINY_TEXT_WIDTH)
    torch.testing.assert_close(alone[0], emb[0, :6], atol=1e-5, rtol=1e-5)  # padding is masked


@pytest.mark.parametrize("side", ["left", "right"])
def test_text_batch_rows_equal_prompts_alone_whatever_the_padding_side(codecs, side):
    """A batch row is its prompt encoded alone (the release encodes one at a time), never zero rows.
    Caught: a left-padding tokenizer (Gemma's may pad left) made every shorter prompt's rows all
    zero (mask-multiply + first-rows trim)."""
    text = codecs.text
    prompts = ["a cat", "a dog barks at the mailman", "", "mid length prompt"]
    alone = [text.encode([p]) for p in prompts]
    text.tokenizer.padding_side = side
    try:
        emb, lengths = text.encode(prompts)
    finally:
        text.tokenizer.padding_side = "right"
    assert lengths.tolist() == [int(n) for _, n in alone]
    for row, (ref, n) in zip(emb, alone, strict=True):
        n = int(n)
        assert row[:n].abs().sum(-1).gt(0).all(), "a real token encoded to a zero row"
        torch.testing.assert_close(row[:n], ref[0], atol=1e-4, rtol=1e-4)
        assert not row[n:].any()


def test_text_micro_batches_match_one_batch(codecs):
    prompts = ["short", "a much longer prompt than the first", "mid length"]
    text = codecs.text
    full, n_full = text.encode(prompts)
    text.batch_size = 1
    try:
        split, n_split = text.encode(prompts)
    finally:
        text.batch_size = 8
    assert torch.equal(n_full, n_split)
    torch.testing.assert_close(split, full, atol=1e-5, rtol=1e-5)


def test_text_trims_to_640_tokens(codecs):
    emb, lengths = codecs.text.encode(["x" * 1000, "short"])
    assert emb.shape == (2, 640, TINY_TEXT_WIDTH) and lengths.tolist() == [640, 6]


def test_text_negative_prompt(codecs):
    emb, lengths = codecs.text.encode_negative(batch_size=2)
    ref, n = codecs.text.encode([codecs.text.negative_prompt])
    assert emb.shape == (2, *ref.shape[1:]) and lengths.tolist() == n.tolist() * 2
    torch.testing.assert_close(emb[1], ref[0])


def test_text_rejects_a_bare_string(codecs):
    with pytest.raises(TypeError, match="list of strings"):
        codecs.text.encode("a cat")


# ---------------------------------------------------------------- loading and configs


@pytest.fixture(scope="module")
def saved(codecs, tmp_path_factory):
    """The tiny codecs saved in the libraries' formats, as the real folders are laid out."""
    root = tmp_path_factory.mktemp("codecs")
    codecs.video.vae.save_pretrained(root / "video")
    codecs.audio.vae.save_pretrained(root / "audio")
    codecs.text.model.save_pretrained(root / "text")
    codecs.text.tokenizer.save_pretrained(root / "text")
    return root


def load(root, **overrides):
    paths = dict(
        video_vae_path=root / "video", audio_vae_path=root / "audio", text_encoder_path=root / "text"
    )
    kwargs = dict(vae_dtype="float32", text_dtype="float32", text_output_dtype="float32")
    return build_codecs(**{k: str(v) for k, v in {**paths, **overrides}.items()}, **kwargs)


def test_loads_offline_from_library_folders(codecs, saved):
    loaded = load(saved)
    x = pixels(5)
    torch.testing.assert_close(loaded.video.encode(x), codecs.video.encode(x))
    wave = 0.1 * torch.randn(1, 1, 4 * 2048, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.audio.encode(wave, SR), codecs.audio.encode(wave, SR))
    torch.testing.assert_close(loaded.text.encode(["a cat"]), codecs.text.encode(["a cat"]))


def test_magihuman_yaml_instantiates(codecs, saved):
    cfg = OmegaConf.load("conf/codecs/magihuman.yaml")
    with pytest.raises(Exception, match="video_vae_path"):
        instantiate(cfg)
    cfg.video_vae_path, cfg.audio_vae_path, cfg.text_encoder_path = (
        str(saved / "video"), str(saved / "audio"), str(saved / "text"))  # fmt: skip
    cfg.vae_dtype = cfg.text_dtype = "float32"
    cfg.video_decoder = "wan"  # the default, turbo, needs its checkpoint (tested below)
    loaded = instantiate(cfg)
    assert isinstance(loaded, Codecs) and loaded.text.output_dtype == torch.float16
    assert loaded.text.negative_prompt.startswith("blurry")


def test_tiny_yaml_instantiates():
    tiny = instantiate(OmegaConf.load("conf/codecs/tiny.yaml"))
    assert isinstance(tiny, Codecs) and tiny.text.width == TINY_TEXT_WIDTH


def test_loading_errors_name_the_field_and_path(saved, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"codecs.video_vae_path: {missing} does not exist"):
        load(saved, video_vae_path=missing)
    with pytest.raises(
        ValueError, match="codecs.audio_vae_path: .*AutoencoderKLWan.*expected 'AutoencoderOobleck'"
    ):
        load(saved, audio_vae_path=saved / "video")
    with pytest.raises(FileNotFoundError, match="codecs.text_encoder_path: .* has no config.json"):
        load(saved, text_encoder_path=tmp_path)
    # a folder with an incomplete checkpoint fails instead of initialising weights at random
    broken = tmp_path / "broken"
    shutil.copytree(saved / "audio", broken)
    (broken / "diffusion_pytorch_model.safetensors").unlink()
    from safetensors.torch import load_file, save_file

    weights = load_file(saved / "audio" / "diffusion_pytorch_model.safetensors")
    weights.pop("decoder.conv1.bias")
    save_file(weights, broken / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"codecs.audio_vae_path: .*missing \['decoder.conv1.bias'\]"):
        load(saved, audio_vae_path=broken)


def test_text_encoder_loads_from_a_full_t5gemma_checkpoint(saved, tmp_path):
    # The released T5Gemma is encoder-decoder; only its encoder half must be loaded, exactly.
    module = dict(
        vocab_size=260,
        hidden_size=TINY_TEXT_WIDTH,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
    )
    torch.manual_seed(0)
    full = T5GemmaForConditionalGeneration(T5GemmaConfig(encoder=module, decoder=module, vocab_size=260))
    full.save_pretrained(tmp_path / "t5gemma")
    tiny_tokenizer().save_pretrained(tmp_path / "t5gemma")
    assert json.loads((tmp_path / "t5gemma" / "config.json").read_text())["is_encoder_decoder"] is True
    text = load(saved, text_encoder_path=tmp_path / "t5gemma").text
    tokens = text.tokenizer(["a cat"], return_tensors="pt")
    expected = full.get_encoder()(**tokens).last_hidden_state
    emb, _ = text.encode(["a cat"])
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)


def test_magihuman_yaml_selects_turbo_vaed(codecs, saved, tmp_path):
    from magitrain.codecs.tiny import tiny_turbo_vaed
    from magitrain.codecs.turbo_vaed import TurboVideoDecoder

    torch.manual_seed(0)
    turbo = tiny_turbo_vaed()
    turbo.save_pretrained(tmp_path / "turbo")
    cfg = OmegaConf.load("conf/codecs/magihuman.yaml")
    assert cfg.video_decoder == "turbo"  # the release's default decoder
    cfg.video_vae_path, cfg.audio_vae_path, cfg.text_encoder_path = (
        str(saved / "video"), str(saved / "audio"), str(saved / "text"))  # fmt: skip
    cfg.vae_dtype = cfg.text_dtype = "float32"
    with pytest.raises(Exception, match="codecs.turbo_vaed_path is not set.*codecs.video_decoder=wan"):
        instantiate(cfg)
    cfg.turbo_vaed_path = str(tmp_path / "turbo")
    loaded = instantiate(cfg)
    assert isinstance(loaded.video_decoder, TurboVideoDecoder) and loaded.video_decoder_name == "turbo"
    z = torch.randn(1, 48, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.video_decoder.decode(z), turbo.decode(z).clamp(-1, 1), rtol=0, atol=0)
    cfg.video_decoder = "turbo_vaed"
    with pytest.raises(Exception, match=r"codecs.video_decoder must be one of \('wan', 'turbo'\)"):
        instantiate(cfg)
