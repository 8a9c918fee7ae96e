"""The one exception type for mistakes a user can fix (bad paths, bad files, bad options).

The command line prints it as a single red line and exits with status 1; anything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, stated in one line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the user runs to go on (when it is not the same command again)."""

    def __init__(self, hint: str) -> None:
        super().__init__(hint)
        self.hint = hint
