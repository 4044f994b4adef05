"""DMD-2's optional GAN term (REFERENCE §5, `module.dmd.gan`): a small discriminator head on the
fake-score critic's hidden states, taken at chosen transformer layers by forward hooks from
outside the model (the model knows no training).

The head trains with the critic's optimiser (`DMDGAN` is a submodule of the recipe, so its weights
and AdamW states are in checkpoints). The discriminator loss reaches the critic's layers up to the
tapped ones too, as in DMD-2, where the classifier shares the fake-score network's encoder. The
generator's term flows through the critic's features into the student; the critic and head
gradients it leaves are discarded by the recipe. The losses are `magitrain.flow.gan`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magitrain.flow import gan as losses
from magitrain.flow.training import interpolate
from magitrain.model import MagiHumanDiT

Velocity = Callable[[dict[str, Tensor], Tensor], dict[str, Tensor]]


@dataclass
class GANConfig:
    enabled: bool = False  # off: the original DMD-2 without its GAN term
    # critic transformer layers whose outputs feed the head (negative: from the end);
    # empty: the middle layer, num_layers // 2
    layers: list[int] = field(default_factory=list)
    head_width: int = 256  # the head's per-token projection width
    generator_weight: float = 5e-3  # of the student's non-saturating term (REFERENCE: ~1e-3..3e-2)
    discriminator_weight: float = 1e-2  # of the head's logistic loss (+ R1), added to the critic's loss
    r1_weight: float = 1.0  # approximate R1, relative to the discriminator loss; 0 turns it off
    r1_sigma: float = 0.01  # the perturbation of the real critic input (magitrain.flow.gan.approximate_r1)

    def __post_init__(self):
        self.layers = [int(i) for i in self.layers]
        if self.head_width < 1 or self.r1_sigma <= 0 or self.r1_weight < 0:
            raise ValueError(
                "module.dmd.gan needs head_width >= 1, r1_sigma > 0 and r1_weight >= 0, got "
                f"{self.head_width}, {self.r1_sigma}, {self.r1_weight}"
            )

    @classmethod
    def of(cls, value) -> GANConfig:
        """From the config's mapping (hparams are stored as plain dicts)."""
        return value if isinstance(value, GANConfig) else cls(**dict(value))

    def layer_indices(self, num_layers: int) -> list[int]:
        indices = self.layers or [num_layers // 2]
        for i in indices:
            if not -num_layers <= i < num_layers:
                raise ValueError(f"module.dmd.gan.layers: {i} is not a layer of a {num_layers}-layer critic")
        return sorted({i % num_layers for i in indices})


class FeatureTap:
    """Forward hooks that keep the outputs of some layers, only while `capture()` is open.

    The hooks fire inside activation checkpointing's first forward (the stored output is the one
    the backward flows through) and not in its recomputation, which happens outside `capture()`.
    Under FSDP2 a layer's output is the full activation of this rank's samples: the hooks see no
    shards.
    """

    def __init__(self, layers: Sequence[nn.Module]):
        self._features: list[Tensor] | None = None
        self.handles = [layer.register_forward_hook(self._keep) for layer in layers]

    def _keep(self, module, args, output) -> None:
        if self._features is not None:
            self._features.append(output)

    @contextmanager
    def capture(self):
        features: list[Tensor] = []
        self._features = features
        try:
            yield features
        finally:
            self._features = None


class DiscriminatorHead(nn.Module):
    """Per tapped layer: tokens layer-normalised, projected to `width`, SiLU, then mean-pooled over
    the video tokens and over the audio tokens apart (the text tokens are conditioning); one linear
    map of both pools gives the layer's logit. The layers' logits add up to one logit per sample.

    `heard` [B] (the batch's `audio_mask`): a clip without audio has a zero audio pool, real and
    fake alike, so D judges its video only (its silent real audio is not "real audio")."""

    def __init__(self, hidden_size: int, num_layers: int, width: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(hidden_size, width) for _ in range(num_layers))
        self.out = nn.ModuleList(nn.Linear(2 * width, 1) for _ in range(num_layers))

    def forward(
        self, features: Sequence[Tensor], n_video: int, n_audio: int, heard: Tensor | None = None
    ) -> Tensor:
        if len(features) != len(self.proj):
            raise RuntimeError(f"the head expects {len(self.proj)} tapped layers, got {len(features)}")
        logit = 0.0
        for x, proj, out in zip(features, self.proj, self.out, strict=True):
            h = F.silu(proj(F.layer_norm(x.float(), x.shape[-1:])))
            video, audio = h[:, :n_video].mean(1), h[:, n_video : n_video + n_audio].mean(1)
            if heard is not None:
                audio = audio * heard.to(audio).reshape(-1, 1)
            logit = logit + out(torch.cat([video, audio], dim=-1)).squeeze(-1)
        return logit


class DMDGAN(nn.Module):
    """The head, the hooks on the critic, and the two GAN losses of a DMD-2 step."""

    def __init__(self, cfg: GANConfig, critic: MagiHumanDiT, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        layers = cfg.layer_indices(len(critic.block.layers))
        self.patch = critic.config.patch_size
        # the same initial head on every rank (FSDP2 shards what each rank builds)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = DiscriminatorHead(critic.config.hidden_size, len(layers), cfg.head_width)
        object.__setattr__(self, "tap", FeatureTap([critic.block.layers[i] for i in layers]))

    def _tokens(self, x: Mapping[str, Tensor]) -> tuple[int, int]:
        T, H, W = x["video"].shape[2:]
        pt, ph, pw = self.patch
        return (T // pt) * (H // ph) * (W // pw), x["audio"].shape[1]

    def logits(
        self, features: Sequence[Tensor], x: Mapping[str, Tensor], heard: Tensor | None = None
    ) -> Tensor:
        return self.head(features, *self._tokens(x), heard)

    def critic_logits(
        self, critic: Velocity, x_t: dict[str, Tensor], s: Tensor, heard: Tensor | None = None
    ) -> Tensor:
        """D(x_t): the head on the critic's features of one forward (`heard`: the head's)."""
        with self.tap.capture() as features:
            critic(x_t, s)
        return self.logits(features, x_t, heard)

    def discriminator_loss(
        self,
        critic: Velocity,
        fake: Tensor,
        real: dict[str, Tensor],
        *,
        s: Tensor,
        eps: dict[str, Tensor],
        perturbation: dict[str, Tensor],
        heard: Tensor | None = None,
    ) -> tuple[Tensor, dict]:
        """The critic side: `fake` are the logits of the critic forward of its own loss (the
        student's x0 noised to `s` with `eps`, pooled with the same `heard`); the real latents are
        noised to the same `s` with the same `eps`. Weighted by `discriminator_weight`, R1 inside it
        by `r1_weight`."""
        cfg = self.cfg
        x_t = {m: interpolate(real[m].float(), eps[m].float(), s) for m in real}
        d_real = self.critic_logits(critic, x_t, s, heard)
        d_loss = losses.discriminator_loss(d_real, fake)
        logs = {"d_loss": d_loss.detach(), "d_real": d_real.detach().mean(), "d_fake": fake.detach().mean()}
        if cfg.r1_weight > 0:
            moved = {m: x_t[m] + cfg.r1_sigma * perturbation[m] for m in x_t}
            r1 = losses.approximate_r1(d_real, self.critic_logits(critic, moved, s, heard), cfg.r1_sigma)
            d_loss = d_loss + cfg.r1_weight * r1
            logs["r1"] = r1.detach()
        return cfg.discriminator_weight * d_loss, logs

    def generator_loss(
        self,
        critic: Velocity,
        x0: dict[str, Tensor],
        *,
        s: Tensor,
        eps: dict[str, Tensor],
        heard: Tensor | None = None,
    ) -> tuple[Tensor, dict]:
        """The student side: its x0 (with grad) noised to `s`, through the critic and the head."""
        x_t = {m: interpolate(x0[m].float(), eps[m].float(), s) for m in x0}
        d_fake = self.critic_logits(critic, x_t, s, heard)
        g_loss = losses.generator_gan_loss(d_fake)
        logs = {"g_loss": g_loss.detach(), "g_d_fake": d_fake.detach().mean()}
        return self.cfg.generator_weight * g_loss, logs
