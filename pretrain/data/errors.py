class DataError(ValueError):
    """Data that cannot feed a run; the message is a single line naming the file, key or setting."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors are often paragraphs)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
