"""`Codecs`: the three frozen codecs as one object, what a `conf/codecs/*.yaml` instantiates."""

import torch

from magitrain.codecs.audio import AudioCodec
from magitrain.codecs.text import TextEncoder
from magitrain.codecs.video import VideoCodec


class Codecs:
    """Holds video, audio and text codecs. A plain object, not an `nn.Module`, so that a
    LightningModule keeping it as an attribute does not checkpoint or optimise frozen weights."""

    def __init__(self, video: VideoCodec, audio: AudioCodec, text: TextEncoder):
        self.video, self.audio, self.text = video, audio, text

    def to(self, device: torch.device | str) -> "Codecs":
        self.video.to(device)
        self.audio.to(device)
        self.text.to(device)
        return self

    def __repr__(self) -> str:
        return (
            f"Codecs(video={type(self.video.vae).__name__}, audio={type(self.audio.vae).__name__}, "
            f"text={type(self.text.model).__name__} width {self.text.width})"
        )
