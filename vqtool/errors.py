"""The exceptions the CLI turns into one line and an exit status instead of a traceback.

Kept free of heavy imports: `vqtool --help` loads this module and must not load torch.
"""

from __future__ import annotations

import signal


class VqtoolError(Exception):
    """A problem the user can fix (bad input, missing file, mismatched artifacts).

    The message must be one line that names the file or option at fault and what to do.
    """


class Interrupted(Exception):
    """Raised by the CLI layer after a clean stop on a signal; the process exits with 128 + the signal's
    number, as a shell reports a process the signal killed: 130 for Ctrl-C (SIGINT), 143 for SIGTERM."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.exit_status = 128 + int(signum if signum is not None else signal.SIGINT)
