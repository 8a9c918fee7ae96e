"""The one exception type for mistakes a user can fix (bad paths, bad files, bad options).

The command line prints it as a single red line and exits with status 1; anything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, stated in one line."""
