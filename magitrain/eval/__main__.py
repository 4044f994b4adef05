r"""Score generated clips: `python -m magitrain.eval CLIPS... [key=value ...]`.

    python -m magitrain.eval outputs/batch/ prompts=prompts.jsonl json=scores.json report=scores.md
    python -m magitrain.eval a.mp4 b.mp4 eval.asr_path=/ckpt/whisper-small eval.device=cuda
    python -m magitrain.eval compare outputs/teacher/ outputs/student/ prompts=prompts.jsonl report=cmp.md

CLIPS are video files (.mp4, .mov, .mkv, .webm) or folders of them (not searched below). The
weight-free metrics (av_offset_frames, av_confidence, loudness_lufs, clipping_ratio, silence_ratio,
flicker, frozen_ratio, duration_mismatch_s) always run; wer/cer, clip_score and lse_c/lse_d run when
their weights are given. `compare A B` scores the clips of A and of B (folders, or the json= of an
earlier run), matches them by file name and reports the paired differences B - A with bootstrap
CIs. The exit status is 1 when a clip (or one of its metrics) failed, 2 for a bad command.
See docs/evaluation.md.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from magitrain.cli import command_line
from magitrain.errors import UserError
from magitrain.eval.evaluate import EvalOptions, Evaluator
from magitrain.eval.references import pair
from magitrain.eval.report import Strips, write_compare_report, write_report
from magitrain.eval.stats import is_number, paired_deltas
from magitrain.prompt_file import read_prompt_rows

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm")
KEYS = {
    "prompts": "the prompts file the clips were made from (.jsonl rows or one prompt a line)",
    "json": "write the scores here (default: print them)",
    "report": "write a markdown report here, with thumbnail strips in REPORT_thumbs/",
    "eval.asr_path": "a Whisper model folder (transformers): wer, cer",
    "eval.clip_path": "a CLIP model folder (transformers): clip_score",
    "eval.syncnet_path": "a SyncNet weight file: lse_c, lse_d",
    "eval.speaker_path": "a speaker-verification model folder (transformers x-vector): speaker_similarity",
    "eval.max_lag": "av_offset_frames searches lags -N..N frames (default 10)",
    "eval.device": "auto (cuda if available) | cpu | cuda | cuda:N, for the model-based metrics",
}
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


@dataclass
class Command:
    clips: list[str] = field(default_factory=list)
    compare: bool = False
    prompts: str | None = None
    json: str | None = None
    report: str | None = None
    options: EvalOptions = field(default_factory=EvalOptions)


def help_text() -> str:
    lines = [__doc__.strip(), "", "keys:"]
    lines += [f"  {key + '=':<20} {doc}" for key, doc in KEYS.items()]
    lines.append(f"  {'--verbose':<20} full tracebacks for errors in the arguments or files")
    return "\n".join(lines)


def parse(argv: list[str]) -> Command:
    """A `Command`; an unknown key or a bad value is a UserError (exit status 2)."""
    command = Command()
    if argv and argv[0] == "compare":
        command.compare, argv = True, argv[1:]
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or not _KEY.match(key):  # a path, even one with '=' in a folder name
            command.clips.append(item)
        elif key not in KEYS:
            close = difflib.get_close_matches(key, list(KEYS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"unknown key {key!r}{hint}: see `python -m magitrain.eval --help`")
        elif key.startswith("eval."):
            _set_option(command.options, key.removeprefix("eval."), value)
        else:
            setattr(command, key, value or None)
    if command.compare and len(command.clips) != 2:
        raise UserError(f"compare takes two folders (A and B), got {len(command.clips)}: {command.clips}")
    if not command.clips:
        raise UserError("no clips given: python -m magitrain.eval CLIPS... (see --help)")
    return command


def _set_option(options: EvalOptions, name: str, value: str) -> None:
    if name == "max_lag":
        if not value.isdigit() or int(value) < 1:
            raise UserError(f"eval.max_lag={value}: expected a whole number of frames >= 1")
        options.max_lag = int(value)
    else:
        setattr(options, name, value if name == "device" else (value or None))


def clip_paths(items: list[str]) -> list[Path]:
    """The video files named, folders expanded (sorted); a missing path, an empty folder or two
    clips of one name are UserErrors."""
    paths = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
            if not found:
                raise UserError(f"{item}: a folder without video files ({', '.join(VIDEO_SUFFIXES)})")
            paths += found
        elif path.exists():
            paths.append(path)
        else:
            raise UserError(f"{item}: no such file or folder")
    names = [p.name for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"two clips named {twice[0]}: the scores are keyed by file name")
    return paths


def score(command: Command, evaluator: Evaluator, items: list[str], strips: Strips | None) -> dict:
    """The scores of the clips of `items` (or, for a single .json, the scores it holds)."""
    if len(items) == 1 and items[0].endswith(".json") and Path(items[0]).is_file():
        return _earlier_run(items[0])
    paths = clip_paths(items)
    references = {}
    if command.prompts is not None:
        references, notes = pair(read_prompt_rows(command.prompts), [p.name for p in paths])
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    return evaluator.run(paths, references, on_clip=strips)


def _earlier_run(path: str) -> dict:
    """The scores a run wrote with json= (not a compare's: its "clips" hold differences)."""
    try:
        scores = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(scores, dict) or not isinstance(scores.get("clips"), dict) or "delta" in scores:
        raise UserError(f"{path}: not the json= of a `python -m magitrain.eval CLIPS...` run")
    return scores


def compare(command: Command, evaluator: Evaluator) -> dict:
    """`{"a": scores, "b": scores, "clips": {name: {metric: b - a}}, "delta": {metric: CI},
    "unmatched": {"a_only": [...], "b_only": [...]}}`."""
    report = Path(command.report) if command.report else None
    sides = {}
    for tag, item in zip(("a", "b"), command.clips, strict=True):
        strips = Strips(report, f"_{tag.upper()}") if report else None
        sides[tag] = {"source": item, **score(command, evaluator, [item], strips), "strips": strips}
    a, b = sides["a"]["clips"], sides["b"]["clips"]
    both = sorted(set(a) & set(b))
    result = {
        "a": {k: v for k, v in sides["a"].items() if k != "strips"},
        "b": {k: v for k, v in sides["b"].items() if k != "strips"},
        "clips": {name: _differences(a[name], b[name]) for name in both},
        "delta": paired_deltas(a, b),
        "unmatched": {"a_only": sorted(set(a) - set(b)), "b_only": sorted(set(b) - set(a))},
    }
    if report:
        links = [sides[t]["strips"].links if sides[t]["strips"] else {} for t in ("a", "b")]
        write_compare_report(report, result, *links)
    return result


def _differences(a: dict, b: dict) -> dict:
    return {k: b[k] - v for k, v in a.items() if is_number(v) and is_number(b.get(k))}


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(help_text())
        return 0
    command = parse(argv)
    evaluator = Evaluator(command.options)
    if command.compare:
        result = compare(command, evaluator)
        rows = [*result["a"]["clips"].values(), *result["b"]["clips"].values()]
        summary = _summary(result["delta"], "B - A")
    else:
        report = Path(command.report) if command.report else None
        strips = Strips(report) if report else None
        result = score(command, evaluator, command.clips, strips)
        if report:
            write_report(report, result, strips.links)
        rows = list(result["clips"].values())
        summary = _summary(result["aggregate"], "mean")
    failed = sum("error" in row for row in rows)
    if command.json:
        Path(command.json).parent.mkdir(parents=True, exist_ok=True)
        Path(command.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(summary)
        print(f"wrote {command.json}")
    else:
        print(json.dumps(result, indent=2))
    if command.report:
        print(f"wrote {command.report}")
    skipped = sum("skipped" in row for row in rows)
    if skipped:
        print(f'{skipped} clip(s) skipped a metric: see their "skipped"', file=sys.stderr)
    if failed:
        print(f'{failed} clip(s) failed: see their "error"', file=sys.stderr)
    return 1 if failed else 0


def _summary(stats: dict, label: str) -> str:
    width = max([len(m) for m in stats] + [6])
    lines = [f"{'metric':<{width}}  {label} [95% CI]  n"]
    for metric, s in stats.items():
        low, high = s["ci95"]
        lines.append(f"{metric:<{width}}  {_fmt(s['mean'])} [{_fmt(low)}, {_fmt(high)}]  {s['n']}")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


if __name__ == "__main__":
    with command_line(lightning=False):
        code = main(sys.argv[1:])
    sys.exit(code)
