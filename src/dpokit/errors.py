"""The one exception type for user errors (bad data, bad config, bad paths).

The CLI turns a UserError into a single line `error: ...` on stderr and exit code 2; any other
exception is a bug in dpokit and keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user gave us, explained in one line."""


def where(path, row=None, field=None) -> str:
    """`file:row: field 'x'` prefix for data errors. Rows are 1-based, as a user counts lines."""
    s = str(path)
    if row is not None:
        s += f": row {row}"
    if field is not None:
        s += f": field '{field}'"
    return s


class Interrupted(Exception):
    """Training stopped on SIGINT / SIGTERM after writing a checkpoint (not an error: exit 130 / 143)."""

    def __init__(self, signame, checkpoint):
        super().__init__(f"stopped by {signame}; checkpoint saved to {checkpoint}; "
                         f"run the same command with resume=auto to continue")
        self.exit_code = 130 if signame == "SIGINT" else 143
