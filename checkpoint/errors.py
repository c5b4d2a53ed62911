class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or resumed; the message is a single line naming the path."""


def first_line(exc: BaseException) -> str:
    """An exception as one line of text (its type when it has no message)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
