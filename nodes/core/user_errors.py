"""User errors in ComfyUI's log: one line each, not a traceback.

When a node raises, ComfyUI's executor logs "!!! Exception during processing !!!"
with the message, then the whole traceback, both through the root logger and
while it handles the exception. For a ``GuidanceInputError`` (bad input, with a
message that says what to change) the traceback says nothing to the user, so a
filter on the root logger drops that one record while such an error is being
handled; the message line, the error dialog and every other record are kept.
"""

from __future__ import annotations

import logging
import sys

from ...guidance import GuidanceInputError

_TRACEBACK = "Traceback (most recent call last)"


class _DropUserErrorTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        handling = sys.exc_info()[1]
        if not isinstance(handling, GuidanceInputError):
            return True
        return not (isinstance(record.msg, str) and record.msg.startswith(_TRACEBACK))


_FILTER = _DropUserErrorTraceback()


def log_user_errors_as_one_line() -> None:
    """Install the filter on the root logger, once."""
    root = logging.getLogger()
    if _FILTER not in root.filters:
        root.addFilter(_FILTER)
