"""The two errors of the secure-aggregation protocol."""


class SecAggError(ValueError):
    """A protocol message or parameter is malformed or inconsistent (the message is dropped,
    with this as its reason)."""


class RecoveryError(SecAggError):
    """The sum cannot be unmasked: too few nodes are left to reconstruct a dropped node's mask
    key or a survivor's self-mask seed (more than n − t dropouts in a neighbourhood)."""
