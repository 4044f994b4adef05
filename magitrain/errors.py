"""Errors a user causes: a bad config value, a missing, corrupt or mismatched file.

Raise `UserError` with a message that names the file, key or field and says what to do. The
command-line entry points (train.py, infer.py, the export and data tools) print such an error in
a few lines and exit non-zero; a full traceback comes only with HYDRA_FULL_ERROR=1 or --verbose.
"""


class UserError(Exception):
    """An error in what the user asked for, reported without a traceback."""


def causes(err: BaseException):
    """`err` and every exception behind it: its causes and contexts, and each rank's failure that
    torch.distributed.checkpoint collected into a `CheckpointException`."""
    todo, seen = [err], set()
    while todo:
        found = todo.pop()
        if id(found) in seen:
            continue
        seen.add(id(found))
        yield found
        todo += [e for e in (found.__cause__, found.__context__) if e is not None]
        todo += [e for e, _trace in getattr(found, "failures", {}).values()]
