"""Reading the user's text files (seeds, evaluation tasks, ratings): one UTF-8 rule and one error
shape, `<file>:<line>: ...`, for every file format."""

from __future__ import annotations

import codecs
from pathlib import Path


def decode_utf8(path: Path, data: bytes, error: type[Exception], skip_bom: bool = False) -> str:
    """`data` (the bytes of `path`) as text, or `error` naming the file, the line and the byte
    offset of the first byte that is not UTF-8. `skip_bom` drops a leading byte-order mark (the
    offsets still count it, so they point into the file as it is)."""
    start = len(codecs.BOM_UTF8) if skip_bom and data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data[:offset].count(b"\n") + 1
        raise error(f"{path}:{line}: not valid UTF-8 ({exc.reason} at byte {offset})") from None
