"""``zstd[:level]`` — lossless Zstandard over the whole raw body (the header stays uncompressed).

Why zstd (the ``zstandard`` package): at the same speed it compresses better than zlib and
decompresses several times faster; it is the maintained reference implementation (Facebook/Meta,
RFC 8878) with a well-kept Python binding, and its frames carry their content size, which lets the
decoder bound memory before decompressing. Level 3 (zstd's default) is the default here; ``zstd:N``
with N in -7..22 picks another (negative = faster, higher = smaller).

Layer layout: ``varint raw_length`` then one zstd frame (with its content size) filling the rest.
Decoding checks ``raw_length`` against an upper bound computed from the header shapes, requires the
frame's declared content size to equal it and caps the window size, all before decompressing; it
then decompresses in one shot into a single buffer of exactly ``raw_length`` bytes
(``max_output_size``; zstd fails instead of writing past it), rejects trailing bytes after the
frame, and wraps every zstd error in CodecError. ``max_expansion`` (the decoder's memory contract,
``payload.py``): 32 per zstd stage.
"""

from __future__ import annotations

import re

from .codec import LosslessCodec, register
from .errors import CodecError, SpecError

__all__ = ["Zstd"]

DEFAULT_LEVEL = 3
_MAX_WINDOW = 1 << 27
MAX_RATIO = 32.0  # legitimate raw / compressed; float data compresses far less


def _zstd():
    try:
        import zstandard
    except ImportError as err:  # pragma: no cover - zstandard is a dependency
        raise SpecError("the zstd stage needs the 'zstandard' package") from err
    return zstandard


@register
class Zstd(LosslessCodec):
    """Zstandard compression of the encoded body."""

    codec_id = "zstd"

    def __init__(self, level: int = DEFAULT_LEVEL):
        if isinstance(level, bool) or not isinstance(level, int) or not -7 <= level <= 22:
            raise SpecError(f"zstd level must be an integer in -7..22, got {level!r}")
        _zstd()
        self.level = level

    @classmethod
    def from_args(cls, args):
        if not args:
            return cls()
        if len(args) != 1 or not re.fullmatch(r"-?[0-9]+", args[0]):
            raise SpecError("zstd takes one optional integer level, e.g. zstd:9")
        return cls(int(args[0]))

    def spec_part(self):
        return "zstd" if self.level == DEFAULT_LEVEL else f"zstd:{self.level}"

    def get_config(self):
        return {"id": self.codec_id, "level": self.level}

    @classmethod
    def from_config(cls, cfg):
        cls.check_config_keys(cfg, ("level",))
        return cls(cfg.get("level", DEFAULT_LEVEL))

    def max_expansion(self):
        return MAX_RATIO

    def encode_bytes(self, data):
        z = _zstd()
        return z.ZstdCompressor(level=self.level, write_content_size=True).compress(data)

    def max_encoded_size(self, raw_len):
        return raw_len + (raw_len >> 7) + 1024  # >= ZSTD_compressBound(raw_len)

    def decode_bytes(self, data, raw_len):
        z = _zstd()
        try:
            params = z.get_frame_parameters(data)
        except z.ZstdError as err:
            raise CodecError(f"zstd: bad frame header ({err})") from None
        if params.content_size != raw_len:
            raise CodecError(f"zstd frame declares {params.content_size} bytes, layer header "
                             f"says {raw_len}")
        if params.window_size > _MAX_WINDOW:
            raise CodecError(f"zstd window of {params.window_size} bytes is too large")
        dctx = z.ZstdDecompressor(max_window_size=_MAX_WINDOW)
        try:
            if raw_len == 0:  # one-shot returns b"" unread here; zstd streams nothing past 0
                dobj = dctx.decompressobj()
                out = dobj.decompress(data)
                if not dobj.eof:
                    raise CodecError("zstd: truncated frame")
                if dobj.unused_data:
                    raise CodecError(f"zstd: {len(dobj.unused_data)} trailing bytes after the "
                                     "frame")
            else:  # exactly one buffer of raw_len bytes
                out = dctx.decompress(data, max_output_size=raw_len, allow_extra_data=False)
        except z.ZstdError as err:
            msg = str(err)
            if "unused data" in msg:
                raise CodecError(f"zstd: trailing bytes after the frame ({msg})") from None
            if "full frame" in msg:
                raise CodecError(f"zstd: truncated frame ({msg})") from None
            raise CodecError(f"zstd: corrupt data ({msg})") from None
        if len(out) != raw_len:
            raise CodecError(f"zstd produced {len(out)} bytes, expected {raw_len}")
        return out
