"""The trainer's user-facing error types (one line on stderr, exit status 2)."""

import errno

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class UserError(ValueError):
    """A mistake the user can fix (bad flag, teacher, data): the CLI prints one line, exits non-zero."""


class DataError(UserError):
    """A data source the trainer cannot use."""


def disk_full(error):
    """Whether `error` is a write that failed for want of disk space: an OSError with ENOSPC / EDQUOT, or another
    library's error carrying the OS's code in its text (safetensors: 'No space left on device (os error 28)')."""
    if isinstance(error, OSError):
        return error.errno in DISK_FULL
    return any(f"(os error {code})" in str(error) for code in DISK_FULL)
