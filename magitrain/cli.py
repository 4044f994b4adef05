"""What every command-line entry point runs inside: short user errors, each log line once, and no
third-party warnings that are wrong for this project.

    if __name__ == "__main__":
        with command_line():
            main()

train.py, infer.py, `python -m magitrain.export` and data_tools/*.py use it.

- Errors a user causes (`magitrain.errors.UserError`, a missing file, a checkpoint that does not
  match the model, a missing mandatory config value, a Hydra composition or override error) print
  as `error: ...` in a few lines and exit with status 2. `--verbose` or HYDRA_FULL_ERROR=1 shows
  the full traceback instead; any other exception keeps its traceback.
- Lightning adds its own console handler to the `lightning` logger, which also propagates to the
  root handler (Hydra's job logging or `logging.basicConfig`): every line would print twice.
- A few warnings and library log lines are filtered, each by its exact message (and module or
  logger), with the reason next to it. Nothing is silenced by category.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import warnings
from contextlib import contextmanager

from magitrain.errors import UserError

VERBOSE_FLAG = "--verbose"
# Decided once by the first process and inherited by the processes it starts (DDP ranks), which
# see HYDRA_FULL_ERROR=1 set by their parent below.
VERBOSE_ENV = "MAGITRAIN_VERBOSE"

# (message regex, module regex or "", why the warning is wrong for magitrain)
IGNORED_WARNINGS = (
    (
        r"Your `IterableDataset` has `__len__` defined",
        "",
        "ShardDataset's length is the exact number of batches of this rank's epoch: every worker "
        "takes its own batches of one precomputed plan (magitrain/data/plan.py), none twice",
    ),
    (
        r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a",
        "",
        "intended: the DataModule checks batches before the transfer, the module encodes raw media "
        "with its codecs after it; the two hooks do different jobs",
    ),
    (
        r"The number of training batches \(\d+\) is smaller than the logging interval",
        "",
        "Lightning logs every log_every_n_steps global steps across data epochs; short epochs (the "
        "CPU demo's 8 batches) lose no log line",
    ),
    (
        r"`torch\.nn\.utils\.weight_norm` is deprecated",
        r"torch\.nn\.utils\.weight_norm",
        "diffusers' AutoencoderOobleck (the audio VAE) builds its convolutions with it; not ours to change",
    ),
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "",
        "inside Lightning's own pytree helper with torch 2.11; nothing a user can act on",
    ),
    (
        r"The `srun` command is available on your system but is not used",
        "",
        "magitrain runs Slurm jobs through slurm/*.sbatch (cluster=slurm), which call srun; a command "
        "typed on a machine that has Slurm installed (a login node, the planner) is not a mistaken job",
    ),
    (
        r"Checkpoint directory .* exists and is not empty",
        "",
        "a fresh start into a checkpoint folder holding checkpoints is refused before Lightning starts "
        "(magitrain.launch.refuse_stale_checkpoints); the one that reaches here is a resume (ckpt_path=)",
    ),
)
# (logger name, start of the message, why the log line is wrong for magitrain): filtered by
# `_DropLines`, for lines that libraries log rather than warn
IGNORED_LOG_LINES = (
    (
        "diffusers.quantizers.torchao.torchao_quantizer",
        "Unable to import `torchao` Tensor objects",
        "diffusers registers torchao's tensor classes for loading torchao-serialised checkpoints and "
        "looks for classes torchao 0.18 moved; magitrain loads none (an fp8 LoRA base is quantised "
        "after loading bf16 weights)",
    ),
    (
        "lightning.pytorch.utilities.rank_zero",
        "💡 Tip: For seamless cloud logging",
        "an advertisement Lightning prints whenever LitLogger is not among the loggers",
    ),
    (
        "hydra.core.utils",
        "Error executing job with overrides",
        "the error follows as `error: ...` naming what to change (or its traceback); the overrides "
        "are the command just typed",
    ),
)


def _verbose() -> bool:
    if VERBOSE_FLAG in sys.argv[1:]:
        sys.argv.remove(VERBOSE_FLAG)
        os.environ[VERBOSE_ENV] = "1"
    if VERBOSE_ENV not in os.environ:
        os.environ[VERBOSE_ENV] = "1" if os.environ.get("HYDRA_FULL_ERROR") == "1" else "0"
    return os.environ[VERBOSE_ENV] == "1"


def user_message(err: BaseException) -> str | None:
    """The short report of an error the user caused, or None for any other error (a bug)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import MissingMandatoryValue

    from magitrain.checkpoint import CheckpointMismatchError

    seen = set()
    while err is not None and id(err) not in seen:  # Hydra's instantiate wraps the cause
        seen.add(id(err))
        if isinstance(err, MissingMandatoryValue):
            key = err.full_key or "a value"
            return f"{key} is not set (??? in the config): pass {key}=..."
        if isinstance(err, MissingConfigException):
            options = ", ".join(err.options or [])
            first = str(err).split("\n")[0]
            return first + (f"; choose one of: {options}" if options else "")
        unknown = unknown_key(err)
        if unknown:
            return unknown
        if isinstance(err, (OverrideParseException, ConfigCompositionException)):
            cause = f"\n{str(err.__cause__).splitlines()[0]}" if err.__cause__ is not None else ""
            return (str(err).split("\nConfig search path")[0].strip() + cause).strip()
        if isinstance(err, (UserError, FileNotFoundError, CheckpointMismatchError)):
            return str(err)
        err = err.__cause__ or err.__context__
    return None


def unknown_key(err: BaseException) -> str | None:
    """`unknown key trainer.max_step; did you mean trainer.max_steps?` for an override of a key the
    composed config does not have (Hydra's own advice, to append `+trainer.max_step`, hides a typo)."""
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__
    if not isinstance(err, ConfigCompositionException):
        return None
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or cause.full_key is None:
        return None
    parent = cause.parent_node
    siblings = [str(k) for k in parent.keys()] if hasattr(parent, "keys") else []
    close = difflib.get_close_matches(str(cause.key), siblings, n=1)
    prefix = cause.full_key.rpartition(".")[0]
    hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
    return f"unknown key {cause.full_key}{hint} (a new key is added with +{cause.full_key}=...)"


class _DropLines(logging.Filter):
    """Drops a logger's records that start with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def drop_log_lines() -> None:
    """Install the filters of IGNORED_LOG_LINES (once per logger, before the libraries log)."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, prefix, _why in IGNORED_LOG_LINES:
        by_logger[name] = (*by_logger.get(name, ()), prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(prefixes))


def route_lightning_logs() -> None:
    """Let Lightning's records reach the root handlers only (each line once, and into Hydra's log)."""
    import lightning  # noqa: F401  (its import adds the handlers removed here)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


@contextmanager
def command_line(lightning: bool = True):
    """Run an entry point's main: see the module docstring. `lightning=False`: an entry point that
    never imports Lightning (`python -m magitrain.eval`) does not pay the seconds of its import."""
    verbose = _verbose()
    # Hydra prints composition errors with its config search path and task errors with a
    # traceback; with HYDRA_FULL_ERROR=1 it raises them instead, so they are reported here once.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # Hydra's job logging replaces it
    drop_log_lines()
    if lightning and not {"-h", "--help"} & set(sys.argv[1:]):  # help answers without Lightning's import
        route_lightning_logs()
    with warnings.catch_warnings():
        for message, module, _why in IGNORED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, module=module)
        try:
            yield
        except Exception as err:
            message = None if verbose else user_message(err)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            print(f"(run with {VERBOSE_FLAG} or HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
            sys.exit(2)
