"""The model-based metrics (`wer`/`cer` with Whisper, `clip_score` with CLIP, `lse_d`/`lse_c` with
SyncNet) on real mp4s with espeak-ng speech, with tiny random-weight models of the real classes (no
weights can be downloaded here), and their arithmetic on inputs whose answer is known.

The tiny Whisper and CLIP tokenizers are built offline from a vocabulary written here: the 256
byte-level symbols (CLIP: also each with CLIP's end-of-word mark), no merges, and the special tokens
in the order of the real Whisper vocabulary (end of text, start of transcript, the languages, the
tasks). Text then tokenizes byte by byte, which is all a random model needs.
`tiny_whisper_dir`, `tiny_clip_dir` and `tiny_syncnet_file` build them for other tests (the CLI's).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from magitrain.data.synthetic import make_speech_clip
from magitrain.eval import Clip, ClipError, Reference, read_clip
from magitrain.eval.asr import WhisperASR, error_rates, split_at_pauses
from magitrain.eval.clip_score import ClipScore, frame_indices
from magitrain.eval.syncnet import (
    SyncNet,
    SyncNetScore,
    at_rate,
    centre_crops,
    load_syncnet,
    mfcc,
    offset_distances,
)

SPEECH = "Hello, this is a test of the metrics."


def tiny_whisper_dir(out: Path) -> Path:
    """A random 1-layer Whisper (d_model 16) with its processor, generation config (all Whisper
    languages) and a one-entry English spelling map `normalizer.json` (colour -> color)."""
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    specials = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{code}|>" for code in LANGUAGES],
        *["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>"],
        "<|notimestamps|>",
    ]
    vocab.update({token: len(vocab) + i for i, token in enumerate(specials)})
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(), tokenizer=tokenizer).save_pretrained(out)
    (out / "normalizer.json").write_text(json.dumps({"colour": "color"}))
    eot, sot = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"]
    ids = dict(decoder_start_token_id=sot, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot)
    ids.update(suppress_tokens=[], begin_suppress_tokens=[])  # the real lists name ids past this vocab
    config = WhisperConfig(
        vocab_size=len(vocab),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_target_positions=32,
        **ids,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        **ids,
        max_length=24,
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": vocab[f"<|{code}|>"] for code in LANGUAGES},
        task_to_id={"transcribe": vocab["<|transcribe|>"], "translate": vocab["<|translate|>"]},
        no_timestamps_token_id=vocab["<|notimestamps|>"],
    )
    model.save_pretrained(out)
    return out


def tiny_clip_dir(out: Path) -> Path:
    """A random 1-layer CLIP (width 16, 32 px images, CLIP's 77-token text window) with its processor."""
    chars = sorted(ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*chars, *(c + "</w>" for c in chars)])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    eot = vocab["<|endoftext|>"]
    text = dict(tower, vocab_size=len(vocab), bos_token_id=eot - 1, eos_token_id=eot, pad_token_id=eot)
    torch.manual_seed(0)
    vision = dict(tower, image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision)).save_pretrained(out)
    return out


