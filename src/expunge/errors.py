"""The one exception type users see: every message names the problem and the fix."""


class ExpungeError(ValueError):
    """Bad input or a damaged run directory. Raised before anything on disk changes."""
