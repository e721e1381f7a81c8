class CheckpointError(ValueError):
    """A checkpoint file could not be read or does not fit the model."""
