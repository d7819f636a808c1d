"""How commands quote an error they turn into one line of their own: its first line (with its type, by default).

Library errors (a Hub client's, PyYAML's, transformers') often run to many lines; a command's message names
what it was doing and quotes only this much of the cause.
"""

from __future__ import annotations


def first_line(error: BaseException, with_type: bool = True) -> str:
    """`"OSError: <first line>"` (or just the first line); the type alone when the message is empty."""
    lines = str(error).strip().splitlines()
    if not with_type:
        return lines[0] if lines else type(error).__name__
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
