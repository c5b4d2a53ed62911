class DataError(ValueError):
    """Data that cannot feed a run; the message is a single line naming the file, key or setting."""

