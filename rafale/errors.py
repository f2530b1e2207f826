"""The one exception type for mistakes in the user's input.

Anything raised as `UserError` is printed by the CLI as a single line (no traceback) and exits
with code 2. Internal invariants use `assert`; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message names it and says how."""
