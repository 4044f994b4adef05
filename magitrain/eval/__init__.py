"""Quality metrics for generated clips (no Lightning): `python -m magitrain.eval CLIPS...`.

`read_clip` turns an mp4 into a `Clip` (frames, audio, their rates and stream durations); each
metric reads a `Clip` and its `Reference` (the prompt, the speech it should say) and returns
`{metric name: value}`. See docs/evaluation.md.
"""

from magitrain.eval.clip import Clip, ClipError, Reference, read_clip

__all__ = ["Clip", "ClipError", "Reference", "read_clip"]
