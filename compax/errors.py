"""The one exception type for bad input: a one-line message naming the problem and the fix.

`launch.py` prints the message of a `UserError` (no traceback) and exits with status 2.
"""


class UserError(Exception):
    """Bad input from the user (config, data files, workdir): the message says what and how to fix."""
