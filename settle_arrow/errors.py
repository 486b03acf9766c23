"""Error kinds the CLI turns into one-line messages and exit codes (never tracebacks).

UserError: the input, reference data, TARGET or options are wrong: exit 2.
SelfCheckError: an invariant failed; the window was not committed: exit 3.
StorageError: the TARGET's database failed mid-run (e.g. a dropped connection): exit 4.
"""


class UserError(ValueError):
    """Something the user can fix: a path, a file, a TARGET, reference data, an option."""


class SelfCheckError(RuntimeError):
    """An invariant does not hold: the window is not committed."""


class StorageError(RuntimeError):
    """The TARGET's database failed during a run (connection lost, server shut down): exit 4.

    Nothing of the window in progress was committed; running the same command again
    continues where the database stands."""
