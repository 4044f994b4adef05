"""One record per start of a run, and resuming a run from its directory alone.

Hydra writes each start's composed config, its overrides and its Hydra config to
`<run dir>/starts/<date_time>/` (conf/hydra/default.yaml), so no start overwrites an earlier
one's record. `python train.py hydra.run.dir=RUN ckpt_path=last [overrides]` then restores the
command line of the run's latest complete start (its config has no missing `???` value) and
applies the new overrides on top, key by key: resuming needs neither the recipe nor the data
arguments again. A restored override that names code to instantiate (`_target_`, `hydra.*`) is
refused: the current command must give it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from magitrain.errors import UserError

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
    for line in kept:
        _refuse_code(line, record / "overrides.yaml")
    print(f"resuming {run_dir}: restoring {kept} from {record}, then {given}", file=sys.stderr)
    return [*kept, *args]


def _refuse_code(override: str, source: Path) -> None:
    """A restored override may select the project's options and set values, never choose code.

    A `_target_` (in the key or anywhere in the value) is what Hydra instantiates, and `hydra.*`
    keys (searchpath) can bring in config files that hold one: a run directory is data, and
    whoever can write into it must not pick what `train.py` runs.
    """
    key = override.split("=", 1)[0].lstrip("+~")
    if "_target_" in override or key.startswith("hydra.") or key.startswith("hydra/"):
        raise UserError(
            f"{source}: the restored override {override!r} chooses code to instantiate; "
            "resuming restores only options and values. Give it on the command line if you mean it"
        )
