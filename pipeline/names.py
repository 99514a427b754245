"""Names under the output root: an interview's folder, from its file id and a readable slug.

Below everything else (the job store names a file's folder when it registers it), so it imports
nothing of the pipeline.
"""

from __future__ import annotations

import os
import re
import unicodedata

# A folder's readable part: at most this many UTF-8 bytes (a Hebrew letter takes 2, a CJK one 3; an
# ASCII name keeps its 40 characters as before), far below every file system's 255-byte name limit.
MAX_SLUG_BYTES = 40


class UnsafePathError(ValueError):
    """An output path would land outside the output root."""


def slugify(name: str, max_bytes: int = MAX_SLUG_BYTES) -> str:
    """The letters and digits of ``name``'s stem in every script (NFC, lower case), each run of
    anything else one ``-``; at most ``max_bytes`` of UTF-8, cut between characters.

    Only letters, digits (with their combining marks) and ``-`` remain, so no character is reserved
    on Windows, macOS or Linux (``<>:"/\\|?*``, control and bidi characters, a lone surrogate of an
    undecodable name), and the slug never ends in a dot or a space."""
    stem = unicodedata.normalize("NFC", os.path.splitext(os.path.basename(name))[0])
    kept: list[str] = []
    for ch in stem:
        category = unicodedata.category(ch)
        if category[0] in "LN" or (category[0] == "M" and kept and kept[-1] != "-"):
            kept.append(ch.lower())
        elif kept and kept[-1] != "-":
            kept.append("-")
    slug = unicodedata.normalize("NFC", "".join(kept)).strip("-")
    cut, size = 0, 0
    for index, ch in enumerate(slug):
        size += len(ch.encode("utf-8"))
        if size > max_bytes:
            break
        cut = index + 1
    return slug[:cut].strip("-")


def display_path(path: str | bytes | os.PathLike) -> str:
    """A printable, single-line form of any path for a message or a report: undecodable bytes and
    control characters escaped, so a hostile file name cannot forge or split a line."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def folder_name(file_id: str, original_name: str = "") -> str:
    """``<file_id>`` or ``<file_id>-<slug>``: unique by the id, readable by the slug. It starts with
    the hex id, so it is never a reserved Windows device name (``CON``, ``NUL``, ``COM1`` ...).

    A file's folder is chosen once, when it is registered, and stored with it: a change of this
    naming renames no existing folder."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", file_id):
        raise UnsafePathError(f"not a file id: {file_id!r}")
    slug = slugify(original_name)
    return f"{file_id}-{slug}" if slug else file_id
