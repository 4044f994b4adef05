"""Errors a user causes: a bad config value, a missing, corrupt or mismatched file.

Raise `UserError` with a message that names the file, key or field and says what to do. The
command-line entry points (train.py, infer.py, the export and data tools) print such an error in
a few lines and exit non-zero; a full traceback comes only with HYDRA_FULL_ERROR=1 or --verbose.
"""


class UserError(Exception):
    """An error in what the user asked for, reported without a traceback."""