def tiny_syncnet_file(out: Path) -> Path:
    """The real SyncNet architecture with random weights, as safetensors (it has no smaller config)."""
    torch.manual_seed(0)
    save_file(SyncNet().state_dict(), out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_models")
    (root / "whisper").mkdir()
    (root / "clip").mkdir()
    return {
        "whisper": tiny_whisper_dir(root / "whisper"),
        "clip": tiny_clip_dir(root / "clip"),
        "syncnet": tiny_syncnet_file(root / "syncnet.safetensors"),
    }


@pytest.fixture(scope="module")
def speech_clip(tmp_path_factory) -> Clip:
    """1.2 s of espeak-ng English at 30 fps (SyncNet resamples it to 25 fps), AAC in an mp4."""
    path = tmp_path_factory.mktemp("eval_speech") / "speech.mp4"
    make_speech_clip(path, SPEECH, "en", seconds=1.2, audio_seconds=1.2, fps=30)
    return read_clip(path)


# --- wer / cer arithmetic --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "transcript, reference, language, wer, cer",
    [
        ("the cat sat down", "the cat sat", "en", 1 / 3, 5 / 11),  # one inserted word, " down"
        ("the dog sat", "the cat sat", "en", 1 / 3, 3 / 11),
        ("The cat, SAT!", "the cat sat", "en", 0, 0),  # case and punctuation
        ("twenty five", "25", "en-US", 0, 0),  # English numbers; a locale names the language
        ("Die Tonspur ist LÄNGER.", "die Tonspur ist länger", "de", 0, 0),
        ("Guten Abend", "guten Morgen", "de", 1 / 2, 5 / 12),
        ("你好世间", "你好，世界。", "zh", 1 / 4, 1 / 4),  # characters: one of four substituted
        ("你好 世间", "你好，世界。", None, 1 / 4, 1 / 4),  # no language: the script says characters
        ("こんにちわ", "こんにちは", "ja", 1 / 5, 1 / 5),
        ("你好世间", "你好，世界。", "Mandarin", 1 / 4, 1 / 4),  # a language name as Whisper spells it
    ],
)
def test_error_rates_on_known_pairs(transcript, reference, language, wer, cer):
    """The arithmetic the metric runs (normalise, then jiwer) on pairs counted by hand. Catches a
    swapped reference/hypothesis (1/4 instead of 1/3 on the first pair), a missing normaliser (case,
    punctuation, numbers), and CJK scored by words (a whole sentence as one word)."""
    rates = error_rates(transcript, reference, language, spelling={})
    assert rates == {"wer": pytest.approx(wer), "cer": pytest.approx(cer)}


def test_error_rates_use_the_english_spelling_map():
    """English text goes through Whisper's spelling map (British -> American, normalizer.json): a
    transcript with "colour" is right against "color" with the map, one word wrong without it."""
    assert error_rates("the colour", "the color", "en", {"colour": "color"})["wer"] == 0
    assert error_rates("the colour", "the color", "en", {})["wer"] == pytest.approx(1 / 2)


def test_error_rates_reject_an_empty_reference():
    with pytest.raises(ClipError, match="empty once normalised"):
        error_rates("hello", "?!", "en", {})


