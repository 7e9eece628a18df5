"""Files a reader never sees half-written, even with two study processes writing the same report.

Each writer fills its own temporary file (named by its pid, so two processes never share one) and
renames it over the target: a reader sees the old file or the new one, and when two processes write
the same report at once the last rename wins with a whole file.
"""
import contextlib
import json
import os


@contextlib.contextmanager
def replacing(path: str):
    """Yield a temporary path to write; it replaces ``path`` when the block ends without an error."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    root, ext = os.path.splitext(name)
    # hidden, so that a glob of the folder's *.json never reads it; the extension kept, because
    # matplotlib picks the image format from it
    tmp = os.path.join(folder, f".{root}.tmp{os.getpid()}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str):
    with replacing(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON, written like ``write_text`` (every result and cell file)."""
    write_text(path, json.dumps(obj, indent=2))
