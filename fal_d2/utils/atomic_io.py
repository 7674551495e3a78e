"""Atomic file writes: write a temp file in the target's directory, then ``os.replace`` it.

A reader (TensorBoard, a script watching OUTPUT_DIR, a resumed run) then sees either the old file
or the complete new one, never a half-written file, even if the writer is killed mid-write.
The temp file must live in the same directory because ``os.replace`` is only atomic within one
filesystem. Paths are local filesystem paths (no iopath/PathManager URLs).
"""
import contextlib
import io
import json
import os
import secrets

__all__ = ["atomic_path", "atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_save_figure"]


@contextlib.contextmanager
def atomic_path(path):
    """A temp path beside ``path`` for writers that need a file name rather than a file object
    (``cv2.VideoWriter``, a config that must load before it is kept): on a clean exit the file is
    synced and replaces ``path``; on an exception it is removed. The temp name keeps the extension,
    from which such writers pick the format, and starts with a dot. The directory must exist."""
    directory, name = os.path.split(os.path.abspath(path))
    stem, extension = os.path.splitext(name)
    tmp_path = os.path.join(directory, f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{extension}")
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())  # the rename must not reach the disk before the data does
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


@contextlib.contextmanager
def atomic_open(path):
    """A binary file to write ``path`` through (:func:`atomic_path`): a killed writer leaves at
    most a hidden temp file, never a partial file under the real name. Streams, so a large file
    (a checkpoint) is never held in memory."""
    with atomic_path(path) as tmp_path:
        # os.open with mode 0o666 lets the umask decide permissions, as open() would for the target.
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            yield f


def atomic_write_bytes(path, data):
    """Replace the file at ``path`` with ``data`` (bytes) atomically; the directory must exist."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path, text, encoding="utf-8"):
    """Replace the file at ``path`` with ``text`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path, obj, indent=2):
    """Replace the file at ``path`` with ``obj`` serialised as JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_save_figure(fig, path, **kwargs):
    """``fig.savefig(path, **kwargs)``, atomically; the extension sets the format unless given."""
    extension = os.path.splitext(path)[1][1:].lower()
    kwargs.setdefault("format", extension or None)
    buffer = io.BytesIO()
    fig.savefig(buffer, **kwargs)
    atomic_write_bytes(path, buffer.getvalue())
