"""Voice consistency (`speaker_similarity`): how alike the clip's voice and its reference voice
(`Reference.voice`, the file `infer.py voice=` was given) sound, as a local speaker-verification
model embeds them.

The model: a transformers audio x-vector model folder (`AutoModelForAudioXVector`, e.g.
`microsoft/wavlm-base-plus-sv`: WavLM features, a TDNN x-vector head trained for speaker
verification), loaded with its feature extractor. The issue asked for ECAPA-TDNN embeddings
(speechbrain's `spkrec-ecapa-voxceleb`); speechbrain is not a dependency of this project and
transformers ships no ECAPA, so the metric takes any model with that interface: inputs at the
feature extractor's rate, `.embeddings` [B, D] out. Scores from different models are not comparable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchaudio.functional as AF
from transformers import AutoFeatureExtractor, AutoModelForAudioXVector

from magitrain.errors import UserError
from magitrain.eval.clip import Clip, ClipError, Reference
from magitrain.eval.pretrained import load_folder


class SpeakerSimilarity:
    """`metric(clip, reference) -> {"speaker_similarity"}`: the cosine similarity (-1 to 1, higher is
    the same voice) of the speaker embeddings of the clip's mono audio and of `reference.voice`'s
    first 10 s, both at the model's rate. `path`: the model folder (see the module docstring)."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.extractor, self.model = load_folder(
            path, "speaker", AutoFeatureExtractor, AutoModelForAudioXVector, device
        )
        self.device, self.rate = device, int(self.extractor.sampling_rate)

    def embed(self, wave: np.ndarray, rate: int) -> torch.Tensor:
        """The unit speaker embedding [D] of a mono waveform at `rate`."""
        audio = AF.resample(torch.from_numpy(np.ascontiguousarray(wave, np.float32)), rate, self.rate)
        inputs = self.extractor(audio.numpy(), sampling_rate=self.rate, return_tensors="pt")
        with torch.no_grad():
            embedding = self.model(**inputs.to(self.device)).embeddings[0].float()
        return torch.nn.functional.normalize(embedding, dim=0)

    def metric(self, clip: Clip, reference: Reference) -> dict[str, float]:
        if reference.voice is None:
            raise ClipError(f"{clip.name}: no reference voice to compute speaker_similarity against")
        from magitrain.inference.given import read_voice_file

        try:
            voice = read_voice_file(reference.voice, self.rate)[0].numpy()
        except UserError as err:
            raise ClipError(str(err)) from None
        similarity = self.embed(clip.mono, clip.sample_rate) @ self.embed(voice, self.rate)
        return {"speaker_similarity": float(similarity)}
