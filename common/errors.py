"""One-line errors: what the command-line tools print after `error:`."""
from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An exception as one line of text (library errors are often paragraphs; an exception
    without a message is named by its type)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
