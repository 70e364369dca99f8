"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits with status 2."""


class DinomedError(Exception):
    """Bad input or a failed precondition, with a message that names the file or object, what was
    expected and what was found."""


class CheckpointError(DinomedError):
    """A checkpoint that cannot be loaded safely or does not fit the architecture."""


class InputImageError(DinomedError):
    """An image that is not what the operation needs (dimensionality, NaNs, geometry, channels)."""
