"""The one exception type for bad input: a one-line message naming the problem and the fix.

`launch.py` prints the message of a `UserError` (no traceback) and exits with status 2; it does
the same for a full disk (`is_disk_full`), which reaches it as whatever exception the writer
(Python, orbax, TensorStore, numpy, matplotlib) raised.
"""

import errno


class UserError(Exception):
    """Bad input from the user (config, data files, workdir): the message says what and how to fix."""


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an exception it was raised from, says the disk (or quota) is full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
