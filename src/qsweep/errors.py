"""The one exception type whose message is shown to the user as a single line."""


class QsweepError(Exception):
    """A failure the user can fix; its message is one line that names the fix."""
