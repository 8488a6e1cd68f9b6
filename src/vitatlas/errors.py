"""The one exception type users see.

Every problem a user can fix (bad input, a missing file, a wrong argument) is raised as a
``VitatlasError`` whose message is one line saying what was wrong and what to do. The CLI prints it
as ``error: <message>`` and exits with status 2 instead of showing a traceback.

``OptionError`` is the ``VitatlasError`` for a bad option value (wrong type, out of range, an
impossible combination). It is also a ``ValueError``, so code that guards option parsing with
``except ValueError`` (as scikit-learn users do) catches it too.
"""


class VitatlasError(Exception):
    """A user-facing error with a one-line, actionable message."""

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # keep it one line whatever the caller built
        super().__init__(message)


class OptionError(VitatlasError, ValueError):
    """A learner or command option with a wrong type, value or combination (one line)."""
