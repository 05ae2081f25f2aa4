"""The trainer's user-facing error types (one line on stderr, exit status 2)."""


class UserError(ValueError):
    """A mistake the user can fix (bad flag, teacher, data): the CLI prints one line, exits non-zero."""


class DataError(UserError):
    """A data source the trainer cannot use."""
