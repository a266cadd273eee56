"""POSIX block store (UCM's `UcmNfsStore`): one file per block, shards packed, checked on load.

File `<root>/<id>.blk` = a header (4 KiB-aligned) followed by `num_shards` shards, each at a
4 KiB-aligned stride so that O_DIRECT can read any shard alone. Header (little-endian):

    magic "UCMKVBLK" | version u32 | header_size u32 | shard_stride u64 | block id 16 B |
    dtype name 16 B | num_shards u32 | ndim u32 | shape u64 x ndim | crc32c u32 x num_shards |
    crc32c of all the preceding header bytes u32 | zero padding to header_size

Why one file per block with every shard in it: a block is one lookup, one stat, one rename
and one eviction unit (per-shard files would multiply metadata operations by the number of
layers, which dominates on NFS), while the aligned stride still lets a layer be read alone.

Atomicity: shards are written into `.tmp.<id>.<host>.<scope>.<pid>.<rand>` in the same
directory (allocated at its final size with posix_fallocate: contiguous on disk, and a full disk
fails before any data is written); when the last shard lands the header with every checksum is
written and the file is `os.replace`d to its name. Readers therefore see nothing or a whole
block; concurrent writers of the same block hold the same bytes, and the last rename wins.
No fsync: after a power loss a renamed file may hold garbage, which the checksums turn into a
miss. Any failure before the rename removes the temp file.

Ownership: the store owns only what it created. Each directory gets a marker `.ucm-store`
naming this directory format; a marker of another format is refused. Blocks are exactly the
regular files named `<32 lowercase hex>.blk`: nothing else is read, touched, counted, evicted
or removed, and symbolic links are never followed (one under a block's name is a miss, left
alone). Temp files are exactly the names above; `<scope>` digests the host, its boot and the
PID namespace, so a sweep on open removes a temp only when it is provably ours and dead (same
scope, pid not alive) or untouched for a day (`STALE_TMP_S`; also names of the older
`.tmp.<id>.<host>.<pid>.<rand>` form, whose pid cannot be checked).

Eviction: `capacity` bytes over all roots. The mtime of a block file is its last use (loads
and repeated dumps touch it); when this process's running total crosses the capacity it scans
the directories (so other processes' blocks count) and unlinks the least recently used blocks
down to 90 % of the capacity, skipping blocks this process is loading. A reader in another
process keeps its open file after an unlink (POSIX semantics), so an eviction never tears a read.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import re
import secrets
import socket
import stat
import struct
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import numpy as np
import torch

from ucm.store.api import (
    BlockCorrupt,
    BlockId,
    BlockLayout,
    BlockMissing,
    KVStore,
    StoreError,
    StoreFull,
    check_id,
)

log = logging.getLogger("ucm.store")

MAGIC = b"UCMKVBLK"
VERSION = 2  # 1: zlib CRC-32 checksums (read as a miss: the block is recomputed and dumped again)
ALIGN = 4096
SUFFIX = ".blk"
TMP_PREFIX = ".tmp."
MARKER_NAME = ".ucm-store"
MARKER_TEXT = (
    b"ucm-kv-store 1\n"  # the first line names the directory format; bump it when the names below change
    b"blocks: <32 lowercase hex>.blk (format UCMKVBLK)\n"
    b"temporary files: .tmp.<id>.<host>.<scope>.<pid>.<rand>\n"
    b"the store reads, evicts and removes nothing else in this directory\n"
)
LOW_WATERMARK = 0.9
STALE_TMP_S = 24 * 3600.0  # a writer rewrites its temp file within one forward pass; a day untouched is dead
META_ENTRIES = 1 << 16  # remembered block headers (checksums) per store
IOV_BATCH = 256  # buffers per preadv call (IOV_MAX is 1024)
_FIXED = struct.Struct("<8sIIQ16s16sII")
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_BLOCK_NAME = re.compile(r"[0-9a-f]{32}\.blk")
_TEMP_NAME = re.compile(
    r"\.tmp\.(?:[0-9a-f]{32}|direct-probe)"  # a block's id, or the O_DIRECT probe
    r"\.(?P<host>[A-Za-z0-9_-]{1,64})"
    r"(?:\.(?P<scope>[0-9a-f]{16}))?"  # absent in the names of earlier releases
    r"\.(?P<pid>[1-9][0-9]{0,9})"
    r"\.[0-9a-f]{8}"
)
_NO_DIRECT = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)  # the file system refuses O_DIRECT
_WRITE_REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)  # readable, not writable


def _checksum(data) -> int:
    """CRC-32C (Castagnoli): the storage world's checksum (iSCSI, ext4, Btrfs), computed with the
    CPU's crc32 instruction at ~15 GB/s here against ~2-4 GB/s for zlib's CRC-32, which made
    checksumming a fifth of the cost of an O_DIRECT dump; the GIL is released for large buffers."""
    return crc32c.crc32c(data)


def _round_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _io_error(action: str, path: Path | str, exc: OSError, writing: bool = True) -> StoreError:
    """A StoreError that says what happened to which path in words, not just an errno."""
    why = {
        errno.ENOSPC: "no space left on device (ENOSPC)",
        errno.EDQUOT: "disk quota exceeded (EDQUOT)",
        errno.EFBIG: "file too large for this file system or process limit (EFBIG)",
        errno.EACCES: "permission denied (EACCES)",
        errno.EPERM: "operation not permitted (EPERM)",
        errno.EROFS: "read-only file system (EROFS)",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    err = StoreError(f"cannot {action} {path}: {why}" + ("; the block was not stored" if writing else ""))
    err.errno = exc.errno  # type: ignore[attr-defined]
    return err


def _process_scope() -> str:
    """16 hex digits shared only by the processes of this boot of this host in this PID
    namespace: in a temp name they say that its pid can be checked with `kill(pid, 0)`. Where
    the boot id or the namespace cannot be read, a random token: no temp file is then provably
    ours, and only the age rule removes them."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return secrets.token_hex(8)
    if not boot or not pid_ns:
        return secrets.token_hex(8)
    return hashlib.blake2b(f"{_HOST}\0{boot}\0{pid_ns}".encode(), digest_size=8).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _Pending:
    """A block being assembled in its temp file."""

    tmp: Path
    crcs: list[int | None]
    count: int = 0
    aborted: bool = False
    publishing: bool = False  # set once, by the writer of the last shard
    lock: threading.Lock = field(default_factory=threading.Lock)


