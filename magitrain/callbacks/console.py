"""What a run prints to the console: Lightning's progress bar and model summary, minus two wrong lines.

- Lightning's rich progress bar titles each epoch `Epoch N/{max_epochs - 1}`: a run bounded by
  `trainer.max_steps` has `max_epochs=-1` and read `Epoch 37/-2`. Such a run shows `Epoch N`.
  A config that names no progress bar (`callbacks.progress_bar=null`) gets this one too, in place
  of Lightning's default rich bar (`magitrain.launch.build_callbacks`).
- Lightning's model summary has a FLOPs column and a `Total FLOPs` line, counted only by running
  the module's `example_input_array`; magitrain's modules define none (a real batch needs the
  data), so every count read 0. The summary here leaves them out; the `Throughput` callback logs
  the model's FLOPs per step as TFLOP/s and MFU.
"""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count

log = logging.getLogger("magitrain")


class ProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is None or self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"  # no last epoch to show: the run ends at max_steps
        return f"{description:{len(self.validation_description)}}"  # Lightning's padding (no flicker)


class ModelSummary(LightningModelSummary):
    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs,
    ) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        widths = [max(len(name), *(len(v) for v in values)) for name, values in columns]
        rows = [[name for name, _ in columns], *zip(*(values for _, values in columns), strict=True)]
        lines = [
            "  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        frozen = total_parameters - trainable_parameters
        lines.append(
            f"params: {get_human_readable_count(trainable_parameters)} trainable, "
            f"{get_human_readable_count(frozen)} frozen, {get_formatted_model_size(model_size)} MB"
        )
        log.info("\n".join(lines))
