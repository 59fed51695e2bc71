"""The two exceptions of the codec library: :class:`CodecError` (a payload, or an input to encode,
is malformed or unsupported) and :class:`SpecError` (a codec spec string or config is invalid).
Both are ``ValueError`` subclasses; their messages name the bad part."""

from __future__ import annotations

__all__ = ["CodecError", "SpecError"]


class CodecError(ValueError):
    """A payload (or an input to encode) is malformed or unsupported; the message says what."""


class SpecError(ValueError):
    """A codec spec string (or config) is invalid; the message names the bad part."""
