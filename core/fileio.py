"""Atomic file writes (readers see the old file or the new one, never half of one) and file hashes."""
import hashlib
import os
import tempfile
from pathlib import Path

# mkstemp creates files with mode 0600; finished files get the usual umask-based mode.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def update_digest(digest, path, chunk_size: int = 1 << 20):
    """Feed a file's bytes into a hashlib ``digest`` in chunks (large weight files stay out of memory)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest


def file_hash(path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's contents."""
    return update_digest(hashlib.new(algorithm), path).hexdigest()
