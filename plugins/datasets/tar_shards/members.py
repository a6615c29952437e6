"""Reading WebDataset-style tar shards member by member, without extracting anything to disk.

A shard is a tar (or gzip-compressed tar) whose members are grouped into samples by a key: the
member name up to its suffixes (``SEQ.FRAME.rgb.png`` and ``SEQ.FRAME.keypoints.pkl`` share the
key ``SEQ.FRAME``). Members are only ever read into memory; still, a member whose name could point
outside a folder (absolute, or with ``..``) or that is not a regular file (a symbolic or hard link,
a device, a FIFO) is refused by name, because such members are what a planted archive is made of
and a tool that unpacks the shard later would follow them.
"""
from __future__ import annotations

import gzip
import os
import pathlib
import tarfile
import zlib
from typing import Iterator

from handforge.errors import DataError

# What a truncated or damaged shard raises somewhere in the middle of a read.
READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError)


def unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why ``member`` is refused, or None for a regular file (directories: see :func:`iter_members`)."""
    name = member.name
    path = pathlib.PurePosixPath(name)
    if name.startswith(("/", "\\")) or pathlib.PureWindowsPath(name).drive:
        return "an absolute path"
    if ".." in path.parts or ".." in pathlib.PureWindowsPath(name).parts:
        return "a '..' path component"
    if member.issym() or member.islnk():
        return f"a link (to {member.linkname!r})"
    if member.ischr() or member.isblk() or member.isfifo():
        return "a device or FIFO"
    if not member.isfile():
        return f"not a regular file (tar type {member.type!r})"
    return None


class UnsafeMember(DataError):
    """A member refused by :func:`unsafe_reason`; the message names the member and the shard."""


def iter_members(shard, wanted=None) -> Iterator[tuple[str, bytes | None, UnsafeMember | None]]:
    """``(name, data, refusal)`` for each member of ``shard`` in archive order, streamed.

    ``data`` is the member's bytes when ``wanted(name)`` is true (all members without ``wanted``),
    else None (not read: the stream skips it). A refused member comes with ``refusal`` set and no
    data, so the caller decides whether it stops or counts. Directories are passed over. A shard that
    cannot be opened or breaks off midway raises :class:`DataError` naming it, after the members read
    before the damage were yielded."""
    shard = pathlib.Path(shard)
    try:
        # "r|*": a forward-only stream (plain or compressed): nothing is seeked, nothing extracted.
        with open(shard, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                reason = unsafe_reason(member)
                if reason is not None:
                    yield member.name, None, UnsafeMember(f"{shard}: member {member.name!r} is {reason}; refused")
                    continue
                if wanted is not None and not wanted(member.name):
                    yield member.name, None, None
                    continue
                stream = tar.extractfile(member)
                yield member.name, stream.read(), None
    except FileNotFoundError:
        raise DataError(f"{shard}: shard not found") from None
    except READ_ERRORS as exc:
        raise DataError(f"{shard}: damaged or not a tar shard ({type(exc).__name__}: {exc})") from None


def split_key(name: str, key_parts: int) -> tuple[str, str]:
    """``("SEQ.FRAME", "rgb.png")`` for ``SEQ.FRAME.rgb.png`` with ``key_parts = 2``: the key is the
    base name's first ``key_parts`` dot-separated parts (with the member's folder, if any), the rest
    is the suffix that says what the member holds."""
    folder, _, base = name.rpartition("/")
    parts = base.split(".")
    key = ".".join(parts[:key_parts])
    return (f"{folder}/{key}" if folder else key), ".".join(parts[key_parts:])


def iter_groups(shard, key_parts: int, wanted_suffix, on_refused) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {suffix: bytes})`` for each run of consecutive members sharing a key (WebDataset
    writes a sample's members together). Only suffixes ``wanted_suffix(suffix)`` accepts are read;
    ``on_refused(UnsafeMember)`` is called for each refused member (it raises or counts)."""
    key, group = None, {}

    def wanted(name):
        return wanted_suffix(split_key(name, key_parts)[1])

    for name, data, refusal in iter_members(shard, wanted):
        if refusal is not None:
            on_refused(refusal)
            continue
        member_key, suffix = split_key(name, key_parts)
        if member_key != key:
            if key is not None and group:
                yield key, group
            key, group = member_key, {}
        if data is not None:
            group[suffix] = data
    if key is not None and group:
        yield key, group


def read_all(shard, on_refused, strip_suffix=True) -> dict[str, bytes]:
    """Every regular member of a small shard by name (without its last suffix when ``strip_suffix``):
    the per-sequence reference archives."""
    found = {}
    for name, data, refusal in iter_members(shard):
        if refusal is not None:
            on_refused(refusal)
            continue
        base = name.rpartition("/")[2]
        found[os.path.splitext(base)[0] if strip_suffix else base] = data
    return found


def index_members(shard, key_parts: int, wanted_suffix, on_refused) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """Like :func:`iter_groups`, but ``{suffix: (offset, size)}``: where each wanted member's bytes
    start in the (decompressed) shard, for reading one sample later with :class:`MemberReader`. A
    plain tar is scanned header by header (the data is seeked over); a compressed one is read once."""
    shard = pathlib.Path(shard)
    key, group = None, {}
    try:
        with tarfile.open(shard, mode="r:*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                reason = unsafe_reason(member)
                if reason is not None:
                    on_refused(UnsafeMember(f"{shard}: member {member.name!r} is {reason}; refused"))
                    continue
                member_key, suffix = split_key(member.name, key_parts)
                if member_key != key:
                    if key is not None and group:
                        yield key, group
                    key, group = member_key, {}
                if wanted_suffix(suffix):
                    group[suffix] = (member.offset_data, member.size)
    except FileNotFoundError:
        raise DataError(f"{shard}: shard not found") from None
    except READ_ERRORS as exc:
        raise DataError(f"{shard}: damaged or not a tar shard ({type(exc).__name__}: {exc})") from None
    if key is not None and group:
        yield key, group


class MemberReader:
    """Reads members by (offset, size) from shards kept open, one handle per shard and process
    (a handle is not shared with DataLoader workers: each opens its own after the fork)."""

    def __init__(self, limit: int = 16):
        self.limit, self.handles, self.pid = limit, {}, None

    def read(self, shard: pathlib.Path, offset: int, size: int) -> bytes:
        if self.pid != os.getpid():
            self.handles, self.pid = {}, os.getpid()
        handle = self.handles.get(shard)
        try:
            if handle is None:
                if len(self.handles) >= self.limit:
                    self.handles.pop(next(iter(self.handles))).close()
                compressed = shard.suffix in (".gz", ".tgz")
                handle = gzip.open(shard, "rb") if compressed else open(shard, "rb")
                self.handles[shard] = handle
            handle.seek(offset)
            data = handle.read(size)
        except READ_ERRORS as exc:
            self.handles.pop(shard, None)
            raise DataError(f"{shard}: cannot read the member at byte {offset} ({type(exc).__name__}: {exc})") from None
        if len(data) != size:
            raise DataError(f"{shard}: truncated member at byte {offset} ({len(data)} of {size} bytes)")
        return data

    def __getstate__(self):  # open files do not travel to worker processes
        return {"limit": self.limit, "handles": {}, "pid": None}
