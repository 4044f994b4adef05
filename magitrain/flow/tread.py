"""TREAD token routing in training: which tokens of each sample skip the middle layers.

Per sample, a random share `rate` of the routed modalities' tokens is set aside after layer
`start_layer - 1` and re-enters before layer `end_layer + 1` (magitrain.model.routing); every
token stays in the loss. The draw comes from the sample's own generator (the recipe's named stream
"tread"), so a resumed run routes exactly as an uninterrupted one, and the other draws of a step
are the same with routing on or off. The kept count is a function of the clip shape alone, so a
bucket has one routed sequence length (compiled layers see two lengths per bucket, not one per
draw). Sampling never routes: only the training forwards get a route.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from magitrain.model.routing import ROUTABLE, TokenRoute

# The released model's span (ModelConfig.tread_config): route after layers 0 and 1, back before 26.
RELEASED_SPAN = (2, 25)
RELEASED_DEPTH = 40


@dataclass(frozen=True)
class TreadConfig:
    """`rate`: the share of each routed modality's tokens set aside (0: off, the recipe unchanged).
    `start_layer`, `end_layer`: the first and last layer the kept tokens run alone; None takes the
    released span 2..25 of 40 layers, scaled to the model's depth (exactly 2..25 at 40 layers).
    `modalities`: video (default) and/or audio; text always passes (it is the condition)."""

    rate: float = 0.0
    start_layer: int | None = None
    end_layer: int | None = None
    modalities: tuple[str, ...] = ("video",)

    def __post_init__(self):
        object.__setattr__(self, "modalities", tuple(self.modalities))
        if not 0 <= self.rate < 1:
            raise ValueError(f"module.tread.rate must lie in [0, 1), got {self.rate}")
        bad = [m for m in self.modalities if m not in ROUTABLE]
        if bad or not self.modalities:
            raise ValueError(
                f"module.tread.modalities must be a non-empty subset of {list(ROUTABLE)} (text is never "
                f"routed: every token reads the prompt), got {list(self.modalities)}"
            )

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def layers(self, num_layers: int) -> tuple[int, int]:
        """(start, end) for a model of `num_layers` layers; a bad explicit span names its keys."""
        lo, hi = RELEASED_SPAN
        start = self.start_layer
        end = self.end_layer
        if start is None:
            start = max(1, round(lo * num_layers / RELEASED_DEPTH))
        if end is None:
            end = min(num_layers - 2, round(hi * num_layers / RELEASED_DEPTH))
        if not 0 <= start <= end < num_layers:
            raise ValueError(
                f"module.tread.start_layer / end_layer = {start} / {end} must satisfy "
                f"0 <= start_layer <= end_layer < num_layers ({num_layers})"
            )
        return start, end

    def kept(self, n: int) -> int:
        """Tokens of a segment of `n` that stay (at least one)."""
        return max(1, n - round(self.rate * n)) if n else 0

    def draw(self, generators: list[torch.Generator], counts: dict[str, int], num_layers: int, device):
        """A TokenRoute for a batch (one generator per sample; `counts`: tokens per modality of a
        sample), or None when off. Each sample's kept indices are ascending, so the kept tokens stay
        in sequence order."""
        if not self.enabled:
            return None
        start, end = self.layers(num_layers)
        chosen = {}
        for m in self.modalities:
            n, k = counts[m], self.kept(counts[m])
            rows = [torch.randperm(n, generator=g, device=g.device)[:k].sort().values for g in generators]
            chosen[m] = torch.stack(rows).to(device)
        return TokenRoute(start, end, **chosen)
