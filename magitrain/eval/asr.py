"""Speech intelligibility (`wer`, `cer`): a local transformers Whisper transcribes the clip's audio and
the transcript is compared with the words the clip should say (`Reference.expected_speech`).

Both texts go through Whisper's own normaliser first, as Whisper's paper scores WER:
`EnglishTextNormalizer` when the language is English (case, punctuation, spelled numbers, British
spellings: the spelling map is the `normalizer.json` shipped with every Whisper checkpoint),
`BasicTextNormalizer` (case, punctuation, bracketed text) for every other language and when none is
given. `jiwer` does the edit-distance arithmetic.
"""

from __future__ import annotations

import re
from pathlib import Path

import jiwer
import numpy as np
import torch
import torchaudio
from transformers import WhisperForConditionalGeneration, WhisperProcessor
from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer
from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

from magitrain.eval.clip import Clip, ClipError, Reference
from magitrain.eval.pretrained import load_folder

WHISPER_RATE = 16000
# Written without spaces between words: their word error rate is the character error rate.
CHARACTER_LANGUAGES = frozenset({"zh", "ja", "yue", "ko"})
# Han, kana, Hangul: a reference in these scripts is scored by characters when no language is given.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def whisper_language(language: str | None) -> str | None:
    """The Whisper language code of an ISO 639-1 code, a locale or a language name as Whisper spells
    them ("en", "EN-us", "zh_CN", "Mandarin" -> "en", "en", "zh", "zh")."""
    if not language:
        return None
    language = language.strip().lower()
    return TO_LANGUAGE_CODE.get(language) or re.split(r"[-_]", language)[0]


def normalise(text: str, language: str | None, spelling: dict[str, str] | None) -> str:
    """`text` as Whisper's evaluation compares it. `spelling`: the English spelling map (British to
    American) that English text needs; without it English spellings are not unified."""
    if language == "en":
        text = EnglishTextNormalizer(spelling or {})(text)
    else:
        text = BasicTextNormalizer()(text)
    return " ".join(text.split())


def by_characters(reference: str, language: str | None) -> bool:
    """Whether the error rate is counted in characters: a CJK language, or no language given and a
    reference in a CJK script."""
    return language in CHARACTER_LANGUAGES if language else bool(_CJK.search(reference))


def error_rates(
    transcript: str, reference: str, language: str | None, spelling: dict[str, str] | None = None
) -> dict[str, float]:
    """`{"wer", "cer"}` of `transcript` against `reference`, both normalised (`normalise`). For CJK
    text (`by_characters`) spaces are dropped and `wer` is the character error rate too."""
    language = whisper_language(language)
    ref, hyp = normalise(reference, language, spelling), normalise(transcript, language, spelling)
    if not ref:
        raise ClipError(f"the reference speech {reference!r} is empty once normalised")
    if by_characters(ref, language):
        cer = jiwer.cer(ref.replace(" ", ""), hyp.replace(" ", ""))
        return {"wer": float(cer), "cer": float(cer)}
    return {"wer": float(jiwer.wer(ref, hyp)), "cer": float(jiwer.cer(ref, hyp))}


def split_at_pauses(audio: np.ndarray, rate: int, max_seconds: float = 30.0) -> list[np.ndarray]:
    """`audio` in pieces of at most `max_seconds` (Whisper's window), each cut at the quietest 50 ms of
    its last third, so that a cut seldom splits a word."""
    limit, hop = round(max_seconds * rate), rate // 20
    pieces = []
    while len(audio) > limit:
        start = limit * 2 // 3
        tail = audio[start : start + (limit - start) // hop * hop]
        cut = start + int(np.argmin((tail.reshape(-1, hop) ** 2).sum(axis=1))) * hop + hop // 2
        pieces.append(audio[:cut])
        audio = audio[cut:]
    return [*pieces, audio]


class WhisperASR:
    """`metric(clip, reference) -> {"wer", "cer"}`; `score` also returns the transcript (for a report).

    `path`: a local transformers Whisper folder (any size: `openai/whisper-large-v3` downloaded with
    `hf download`), with its processor and `normalizer.json`. The language is
    `reference.language` when given (`whisper_language`; Whisper is told it), else Whisper detects it. For
    zh/ja/yue/ko `wer` is the character error rate, as for a reference in a CJK script with no
    language given. Audio longer than 30 s is transcribed in pieces cut at pauses (`split_at_pauses`).
    """

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.processor, self.model = load_folder(
            path, "Whisper", WhisperProcessor, WhisperForConditionalGeneration, device
        )
        self.spelling = self.processor.tokenizer.english_spelling_normalizer
        if self.spelling is None:
            raise ValueError(f"Whisper weights: {path} has no normalizer.json (the English spelling map)")
        self.device = device

    @torch.no_grad()
    def transcribe(self, clip: Clip, language: str | None = None) -> str:
        """The clip's mono audio as Whisper hears it, told `language` (None: Whisper detects it;
        English-only checkpoints, `*.en`, are told nothing). `ClipError` for a language it lacks."""
        audio = torchaudio.functional.resample(torch.from_numpy(clip.mono), clip.sample_rate, WHISPER_RATE)
        pieces = split_at_pauses(audio.numpy(), WHISPER_RATE)
        features = self.processor(pieces, sampling_rate=WHISPER_RATE, return_tensors="pt").input_features
        task = self._task(language, clip.name)
        tokens = self.model.generate(features.to(self.device, self.model.dtype), **task)
        return " ".join(t.strip() for t in self.processor.batch_decode(tokens, skip_special_tokens=True))

    def _task(self, language: str | None, name: str) -> dict[str, str | None]:
        config = self.model.generation_config
        if not getattr(config, "is_multilingual", False):
            return {}  # generate refuses a language or task for English-only checkpoints
        if language is not None and f"<|{language}|>" not in config.lang_to_id:
            raise ClipError(f"{name}: Whisper does not know the language {language!r}")
        return {"language": language, "task": "transcribe"}

    def score(self, clip: Clip, reference: Reference) -> tuple[str, dict[str, float]]:
        """The transcript and its `{"wer", "cer"}`; `ClipError` when the reference has no speech."""
        expected = reference.expected_speech
        if expected is None:
            raise ClipError(
                f"{clip.name}: no reference speech for wer/cer (no 'speech' field, no quoted text)"
            )
        language = whisper_language(reference.language)
        transcript = self.transcribe(clip, language)
        return transcript, error_rates(transcript, expected, language, self.spelling)

    def metric(self, clip: Clip, reference: Reference) -> dict[str, float]:
        return self.score(clip, reference)[1]
