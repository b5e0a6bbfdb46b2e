"""The one exception type for user errors (bad data, bad config, bad paths).

The CLI turns a UserError into a single line `error: ...` on stderr and exit code 2; any other
exception is a bug in dpokit and keeps its traceback.
"""


class UserError(ValueError):
    """A problem with what the user gave us, explained in one line."""


def where(path, row=None, field=None) -> str:
    """`file:row: field 'x'` prefix for data errors. Rows are 1-based, as a user counts lines."""
    s = str(path)
    if row is not None:
        s += f": row {row}"
    if field is not None:
        s += f": field '{field}'"
    return s


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT / SIGTERM (not an error: exit 130 / 143, as a shell reports a process
    those signals end). After the first signal a checkpoint was written (`checkpoint`); a second signal
    stops at once, without one (`at_once`).

    A KeyboardInterrupt, not an Exception: the `except Exception` that turns a failed save into an
    error must let an interrupt through, as it lets Ctrl-C through."""

    def __init__(self, signame, checkpoint=None, at_once=False):
        if at_once:
            text = (
                f"stopped at once by a second {signame}, without saving; run the same command with "
                f"resume=auto to continue from the last checkpoint"
            )
        elif checkpoint is not None:
            text = (
                f"stopped by {signame}; checkpoint saved to {checkpoint}; "
                f"run the same command with resume=auto to continue"
            )
        else:
            text = f"stopped by {signame} (this run writes no checkpoints)"
        super().__init__(text)
        self.exit_code = 130 if signame == "SIGINT" else 143