class PosixStore(KVStore):
    """Blocks as checksummed files in one or more directories (spread by id)."""

    def __init__(
        self,
        roots: str | os.PathLike | Sequence[str | os.PathLike],
        layout: BlockLayout,
        *,
        workers: int = 1,
        capacity: int | None = None,
        use_direct: bool = False,
    ) -> None:
        super().__init__(layout, workers)
        root_list = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
        if not root_list:
            raise StoreError("PosixStore needs at least one directory")
        self.roots = [Path(r) for r in root_list]
        self.stride = _round_up(layout.shard_nbytes)
        self.header_size = _round_up(_FIXED.size + 8 * len(layout.shard_shape) + 4 * layout.num_shards + 4)
        self.file_size = self.header_size + layout.num_shards * self.stride
        if capacity is not None and capacity < self.file_size:
            raise StoreFull(f"capacity {capacity} B is smaller than one block file ({self.file_size} B)")
        self.capacity = capacity
        self._scope = _process_scope()  # in this store's temp names
        self._foreign_noted: set[str] = set()  # entries under a block's name that are not ours, reported once
        self._lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self._pending: dict[BlockId, _Pending] = {}
        self._readers: Counter[BlockId] = Counter()
        self._local = threading.local()
        self._meta: OrderedDict[BlockId, list] = OrderedDict()  # id -> [shard crcs, last touch (monotonic)]
        self.touch_interval_s = 1.0  # LRU stamps are refreshed at most this often per block
        self._pause_before_publish = 0.0  # test hook: seconds between the header write and the rename
        for r in self.roots:
            try:
                r.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _io_error("create the store directory", r, exc, writing=False) from exc
            if not r.is_dir():
                raise StoreError(f"{r} is not a directory")
            self._claim_directory(r)
        self.direct = bool(use_direct) and self._probe_direct()
        self._sweep_dead_temps()
        self._used = sum(size for _, size, _, _ in self._scan())
        self._maybe_evict()

    # ------------------------------------------------------------------ setup
    def _claim_directory(self, root: Path) -> None:
        """Mark the directory as a store of this format (`MARKER_NAME`), or check the mark there.
        A directory this process cannot write to (read-only, not its own) is used unmarked."""
        marker = root / MARKER_NAME
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            _check_marker(marker)
            return
        except OSError as exc:
            if exc.errno in _WRITE_REFUSED:
                log.info(
                    "ucm.store: cannot write the marker %s (%s); the directory is used unmarked", marker, exc.strerror
                )
                return
            raise _io_error("create the store marker", marker, exc, writing=False) from exc
        try:
            os.write(fd, MARKER_TEXT)  # one small write; a reader that sees a part of it accepts it
        except OSError as exc:
            log.warning("ucm.store: cannot write the marker %s: %s", marker, exc.strerror)
        finally:
            os.close(fd)

    def _probe_direct(self) -> bool:
        """O_DIRECT only where every root accepts it; otherwise say so and use buffered I/O."""
        if not _O_DIRECT:
            log.warning("ucm.store: this platform has no O_DIRECT; use_direct ignored (buffered I/O)")
            return False
        return all(self._direct_works_in(r) for r in self.roots)

    def _direct_works_in(self, root: Path) -> bool:
        """Probe by writing; where the directory takes no writes (read-only), by reading a stored block."""
        works = self._probe_direct_write(root)
        if works is None:
            works = self._probe_direct_read(root)
        if works is None:
            log.warning(
                "ucm.store: cannot probe O_DIRECT in %s (it takes no writes and holds no block to read); "
                "use_direct falls back to buffered I/O",
                root,
            )
            return False
        if not works:
            log.warning("ucm.store: %s does not support O_DIRECT; use_direct falls back to buffered I/O", root)
        return works

    def _probe_direct_write(self, root: Path) -> bool | None:
        """Write 4 KiB with O_DIRECT into a probe file of our own: whether that works, or None
        where the directory refuses the file itself (read-only, no permission, full)."""
        probe = root / self._temp_name("direct-probe")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno in _NO_DIRECT:  # some file systems create the file, then refuse O_DIRECT
                _remove_quietly(probe, "remove the O_DIRECT probe")
            return _probe_verdict(root, exc)
        try:
            _write_zero_page(fd)
        except OSError as exc:
            return _probe_verdict(root, exc)
        finally:
            os.close(fd)
            _remove_quietly(probe, "remove the O_DIRECT probe")
        return True

    def _probe_direct_read(self, root: Path) -> bool | None:
        """Read 4 KiB of a stored block with O_DIRECT: whether that works, or None where there is
        no block to read (or it cannot be read for another reason)."""
        sample = next((entry.path for entry, _ in self._block_entries(root)), None)
        if sample is None:
            return None
        try:
            fd = os.open(sample, os.O_RDONLY | os.O_NOFOLLOW | _O_DIRECT)
        except OSError as exc:
            return False if exc.errno in _NO_DIRECT else None
        buf = mmap.mmap(-1, ALIGN)
        try:
            os.preadv(fd, [buf], 0)
        except OSError as exc:
            return False if exc.errno in _NO_DIRECT else None
        finally:
            os.close(fd)
            buf.close()
        return True

    def _temp_name(self, what: str) -> str:
        """A temp file name in the one grammar the sweep knows (`_TEMP_NAME`)."""
        return f"{TMP_PREFIX}{what}.{_HOST}.{self._scope}.{os.getpid()}.{secrets.token_hex(4)}"

    def _sweep_dead_temps(self) -> None:
        """Remove the temp files of dead writers (`_temp_is_dead`); every other name is left alone."""
        now = time.time()
        for r in self.roots:
            with os.scandir(r) as entries:
                for entry in entries:
                    match = _TEMP_NAME.fullmatch(entry.name)
                    if match is None or not entry.is_file(follow_symlinks=False):
                        continue
                    try:
                        age = now - entry.stat(follow_symlinks=False).st_mtime
                    except OSError:
                        continue
                    if self._temp_is_dead(match, age):
                        _remove_quietly(Path(entry.path), "remove the dead writer's temp file")

    def _temp_is_dead(self, name: re.Match, age_s: float) -> bool:
        """Untouched for `STALE_TMP_S`, or written in our host, boot and PID namespace by a pid
        that is gone. A pid from anywhere else (another container with our host name, an older
        release's name without a scope) says nothing about its writer."""
        if age_s > STALE_TMP_S:
            return True
        if name["scope"] != self._scope or name["host"] != _HOST:
            return False
        pid = int(name["pid"])
        return pid != os.getpid() and not _pid_alive(pid)

    # ------------------------------------------------------------------ paths
    def path(self, block_id: BlockId) -> Path:
        """Where a block lives (ids spread over the roots by their leading bits); a non-canonical
        id is refused (ValueError), so no block has two file names."""
        check_id(block_id)
        return self.roots[int(block_id[:8], 16) % len(self.roots)] / f"{block_id}{SUFFIX}"

    def _bounce(self) -> memoryview:
        """A page-aligned per-thread buffer for O_DIRECT transfers of unaligned tensors."""
        need = max(self.stride, self.header_size)
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < need:
            self._local.mm = mmap.mmap(-1, need)
            self._local.buf = buf = memoryview(self._local.mm)
        return buf

    # ------------------------------------------------------------------ header
    def _pack_header(self, block_id: BlockId, crcs: Sequence[int]) -> bytes:
        lay = self.layout
        head = _FIXED.pack(
            MAGIC,
            VERSION,
            self.header_size,
            self.stride,
            bytes.fromhex(block_id),
            _dtype_name(lay.dtype).encode(),
            lay.num_shards,
            len(lay.shard_shape),
        )
        head += struct.pack(f"<{len(lay.shard_shape)}Q", *lay.shard_shape)
        head += struct.pack(f"<{lay.num_shards}I", *crcs)
        head += struct.pack("<I", _checksum(head))
        return head + bytes(self.header_size - len(head))

    def _parse_header(self, raw: bytes, block_id: BlockId, path: Path) -> list[int]:
        """The per-shard checksums, after checking that the header belongs to this layout."""
        lay = self.layout
        if len(raw) < _FIXED.size:
            raise BlockCorrupt(f"{path}: truncated header")
        magic, version, hsize, stride, bid, dtype, nshards, ndim = _FIXED.unpack_from(raw)
        if magic != MAGIC:
            raise BlockCorrupt(f"{path}: bad magic {magic!r}")
        if version != VERSION:
            raise BlockCorrupt(f"{path}: format version {version}, this store reads {VERSION}")
        end = _FIXED.size + 8 * ndim + 4 * nshards
        if ndim > 16 or nshards > (1 << 20) or end + 4 > len(raw):
            raise BlockCorrupt(f"{path}: malformed header")
        (crc,) = struct.unpack_from("<I", raw, end)
        if _checksum(raw[:end]) != crc:
            raise BlockCorrupt(f"{path}: header checksum mismatch")
        shape = struct.unpack_from(f"<{ndim}Q", raw, _FIXED.size)
        got = (hsize, stride, bid.hex(), dtype.rstrip(b"\0").decode(errors="replace"), nshards, tuple(shape))
        want = (self.header_size, self.stride, block_id, _dtype_name(lay.dtype), lay.num_shards, lay.shard_shape)
        if got != want:  # another layout under our id (a namespace mix-up): useless to us, dropped like a bad file
            raise BlockCorrupt(f"{path}: stored as (header, stride, id, dtype, shards, shape)={got}, expected {want}")
        return list(struct.unpack_from(f"<{nshards}I", raw, _FIXED.size + 8 * ndim))

    # ------------------------------------------------------------------ API
    def lookup(self, ids: Sequence[BlockId]) -> list[bool]:
        return [self._entry_kind(self.path(block_id)) == "block" for block_id in ids]

    def _entry_kind(self, path: Path) -> str:
        """What is under a block's name, never following a symbolic link: "block" (a regular file
        of a block's size), "absent" (nothing, or nothing we may see), "other" (a regular file of
        another size: replaced by the next publish) or "foreign" (a symbolic link, a directory:
        not ours, left alone)."""
        try:
            st = os.lstat(path)
        except OSError:
            return "absent"
        if not stat.S_ISREG(st.st_mode):
            self._note_foreign(path)
            return "foreign"
        return "block" if st.st_size == self.file_size else "other"

    def _note_foreign(self, path: Path | str) -> None:
        """Say once per path that an entry under a block's name is not a regular file: it is
        never read, touched, counted or removed."""
        key = str(path)
        if key in self._foreign_noted:
            return
        self._foreign_noted.add(key)
        log.warning(
            "ucm.store: %s is not a regular file (a symbolic link?): not a block of this store, left alone", key
        )

    def _begin_load(self, ids: Sequence[BlockId]) -> None:
        with self._lock:
            self._readers.update(ids)

    def _end_load(self, ids: Sequence[BlockId]) -> None:
        with self._lock:
            self._readers.subtract(ids)
            for block_id in ids:
                if self._readers[block_id] <= 0:
                    del self._readers[block_id]

    def _read(self, block_id: BlockId, shard: int, dst: torch.Tensor) -> None:
        self._read_run(block_id, shard, [dst])

    def _read_run(self, block_id: BlockId, first: int, dsts: list[torch.Tensor]) -> None:
        """Shards first.. of one block: one open, the header once per block id, one preadv when the
        shards are adjacent on disk (stride == size) and, for O_DIRECT, the buffers aligned."""
        path = self.path(block_id)
        fd, size = self._open_block(path)
        try:
            if size != self.file_size:
                raise BlockCorrupt(f"{path}: size {size} B, a block file is {self.file_size} B")
            crcs = self._crcs(fd, block_id, path)
            nbytes = self.layout.shard_nbytes
            offset = self.header_size + first * self.stride
            views = [memoryview(d.numpy()) for d in dsts]
            if self.stride == nbytes and (not self.direct or all(_aligned(d) for d in dsts)):
                _preadv_all(fd, views, offset, path)
            elif not self.direct:
                for k, mv in enumerate(views):
                    _preadv_all(fd, [mv], offset + k * self.stride, path)
            else:
                buf = self._bounce()
                for k, d in enumerate(dsts):
                    _preadv_all(fd, [buf[: self.stride]], offset + k * self.stride, path)
                    np.copyto(d.numpy(), np.frombuffer(buf, dtype=np.uint8, count=nbytes))
            for k, mv in enumerate(views):
                if _checksum(mv) != crcs[first + k]:
                    raise BlockCorrupt(f"{path}: checksum mismatch in shard {first + k}")
            self._touch(fd, block_id)
        except BlockCorrupt:
            with self._lock:
                self._meta.pop(block_id, None)
            self._drop(path)
            raise
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def _open_block(self, path: Path) -> tuple[int, int]:
        """(fd, size) of a block file opened for reading, never through a symbolic link; what is
        not a regular file under the name is a miss and stays as it is (it is not ours to drop)."""
        # O_NONBLOCK: a FIFO under a block's name must not hang the open (no effect on files)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (_O_DIRECT if self.direct else 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise BlockMissing(f"{path}: not in the store") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._note_foreign(path)
                raise BlockMissing(f"{path}: a symbolic link, not a block of this store (left alone)") from None
            raise StoreError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot stat {path}: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            self._note_foreign(path)
            raise BlockMissing(f"{path}: not a regular file, not a block of this store (left alone)")
        return fd, st.st_size

    def _crcs(self, fd: int, block_id: BlockId, path: Path) -> list[int]:
        """The block's shard checksums: from its header once, then from memory.

        Sound because ids are content addresses: every valid file under an id holds the same
        bytes, hence the same checksums, and a payload that differs still fails its checksum.
        """
        with self._lock:
            meta = self._meta.get(block_id)
            if meta is not None:
                self._meta.move_to_end(block_id)
                return meta[0]
        if self.direct:
            buf = self._bounce()
            _preadv_all(fd, [buf[: self.header_size]], 0, path)
            raw = bytes(buf[: self.header_size])
        else:
            raw = os.pread(fd, self.header_size, 0)
        crcs = self._parse_header(raw, block_id, path)
        self._remember(block_id, crcs, 0.0)
        return crcs

    def _remember(self, block_id: BlockId, crcs: list[int], touched: float) -> None:
        with self._lock:
            self._meta[block_id] = [crcs, touched]
            self._meta.move_to_end(block_id)
            while len(self._meta) > META_ENTRIES:
                self._meta.popitem(last=False)

    def _touch(self, fd: int, block_id: BlockId) -> None:
        """Refresh the LRU stamp (mtime), at most once per `touch_interval_s` per block."""
        now = time.monotonic()
        with self._lock:
            meta = self._meta.get(block_id)
            if meta is not None:
                if now - meta[1] < self.touch_interval_s:
                    return
                meta[1] = now
        try:
            os.utime(fd)
        except OSError:
            pass  # a read-only store still serves reads

    def _drop(self, path: Path) -> None:
        """Remove a bad file so that lookups report the miss and a later dump can replace it."""
        log.warning("ucm.store: dropping corrupt block file %s", path)
        try:
            os.unlink(path)
        except OSError:
            pass

    def _write(self, block_id: BlockId, shard: int, src: torch.Tensor) -> None:
        final = self.path(block_id)
        with self._lock:
            pending = self._pending.get(block_id)
            if pending is None:
                kind = self._entry_kind(final)
                if kind == "block":  # content-addressed: the stored block holds these bytes
                    _refresh_stamp(final)
                    return  # (a file of the wrong size is not a block: it is replaced on publish)
                if kind == "foreign":
                    raise StoreError(
                        f"{final} is not a regular file (a symbolic link?): not created by this store, "
                        "left alone; the block was not stored"
                    )
                pending = self._pending[block_id] = self._new_temp(block_id, final)
        try:
            self._write_at(pending.tmp, src, self.header_size + shard * self.stride)
            crc = _checksum(memoryview(src.numpy()))
        except OSError as exc:
            if pending.publishing and exc.errno == errno.ENOENT:
                return  # a second writer of this very shard, beaten by the publish: the block is stored
            self._abort(block_id, pending)
            raise _io_error("write", pending.tmp, exc) from exc
        except BaseException:
            self._abort(block_id, pending)  # whatever failed, the temp file does not outlive it
            raise
        with pending.lock:
            if pending.aborted:
                raise StoreError(f"{final}: dump abandoned after an earlier failure of this block")
            if pending.crcs[shard] is None:
                pending.count += 1
            pending.crcs[shard] = crc
            complete = pending.count == self.layout.num_shards and not pending.publishing
            pending.publishing = pending.publishing or complete
        if complete:
            self._publish(block_id, pending, final)

    def _new_temp(self, block_id: BlockId, final: Path) -> _Pending:
        """Create the block's temp file at its final size; nothing is left behind if that fails."""
        tmp = final.with_name(self._temp_name(block_id))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise _io_error("create", tmp, exc) from exc
        try:
            _allocate(fd, self.file_size)
        except BaseException as exc:
            os.close(fd)
            _remove_quietly(tmp, "remove the temp file")
            if isinstance(exc, OSError):
                raise _io_error("allocate space for", tmp, exc) from exc
            raise
        os.close(fd)
        return _Pending(tmp, [None] * self.layout.num_shards)

    def _write_at(self, path: Path, src: torch.Tensor, offset: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | (_O_DIRECT if self.direct else 0))
        try:
            if not self.direct or _aligned(src):
                _pwrite_all(fd, memoryview(src.numpy()), offset)
            else:
                buf = self._bounce()
                np.copyto(np.frombuffer(buf, dtype=np.uint8, count=src.numel()), src.numpy())
                _pwrite_all(fd, buf[: self.stride], offset)
        finally:
            os.close(fd)

    def _publish(self, block_id: BlockId, pending: _Pending, final: Path) -> None:
        try:
            header = self._pack_header(block_id, [c for c in pending.crcs if c is not None])
            if self.direct:
                buf = self._bounce()
                buf[: self.header_size] = header
                head = torch.frombuffer(buf, dtype=torch.uint8, count=self.header_size)
                self._write_at(pending.tmp, head, 0)
            else:
                self._write_at(pending.tmp, torch.frombuffer(bytearray(header), dtype=torch.uint8), 0)
            if self._pause_before_publish:
                time.sleep(self._pause_before_publish)
            os.replace(pending.tmp, final)
        except OSError as exc:
            self._abort(block_id, pending)
            raise _io_error("publish", final, exc) from exc
        except BaseException:
            self._abort(block_id, pending)  # whatever failed, the temp file does not outlive it
            raise
        with self._lock:
            if self._pending.get(block_id) is pending:
                del self._pending[block_id]
            self._used += self.file_size
        self._remember(block_id, list(pending.crcs), time.monotonic())  # type: ignore[arg-type]
        self._maybe_evict()

    def _abort(self, block_id: BlockId, pending: _Pending) -> None:
        with pending.lock:
            pending.aborted = True
        with self._lock:
            if self._pending.get(block_id) is pending:
                del self._pending[block_id]
        _remove_quietly(pending.tmp, "remove the temp file")

    def discard_pending(self) -> None:
        """Drop blocks whose dump never completed (e.g. an aborted request); removes their temp files."""
        with self._lock:
            items = list(self._pending.items())
        for block_id, pending in items:
            self._abort(block_id, pending)

    def close(self) -> None:
        super().close()
        self.discard_pending()

    # ------------------------------------------------------------------ eviction
    def _block_entries(self, root: Path) -> Iterator[tuple[os.DirEntry, os.stat_result]]:
        """This store's block files in one directory: regular files named exactly
        `<32 lowercase hex>.blk` (stat'ed without following links). Every other entry is left
        alone; one with a block's name that is not a regular file is reported once."""
        with os.scandir(root) as entries:
            for entry in entries:
                if not _BLOCK_NAME.fullmatch(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    self._note_foreign(entry.path)
                    continue
                yield entry, st

    def _scan(self) -> list[tuple[int, int, BlockId, str]]:
        """(mtime_ns, size, id, path) of every published block in every root."""
        return [
            (st.st_mtime_ns, st.st_size, entry.name[: -len(SUFFIX)], entry.path)
            for r in self.roots
            for entry, st in self._block_entries(r)
        ]

    def used_bytes(self) -> int:
        """Bytes of published blocks in the directories now (a scan)."""
        return sum(size for _, size, _, _ in self._scan())

    def _maybe_evict(self) -> None:
        if self.capacity is None or self._used <= self.capacity:
            return
        with self._evict_lock:
            entries = sorted(self._scan())
            total = sum(e[1] for e in entries)
            if total > self.capacity:
                target = int(self.capacity * LOW_WATERMARK)
                with self._lock:  # no load can pin a block while we pick victims
                    for _, size, block_id, path in entries:
                        if total <= target:
                            break
                        if block_id in self._readers:
                            continue
                        try:
                            os.unlink(path)
                        except FileNotFoundError:
                            pass
                        except OSError as exc:
                            log.warning("ucm.store: cannot evict %s: %s", path, exc.strerror)
                            continue
                        total -= size
                if total > self.capacity:
                    log.warning(
                        "ucm.store: %d B stored over a %d B capacity: the rest is being read", total, self.capacity
                    )
            self._used = total


def _allocate(fd: int, size: int) -> None:
    """Reserve the whole file now: one contiguous extent per block (shards written in any order
    still land in file order on disk, so a block reads back sequentially), and a full disk fails
    here, before any data is written. File systems without fallocate get a sparse file."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % ALIGN == 0 and t.numel() % ALIGN == 0


def _remove_quietly(path: Path, action: str) -> None:
    """Cleanup of a file of ours: its failure is logged, never raised over the error being handled."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("ucm.store: cannot %s %s: %s", action, path, exc.strerror)


def _refresh_stamp(path: Path) -> None:
    """Touch a block's LRU stamp (mtime), never through a symbolic link; a read-only store skips it."""
    try:
        os.utime(path, follow_symlinks=False)
    except OSError:
        pass


def _check_marker(marker: Path) -> None:
    """Accept a directory marker of our format (or a part of one, being written); refuse others."""
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(
                f"{marker} is a symbolic link, not a store marker; give the store a directory of its own"
            ) from None
        raise _io_error("read the store marker", marker, exc, writing=False) from exc
    try:
        text = os.read(fd, 4096)
    except OSError as exc:
        raise _io_error("read the store marker", marker, exc, writing=False) from exc
    finally:
        os.close(fd)
    ours = MARKER_TEXT.split(b"\n", 1)[0]
    first = text.split(b"\n", 1)[0]
    if first != ours and not MARKER_TEXT.startswith(text):
        raise StoreError(
            f"{marker} says {first[:80]!r}, not {ours!r}: the directory holds another store format "
            "or another program's files; give this store a directory of its own"
        )


def _probe_verdict(root: Path, exc: OSError) -> bool | None:
    """An O_DIRECT probe write's failure: False (no O_DIRECT here), None (the directory takes no
    writes: probe another way) or a StoreError naming the directory."""
    if exc.errno in _NO_DIRECT:
        return False
    if exc.errno in _WRITE_REFUSED:
        return None
    raise _io_error("probe O_DIRECT in", root, exc, writing=False) from exc


def _write_zero_page(fd: int) -> None:
    """One aligned 4 KiB write (what O_DIRECT demands of a buffer)."""
    buf = mmap.mmap(-1, ALIGN)
    try:
        with memoryview(buf) as view:
            os.pwrite(fd, view, 0)
    finally:
        buf.close()


def _preadv_all(fd: int, views: list[memoryview], offset: int, path: Path) -> None:
    """Fill every buffer from consecutive file bytes (few syscalls; short reads resumed)."""
    pending = [v for v in views if len(v)]
    while pending:
        batch = pending[:IOV_BATCH]
        n = os.preadv(fd, batch, offset)
        if n == 0:
            raise BlockCorrupt(f"{path}: truncated (short read at byte {offset})")
        offset += n
        while pending and n >= len(pending[0]):
            n -= len(pending[0])
            pending.pop(0)
        if n:
            pending[0] = pending[0][n:]


def _pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)
