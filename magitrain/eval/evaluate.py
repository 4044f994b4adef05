"""Score clips: the weight-free metrics always, each model-based one when its weights are given.

    evaluator = Evaluator(EvalOptions(asr_path="/ckpt/whisper-small"))
    result = evaluator.run(paths, references)  # {"clips": {name: {metric: value}}, "aggregate": ...}

A clip that cannot be read, or a metric that fails on it (missing weights included), puts a
message under the clip's `"error"` and the run goes on with the next metric and clip. A clip with
no reference speech gets no wer/cer, and says why under `"skipped"` (not an error).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from magitrain.eval.clip import ClipError, Reference, read_clip
from magitrain.eval.signals import signal_checks
from magitrain.eval.stats import aggregate
from magitrain.eval.sync import av_sync, cell_motion

# key of the weights path -> (module, class) of the metric; each is built as CLASS(path, device)
# and called as its .metric(clip, reference) -> {metric name: value}
MODEL_METRICS = {
    "asr_path": ("magitrain.eval.asr", "WhisperASR"),
    "clip_path": ("magitrain.eval.clip_score", "ClipScore"),
    "syncnet_path": ("magitrain.eval.syncnet", "SyncNetScore"),
    "speaker_path": ("magitrain.eval.speaker", "SpeakerSimilarity"),
}


def _skip(row: dict, why: str) -> dict:
    """A metric left out of a clip's row, said under "skipped" (beside any other): no values."""
    row["skipped"] = "; ".join(filter(None, (row.get("skipped"), why)))
    return {}


class ModelUnavailable(Exception):
    """A model-based metric whose model could not be built (its message says why)."""


@dataclass
class EvalOptions:
    """The `eval.*` keys of the command line (and of callbacks=validation)."""

    asr_path: str | None = None
    clip_path: str | None = None
    syncnet_path: str | None = None
    speaker_path: str | None = None
    max_lag: int = 10
    device: str = "auto"


class Evaluator:
    """Scores clips with the weight-free metrics and the model-based ones whose paths are set; each
    model is loaded once, on the first clip, and a model that cannot load is an error on every
    clip (named by its key) rather than a crash."""

    def __init__(self, options: EvalOptions):
        self.options = options
        self._models: dict[str, object] = {}

    def score(self, path: str | Path, reference: Reference | None = None, on_clip=None) -> dict:
        """`{metric: value}` of one clip, with `"error"` when it or one of its metrics failed;
        `on_clip(clip)` sees each clip that could be read (the report's thumbnails)."""
        try:
            clip = read_clip(path)
        except ClipError as err:
            return {"error": str(err)}
        if on_clip is not None:
            on_clip(clip)
        cells = cell_motion(clip.frames)  # both read the motion: computed once
        metrics = {
            "av_sync": lambda: av_sync(clip, self.options.max_lag, cells),
            "signal checks": lambda: signal_checks(clip, cells),
        }
        reference = reference or Reference()
        row, errors = {}, []
        for key in MODEL_METRICS:
            if getattr(self.options, key) is not None:
                metrics[f"eval.{key}"] = lambda key=key: self._model_metric(key, clip, reference, row)
        for name, metric in metrics.items():
            try:
                row.update(metric())
            except Exception as err:  # noqa: BLE001  one metric's failure must not end the run
                why = str(err) if isinstance(err, ModelUnavailable) else f"{type(err).__name__}: {err}"
                errors.append(f"{name}: {why}")
        if errors:
            row["error"] = "; ".join(errors)
        return row

    def run(self, paths: list[Path], references: dict[str, Reference] | None = None, on_clip=None) -> dict:
        """`{"clips": {file name: row}, "aggregate": {metric: {"mean", "ci95", "n"}}}`."""
        references = references or {}
        clips = {Path(p).name: self.score(p, references.get(Path(p).name), on_clip) for p in paths}
        return {"clips": clips, "aggregate": aggregate(clips)}

    def _model_metric(self, key: str, clip, reference: Reference, row: dict) -> dict:
        model = self._model(key)  # missing weights are an error even where the metric is skipped
        if key == "asr_path" and reference.expected_speech is None:
            # a clip that should say nothing has no WER: not a failure, but said (the JSON's "skipped")
            return _skip(
                row, "wer/cer: no reference speech (no 'speech' field, no quoted text in the prompt)"
            )
        if key == "speaker_path" and reference.voice is None:
            return _skip(row, "speaker_similarity: no reference voice (no 'voice' field)")
        return model.metric(clip, reference)

    def _model(self, key: str):
        """The metric of `key`, built on first use; one that could not be built raises its error
        again for every clip (without trying again)."""
        if key not in self._models:
            try:
                self._models[key] = self._load(key)
            except Exception as err:  # noqa: BLE001  reported per clip by score
                self._models[key] = ModelUnavailable(f"{type(err).__name__}: {err}")
        model = self._models[key]
        if isinstance(model, ModelUnavailable):
            raise model
        return model

    def _load(self, key: str):
        path = getattr(self.options, key)
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        module, name = MODEL_METRICS[key]
        return getattr(importlib.import_module(module), name)(path, self.device)

    @property
    def device(self) -> str:
        if self.options.device != "auto":
            return self.options.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
