"""Reading the user's text files (seeds, evaluation tasks, ratings): one UTF-8 rule and one error
shape, `<file>:<line>: ...`, for every file format."""

from __future__ import annotations

from pathlib import Path


def decode_utf8(path: Path, data: bytes, error: type[Exception], encoding: str = "utf-8") -> str:
    """`data` (the bytes of `path`) as text, or `error` naming the file and the line of the first
    byte that is not UTF-8 (`utf-8-sig` also drops a byte-order mark)."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
