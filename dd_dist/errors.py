"""The one exception type for mistakes a user can make (bad key, path, shape, manifest).

The CLI prints such an error as one line and exits 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; str(error) is the one line shown to them."""
