"""The wire format: one framed, optionally compressed message of a JSON envelope and raw
tensor buffers. `format.py` holds the constants and tables, `encode.py` writes a message and
`decode.py`, the strict parser of untrusted bytes, reads one."""

from .decode import decode_message
from .encode import check_tensor, encode_message
from .format import FLAG_ZSTD, FORMAT_VERSION, MAGIC, Message

__all__ = ["FLAG_ZSTD", "FORMAT_VERSION", "MAGIC", "Message", "check_tensor", "decode_message", "encode_message"]
