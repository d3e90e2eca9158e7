"""Errors a user can act on: each message names the file or field at fault."""


class ModserveError(Exception):
    """Bad input or state the user can fix; the CLI prints it and exits non-zero."""


class CheckpointError(ModserveError):
    """A checkpoint directory or file is missing, malformed, or not safetensors."""


class PlanError(ModserveError):
    """A layer-swap plan does not fit the model (field named in the message)."""


class PackError(ModserveError):
    """A block pack is malformed, corrupted, or built for another resident."""
