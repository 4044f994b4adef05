"""Bad-input accounting in the main process: counts per reason, example keys, and the stop rule.

Workers skip and log each bad sample (with its key and shard) and report it in the next batch's
`_data`; this tracker sums those reports per rank and stops the run with a clear error once the
bad fraction exceeds `data.max_bad_fraction` (after `data.bad_check_after` samples, so one bad
clip early on is not a 100% rate). Samples kept with a fix (a clip without audio whose audio loss
is masked, a track padded with silence) are counted separately as notes and are not bad; samples
the policies leave out of the plan (`unplanned`, counted once at start-up) are not bad either.
"""

import logging
from collections import Counter

log = logging.getLogger(__name__)
EXAMPLES_PER_REASON = 5
Report = tuple[str, ...]  # (key, shard url, reason[, detail]): a bad sample or a note


class BadDataError(RuntimeError):
    """Too much of the input is unusable: a data problem to fix, not something to train through."""


class BadInputTracker:
    def __init__(self, max_fraction: float, check_after: int):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction, self.check_after = max_fraction, check_after
        self.counts: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.seen = 0
        self.unplanned = ""  # the dataset's summary of samples left out of the plan, and why

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    def update(self, bad: list[Report], notes: list[Report], seen: int) -> None:
        self.seen += seen
        self.notes.update(note[2] for note in notes)
        for key, url, reason, *detail in bad:
            self.counts[reason] += 1
            examples = self.examples.setdefault(reason, [])
            if len(examples) < EXAMPLES_PER_REASON:
                examples.append(f"{url}:{key}" + (f" ({detail[0][:300]})" if detail and detail[0] else ""))
        if self.seen >= self.check_after and self.bad > self.max_fraction * self.seen:
            raise BadDataError(
                f"{self.bad} of {self.seen} samples were bad ({self.bad / self.seen:.1%}), over "
                f"data.max_bad_fraction={self.max_fraction}: {self.summary()}"
            )

    def summary(self) -> str:
        bad = "; ".join(
            f"{reason}: {n} (e.g. {', '.join(self.examples[reason])})"
            for reason, n in self.counts.most_common()
        )
        kept = ", ".join(f"{reason}: {n}" for reason, n in self.notes.most_common())
        return (
            (bad or "no bad samples")
            + (f"; kept with a fix: {kept}" if kept else "")
            + (f"; not planned: {self.unplanned}" if self.unplanned else "")
        )

    def state_dict(self) -> dict:
        return {
            "counts": dict(self.counts),
            "notes": dict(self.notes),
            "examples": self.examples,
            "seen": self.seen,
        }

    def load_state_dict(self, state: dict) -> None:
        self.counts, self.notes = Counter(state["counts"]), Counter(state["notes"])
        self.examples, self.seen = dict(state["examples"]), state["seen"]
