"""`Codecs`: the three frozen codecs as one object, what a `conf/codecs/*.yaml` instantiates."""

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from magitrain.codecs.audio import AudioCodec
from magitrain.codecs.text import TextEncoder
from magitrain.codecs.video import VideoCodec

VIDEO_DECODERS = ("wan", "turbo")  # the choice `codecs.video_decoder` of conf/codecs/*.yaml


def check_video_decoder(name: str) -> None:
    if name not in VIDEO_DECODERS:
        raise ValueError(f"codecs.video_decoder must be one of {VIDEO_DECODERS}, got {name!r}")


class Codecs:
    """Holds video, audio and text codecs. A plain object, not an `nn.Module`, so that a
    LightningModule keeping it as an attribute does not checkpoint or optimise frozen weights.

    `video` encodes (and can decode) with the Wan2.2 VAE; `video_decoder` is what generation
    decodes with: `video` itself, or Turbo-VAED (`magitrain.codecs.turbo_vaed.TurboVideoDecoder`).

    `offload=True` (`codecs.offload` of the config): `to(device)` leaves the weights in (pinned)
    host memory, and they visit the device only inside `on_device()`, through the inference
    pipeline's `StageResidency` (one "codecs" stage). Training wraps each use in it (encoding raw
    batches, the DMD-2 negative prompt); generation uses the pipeline's `offload="codecs"`.
    """

    def __init__(
        self,
        video: VideoCodec,
        audio: AudioCodec,
        text: TextEncoder,
        video_decoder: nn.Module | None = None,
        offload: bool = False,
    ):
        self.video, self.audio, self.text = video, audio, text
        self.video_decoder = video if video_decoder is None else video_decoder
        self.offload = offload
        self.residency = None  # the StageResidency of `offload`, made by `to(device)`
        self._depth = 0  # nested on_device() blocks: only the outermost moves weights

    @property
    def video_decoder_name(self) -> str:
        return "wan" if self.video_decoder is self.video else "turbo"

    def to(self, device: torch.device | str) -> "Codecs":
        if self.offload:
            from magitrain.inference.residency import StageResidency

            self.text.offload, self.text.device = False, torch.device(device)  # moved by the residency
            modules = [self.video, self.video_decoder, self.audio, self.text.model]
            self.residency = StageResidency(device, {"codecs": modules})
            return self
        self.video.to(device)
        self.video_decoder.to(device)
        self.audio.to(device)
        self.text.to(device)
        return self

    @contextmanager
    def on_device(self):
        """Inside, the codecs are on the device `to` named (with `offload`: only inside)."""
        outermost = self.residency is not None and self._depth == 0
        self._depth += 1
        try:
            with self.residency.stage("codecs") if outermost else nullcontext():
                yield
        finally:
            self._depth -= 1

    def __repr__(self) -> str:
        return (
            f"Codecs(video={type(self.video.vae).__name__}, video_decoder={self.video_decoder_name}, "
            f"audio={type(self.audio.vae).__name__}, "
            f"text={type(self.text.model).__name__} width {self.text.width})"
        )
