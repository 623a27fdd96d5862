"""Errors a user can act on. Each message says what is wrong and how to fix it."""


class BatchSDError(Exception):
    """Base class for errors reported to the user without a traceback."""


class InputError(BatchSDError, ValueError):
    """A request (row, argument, image) that cannot be run as given."""


class CheckpointError(BatchSDError):
    """A checkpoint that cannot be loaded: wrong layout, missing or mis-shaped tensors, unsafe pickle."""