def test_split_at_pauses_cuts_long_audio_in_silences():
    """Whisper hears 30 s at a time: 70 s of noise with pauses at 25 s and 50 s comes back in pieces
    of at most 30 s, cut inside the pauses, that together are the whole audio."""
    rate = 16000
    audio = np.random.default_rng(0).standard_normal(70 * rate).astype(np.float32)
    for pause in (25, 50):
        audio[pause * rate : pause * rate + rate // 2] = 0
    pieces = split_at_pauses(audio, rate)
    assert [len(p) <= 30 * rate for p in pieces] == [True] * 3
    np.testing.assert_array_equal(np.concatenate(pieces), audio)
    cuts = np.cumsum([len(p) for p in pieces])[:-1] / rate
    assert 25 < cuts[0] < 25.5 and 50 < cuts[1] < 50.5
    assert len(split_at_pauses(audio[: 10 * rate], rate)) == 1


# --- Whisper end to end ----------------------------------------------------------------------------


@pytest.mark.parametrize("language", ["en", None, "zh"])
def test_whisper_scores_a_real_speech_clip(models, speech_clip, language):
    """A random-weights Whisper transcribes espeak-ng speech from an mp4 with the language given,
    detected, or a CJK one; wer/cer are finite non-negative numbers and `score` gives the transcript."""
    asr = WhisperASR(models["whisper"])
    transcript, rates = asr.score(speech_clip, Reference(prompt="a talk", speech=SPEECH, language=language))
    assert isinstance(transcript, str)
    assert set(rates) == {"wer", "cer"} and all(math.isfinite(v) and v >= 0 for v in rates.values())
    assert asr.metric(speech_clip, Reference(prompt=f'He says "{SPEECH}"', language=language)) == rates


def test_whisper_transcribes_audio_longer_than_its_window(models):
    """40 s of audio goes to Whisper as two pieces in one batch (the processor alone would keep the
    first 30 s): the transcript holds both pieces' text."""
    rate = 16000
    audio = np.random.default_rng(1).standard_normal((1, 40 * rate)).astype(np.float32) * 0.1
    long = Clip("long.mp4", np.zeros((1, 8, 8, 3), np.uint8), 25.0, audio, rate)
    short = Clip("short.mp4", long.frames, 25.0, audio[:, : 10 * rate], rate)
    asr = WhisperASR(models["whisper"])
    assert len(asr.transcribe(long, "en")) > len(asr.transcribe(short, "en"))


def test_whisper_names_what_is_missing(models, speech_clip):
    asr = WhisperASR(models["whisper"])
    with pytest.raises(ClipError, match="speech.mp4: no reference speech"):
        asr.metric(speech_clip, Reference(prompt="a man talks"))
    with pytest.raises(ClipError, match="does not know the language 'xx'"):
        asr.metric(speech_clip, Reference(speech="hello", language="xx"))


def test_whisper_english_only_checkpoint_is_told_no_language(models, speech_clip):
    """English-only checkpoints (`whisper-*.en`) refuse a language or task in `generate`: an English
    clip is still scored, its text normalised as English."""
    asr = WhisperASR(models["whisper"])
    asr.model.generation_config.is_multilingual = False
    rates = asr.metric(speech_clip, Reference(speech=SPEECH, language="en"))
    assert set(rates) == {"wer", "cer"} and all(math.isfinite(v) for v in rates.values())


# --- CLIP score ------------------------------------------------------------------------------------


def test_frame_indices_are_evenly_spaced():
    assert frame_indices(80, 8).tolist() == [5, 15, 25, 35, 45, 55, 65, 75]
    assert frame_indices(3, 8).tolist() == [0, 1, 2]


def test_clip_score_of_a_real_clip(models, speech_clip):
    """A random-weights CLIP scores 8 frames of a real mp4 against its prompt: a number in [0, 100]
    that depends on the prompt; a 300-word prompt is truncated to CLIP's 77 tokens instead of
    failing; no prompt is an error."""
    scorer = ClipScore(models["clip"])
    score = scorer.metric(speech_clip, Reference(prompt="a moving pattern"))
    assert set(score) == {"clip_score"} and 0 < score["clip_score"] <= 100
    assert scorer.metric(speech_clip, Reference(prompt="a red car")) != score  # the text counts
    long = scorer.metric(speech_clip, Reference(prompt="a very long description " * 75))
    assert math.isfinite(long["clip_score"])
    with pytest.raises(ClipError, match="no prompt"):
        scorer.metric(speech_clip, Reference(prompt=" "))


# --- SyncNet ---------------------------------------------------------------------------------------


def test_syncnet_scores_a_real_speech_clip(models, speech_clip):
    """The published SyncNet (random weights) on a real 30 fps mp4 with speech: finite LSE-D and
    LSE-C, each non-negative (a distance; a median minus the minimum)."""
    scores = SyncNetScore(models["syncnet"]).metric(speech_clip, Reference())
    assert set(scores) == {"lse_d", "lse_c"}
    assert all(math.isfinite(v) and v >= 0 for v in scores.values()), scores


def test_syncnet_rejects_a_clip_shorter_than_its_window(models, speech_clip):
    short = Clip("short.mp4", speech_clip.frames[:6], 30.0, speech_clip.audio, speech_clip.sample_rate)
    with pytest.raises(ClipError, match="short.mp4: too short for SyncNet"):
        SyncNetScore(models["syncnet"]).metric(short, Reference())


@pytest.mark.parametrize("shift", [-7, 0, 4])
def test_offset_distances_find_a_known_shift(shift):
    """Audio features that are the video features `shift` frames later: the distance per offset is
    smallest at that offset (LSE-D is that minimum, LSE-C the median minus it). Catches an offset
    window taken the wrong way round or off by one."""
    base = torch.randn(60, 16, generator=torch.Generator().manual_seed(0))
    video, audio = base[10:50], base[10 - shift : 50 - shift]
    distances = offset_distances(video, audio, vshift=8)
    assert distances.shape == (17,)
    assert int(distances.argmin()) == 8 + shift
    assert distances.median() - distances.min() > 1


def test_mfcc_equals_python_speech_features():
    """SyncNet was trained on python_speech_features' MFCCs. These values are that package's
    (0.6, `mfcc(signal, 16000)`, defaults) for the signal below; any change to framing, filters,
    DCT, lifter or energy moves them."""
    t = np.arange(800) / 16000
    signal = np.round(8000 * np.sin(2 * np.pi * 440 * t) + 3000 * np.sin(2 * np.pi * 1330 * t + 0.3))
    expected = [
        [19.870273, 16.302724, -21.467186, -22.785176, -10.453163, -11.332808, -40.99933]
        + [-50.338078, -14.282506, 31.792923, 36.0279, 6.562944, -10.3582],
        [19.647668, 21.849227, -17.528999, -28.228444, -8.08566, -4.238051, -30.71437]
        + [-44.119781, -11.407931, 31.241016, 35.289922, 6.800929, -8.783345],
    ]
    features = mfcc(signal)
    assert features.shape == (4, 13)
    np.testing.assert_allclose(features[[0, 3]], expected, atol=1e-5)


def test_at_rate_resamples_frames_by_time():
    frames = np.arange(30)[:, None, None, None]
    assert at_rate(frames, 25.0).shape[0] == 30  # 30 frames at 25 fps stay
    assert at_rate(frames, 30.0)[:, 0, 0, 0].tolist()[:7] == [0, 1, 2, 4, 5, 6, 7]  # 1.2 s: 30 -> 25
    assert at_rate(frames[:24], 24.0).shape[0] == 25


def test_centre_crops_keep_the_centre_square_in_bgr():
    """A wide frame, red at the sides and blue in its centre square: the crop is all blue, and blue
    is SyncNet's first channel (OpenCV's BGR order)."""
    frame = np.zeros((1, 64, 112, 3), np.uint8)
    frame[..., 0] = 255
    frame[:, :, 24:88] = (0, 0, 255)
    crops = centre_crops(frame)
    assert crops.shape == (3, 1, 224, 224)
    assert torch.allclose(crops[:, 0].mean(dim=(1, 2)), torch.tensor([255.0, 0, 0]), atol=0.5)


def test_syncnet_weights_load_safely(tmp_path):
    """The original `syncnet_v2.model` is a state dict saved by the torch of 2017 (legacy format, no
    BatchNorm step counters, which BatchNorm fills in itself): it loads with weights_only=True. A
    pickled module, another network's weights and a non-weights file are refused with the path and
    what to do."""
    state = {k: v for k, v in SyncNet().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "syncnet_v2.model", _use_new_zipfile_serialization=False)
    loaded = load_syncnet(tmp_path / "syncnet_v2.model").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    torch.save(SyncNet(), tmp_path / "module.model")
    with pytest.raises(ValueError, match=r"module.model holds more than tensors .* convert it once"):
        load_syncnet(tmp_path / "module.model")
    save_file({"netcnnaud.0.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="other.safetensors does not fit SyncNet"):
        load_syncnet(tmp_path / "other.safetensors")
    (tmp_path / "notes.model").write_text("not weights")
    with pytest.raises(ValueError, match="notes.model is not a weights file"):
        load_syncnet(tmp_path / "notes.model")


# --- weights paths ---------------------------------------------------------------------------------


def test_missing_or_wrong_weights_paths_name_the_path(models, tmp_path):
    missing = tmp_path / "nowhere"
    for scorer in (WhisperASR, ClipScore, SyncNetScore):
        with pytest.raises(FileNotFoundError, match=str(missing)):
            scorer(missing)
    with pytest.raises(ValueError, match=f"{models['clip']} is not a transformers Whisper folder"):
        WhisperASR(models["clip"])
    with pytest.raises(ValueError, match=f"{models['whisper']} is not a transformers CLIP folder"):
        ClipScore(models["whisper"])
    with pytest.raises(FileNotFoundError, match=f"SyncNet weights: {models['whisper']} is not a file"):
        SyncNetScore(models["whisper"])
    bare = tmp_path / "whisper"
    bare.mkdir()
    for file in models["whisper"].iterdir():
        if file.name != "normalizer.json":
            (bare / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ValueError, match="no normalizer.json"):
        WhisperASR(bare)
