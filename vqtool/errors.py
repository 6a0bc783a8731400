"""The one exception type the CLI turns into a single red line instead of a traceback."""


class VqtoolError(Exception):
    """A problem the user can fix (bad input, missing file, mismatched artifacts).

    The message must be one line that names the file or option at fault and what to do.
    """
