class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or resumed; the message is a single line naming the path."""

