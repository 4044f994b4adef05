"""One record per start of a run, and resuming a run from its directory alone.

Hydra writes each start's composed config, its overrides and its Hydra config to
`<run dir>/starts/<date_time>/` (conf/hydra/default.yaml), so no start overwrites an earlier
one's record. `python train.py hydra.run.dir=RUN ckpt_path=last [overrides]` then restores the
command line of the run's latest complete start (its config has no missing `???` value) and
applies the new overrides on top, key by key: resuming needs neither the recipe nor the data
arguments again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

STARTS = "starts"


def _value(args: list[str], key: str) -> str | None:
    found = [a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")]
    return found[-1] if found else None


def latest_complete_start(run_dir: Path) -> Path | None:
    """The newest `starts/*` record whose composed config has every mandatory value."""
    for record in sorted((run_dir / STARTS).glob("*"), reverse=True):
        config, overrides = record / "config.yaml", record / "overrides.yaml"
        if config.is_file() and overrides.is_file() and not _has_missing(OmegaConf.load(config)):
            return record
    return None


def _has_missing(cfg) -> bool:
    """A `???` anywhere, without resolving interpolations (`${hydra:...}` needs a running Hydra)."""
    keys = range(len(cfg)) if isinstance(cfg, ListConfig) else cfg.keys()
    for key in keys:
        if OmegaConf.is_missing(cfg, key):
            return True
        node = cfg._get_node(key)
        if isinstance(node, DictConfig | ListConfig) and not node._is_interpolation() and _has_missing(node):
            return True
    return False


def with_restored_overrides(args: list[str]) -> list[str]:
    """`args` of `train.py`, preceded by the run's own overrides when it resumes a run directory."""
    run_dir, ckpt_path = _value(args, "hydra.run.dir"), _value(args, "ckpt_path")
    if not run_dir or ckpt_path in (None, "null") or any(a.startswith("-") for a in args):
        return args
    record = latest_complete_start(Path(run_dir))
    if record is None:
        return args
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = [a for a in args if "=" in a or a.startswith("~")]
    new_keys = {o.key_or_group for o in parser.parse_overrides(given)}
    saved = [str(o) for o in OmegaConf.load(record / "overrides.yaml")]
    kept = [o.input_line for o in parser.parse_overrides(saved) if o.key_or_group not in new_keys]
    print(f"resuming {run_dir}: the overrides of {record} ({len(kept)} kept) + {given}", file=sys.stderr)
    return [*kept, *args]
