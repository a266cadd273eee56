"""The POSIX store owns only what it created (issue #18 items 5, 6, 9), on real files:

* blocks are regular files named exactly `<32 lowercase hex>.blk`: a user's `notes.blk`, an
  `ABC.blk` or a symbolic link under a block's name is never counted, evicted, read or touched;
* temp files are removed only when they are provably ours and dead (our host, boot and PID
  namespace, pid gone) or a day old, and only under our exact temp-name grammar;
* a directory that takes no writes still opens with `use_direct=True` and serves its blocks,
  and a failed O_DIRECT probe is a StoreError naming the directory, never an OSError of cleanup;
* a failure between creating a temp file and publishing it removes the temp file;
* each directory carries a marker naming the format; another format's marker is refused.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_store import (
    LAYOUT,
    _mount_tmpfs,
    blk_files,
    dump_all,
    ids_for,
    load_shard,
    same_bits,
    shard_data,
    tmp_files,
)
from ucm.store import PosixStore, StoreError, TaskFailed
from ucm.store import posix as posix_mod

HOST = posix_mod._HOST
DAY = 24 * 3600


def age(path: Path, seconds: float) -> None:
    """Make a file look untouched for `seconds` (its own stamp, never a link's target)."""
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def dead_pid() -> int:
    """The pid of a process that has exited (skips in the unlikely case it was reused at once)."""
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    pid = int(out.stdout)
    if posix_mod._pid_alive(pid):
        pytest.skip(f"pid {pid} was reused before the test could use it as a dead writer's")
    return pid


def file_state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


# ------------------------------------------------------------------------------ what is a block
def test_user_files_named_blk_survive_eviction_and_are_not_counted(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    root.mkdir()
    size = PosixStore(tmp_path / "probe", LAYOUT).file_size
    user = {
        "notes.blk": b"my notes\n" * 1000,
        "ABC.blk": b"x" * size,
        "AB" * 16 + ".blk": b"y" * size,
        "0" * 31 + ".blk": b"z" * size,
        "0" * 32 + ".blk.bak": b"w" * size,
    }
    for name, data in user.items():
        (root / name).write_bytes(data)
        age(root / name, 30 * DAY)  # older than any block: the first victims if they were counted
    store = PosixStore(root, LAYOUT, capacity=4 * size)
    assert store.used_bytes() == 0
    ids = ids_for(8)
    for bid in ids:
        dump_all(store, [bid])
        time.sleep(0.01)
    ours = [n for n in blk_files(root) if n not in user]
    assert 0 < len(ours) <= 4 and store.used_bytes() == len(ours) * size
    assert store.lookup(ids[-1:]) == [True]
    for name, data in user.items():
        assert (root / name).read_bytes() == data, name
    assert PosixStore(root, LAYOUT, capacity=4 * size).used_bytes() == len(ours) * size  # a fresh scan agrees


def test_symlinked_block_pointing_outside_is_absent_and_left_alone(tmp_path: Path, caplog) -> None:
    """A `<id>.blk` symlink (even to a valid block of that id) is a miss; the file it points to
    keeps its bytes and its mtime through lookups, loads, dumps and evictions, and the link stays."""
    bid, *others = ids_for(7)
    elsewhere = PosixStore(tmp_path / "elsewhere", LAYOUT)
    dump_all(elsewhere, [bid])
    outside = tmp_path / "outside" / "precious.bin"
    outside.parent.mkdir()
    outside.write_bytes(elsewhere.path(bid).read_bytes())  # the very bytes of the block
    os.utime(outside, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    before = file_state(outside)

    store = PosixStore(tmp_path / "kv", LAYOUT, capacity=3 * elsewhere.file_size)
    store.touch_interval_s = 0.0  # every load would refresh a stamp
    link = store.path(bid)
    link.symlink_to(outside)
    with caplog.at_level(logging.WARNING, logger="ucm.store"):
        assert store.lookup([bid]) == [False]
        for _ in range(2):
            with pytest.raises(TaskFailed) as err:
                load_shard(store, [bid], 0)
            assert err.value.missing == [bid]
        with pytest.raises(TaskFailed) as err:
            store.wait(store.dump([bid], 0, torch.stack([shard_data(bid, 0)])))
        assert str(link) in str(err.value) and "not created by this store" in str(err.value)
        for other in others:  # past the capacity: evictions scan the directory
            dump_all(store, [other])
            time.sleep(0.01)
    said = [r for r in caplog.records if "left alone" in r.getMessage() and str(link) in r.getMessage()]
    assert len(said) == 1  # once per store, not once per lookup, load or scan
    assert store.used_bytes() <= 3 * store.file_size and store.lookup(others[-1:]) == [True]
    assert PosixStore(tmp_path / "kv", LAYOUT).used_bytes() == store.used_bytes()
    assert link.is_symlink() and os.readlink(link) == str(outside)
    assert file_state(outside) == before


# ------------------------------------------------------------------------------ temp files
def test_temp_names_outside_our_grammar_survive_open(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    root.mkdir()
    bid = ids_for(1)[0]
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not the store's")
    foreign = [
        ".tmp.foo",
        ".tmp.notes.txt",
        f".tmp.{'A' * 32}.{HOST}.1234.abcdef01",
        f".tmp.{bid}.{HOST}.1234.abcdef0",
        f".tmp.{bid}.host.name.1234.abcdef01",
        ".tmp.x.y.z.w.v",
    ]
    for name in foreign:
        (root / name).write_bytes(b"someone else's")
        age(root / name, 30 * DAY)
    link = root / f".tmp.{bid}.{HOST}.{'0' * 16}.1234.abcdef01"  # our grammar, but a link: not ours
    link.symlink_to(outside)
    age(link, 30 * DAY)
    stale = [
        f".tmp.{bid}.{HOST}.{'1' * 16}.1234.abcdef02",  # ours in form, untouched for a month
        f".tmp.{bid}.{HOST}.1234.abcdef03",  # an earlier release's form, untouched for a month
        f".tmp.direct-probe.{HOST}.{'2' * 16}.1234.abcdef04",
    ]
    for name in stale:
        (root / name).write_bytes(b"dead writer")
        age(root / name, 30 * DAY)
    PosixStore(root, LAYOUT)
    left = set(os.listdir(root))
    assert set(foreign) <= left and link.is_symlink() and outside.read_bytes() == b"not the store's"
    assert not set(stale) & left


def test_temp_of_another_pid_namespace_on_this_host_survives(tmp_path: Path) -> None:
    """Same host name, a pid that is dead here: only a temp that carries our own scope (host,
    boot and PID namespace) is provably dead; the others belong to writers we cannot see."""
    root = tmp_path / "kv"
    root.mkdir()
    bid = ids_for(1)[0]
    pid = dead_pid()
    scope = posix_mod._process_scope()
    other_scope = hashlib.blake2b(b"another pid namespace", digest_size=8).hexdigest()
    assert other_scope != scope
    survivors = [
        f".tmp.{bid}.{HOST}.{pid}.abcdef01",  # an earlier release in another container
        f".tmp.{bid}.{HOST}.{other_scope}.{pid}.abcdef02",  # this release in another container
        f".tmp.{bid}.{HOST}.{scope}.{os.getpid()}.abcdef03",
    ]  # ours, and its writer lives
    ours_dead = f".tmp.{bid}.{HOST}.{scope}.{pid}.abcdef04"
    for name in [*survivors, ours_dead]:
        (root / name).write_bytes(b"partial block")
    store = PosixStore(root, LAYOUT)
    left = set(os.listdir(root))
    assert set(survivors) <= left and ours_dead not in left
    name = store._temp_name(bid)  # what this store writes: the grammar the sweep knows, with our scope
    match = posix_mod._TEMP_NAME.fullmatch(name)
    assert match is not None and match["scope"] == scope and match["pid"] == str(os.getpid())


def test_scope_differs_in_another_pid_namespace() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here")
    can = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, text=True, check=False)
    if can.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {can.stderr.strip()[-200:]}")
    code = "from ucm.store import posix; print(posix._process_scope())"
    out = subprocess.run(
        ["unshare", "--pid", "--fork", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert out.returncode == 0, out.stderr
    same_ns = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent
    )
    assert same_ns.stdout.strip() == posix_mod._process_scope()
    assert out.stdout.strip() != posix_mod._process_scope()


@pytest.mark.parametrize("where", ["allocate", "copy", "checksum", "header"])
def test_failure_between_temp_and_publish_leaves_no_temp(where: str, tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "kv"
    store = PosixStore(root, LAYOUT, workers=2)
    bid = ids_for(1)[0]

    def fail(*args, **kwargs):
        raise RuntimeError(f"injected failure in {where}")

    target = {
        "allocate": (posix_mod, "_allocate"),
        "copy": (store, "_write_at"),
        "checksum": (posix_mod, "_checksum"),
        "header": (store, "_pack_header"),
    }[where]
    monkeypatch.setattr(*target, fail)
    with pytest.raises(TaskFailed) as err:
        dump_all(store, [bid])
    assert "injected failure" in str(err.value)
    assert tmp_files(root) == [] and store._pending == {} and store.lookup([bid]) == [False]
    monkeypatch.undo()
    dump_all(store, [bid])  # the block is stored normally afterwards
    assert same_bits(load_shard(store, [bid], 3)[0], shard_data(bid, 3)) and tmp_files(root) == []


def test_non_canonical_id_is_refused_before_any_file(tmp_path: Path) -> None:
    """Also at the store's own entry point (not only at the API): no temp file is ever named
    after an id that later fails (this held before the ownership work too; kept as a guard)."""
    store = PosixStore(tmp_path / "kv", LAYOUT)
    for bad in ("AB" * 16, "ab" * 15, "../" + "a" * 29):
        with pytest.raises(ValueError, match="lowercase hex"):
            store._write(bad, 0, shard_data(ids_for(1)[0], 0).view(torch.uint8).reshape(-1))
    assert tmp_files(tmp_path / "kv") == [] and store._pending == {}


# ------------------------------------------------------------------------------ read-only directories
def refuse_writes_under(root: Path, monkeypatch, err: int = errno.EROFS) -> None:
    """Make every create, write-open, unlink and utime under `root` fail as a read-only mount does."""
    real_open, real_unlink, real_utime = os.open, os.unlink, os.utime
    prefix = str(root) + os.sep

    def refuse(path) -> OSError:
        return OSError(err, os.strerror(err), str(path))

    def ro_open(path, flags, *args, **kwargs):
        if str(path).startswith(prefix) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def ro_unlink(path, *args, **kwargs):
        if str(path).startswith(prefix):
            raise refuse(path)
        return real_unlink(path, *args, **kwargs)

    def ro_utime(path, *args, **kwargs):
        if str(path).startswith(prefix):
            raise refuse(path)
        return real_utime(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "unlink", ro_unlink)
    monkeypatch.setattr(os, "utime", ro_utime)


def can_create_in(root: Path) -> bool:
    try:
        (root / ".write-test").touch()
    except OSError:
        return False
    (root / ".write-test").unlink()
    return True


@pytest.mark.parametrize("how", ["simulated", "chmod", "remount"])
def test_read_only_directory_opens_with_use_direct_and_reads(how: str, tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "kv"
    if how == "remount" and not _mount_tmpfs(root, "size=4m"):
        pytest.skip("cannot mount a tmpfs here (the 'simulated' case covers a read-only directory)")
    try:
        ids = ids_for(3)
        with PosixStore(root, LAYOUT, use_direct=True) as writer:
            dump_all(writer, ids)
            direct_here = writer.direct
        files = blk_files(root)
        if how == "simulated":
            refuse_writes_under(root, monkeypatch)
        elif how == "chmod":
            os.chmod(root, 0o555)
            if can_create_in(root):
                os.chmod(root, 0o755)
                pytest.skip("running as root: mode bits do not stop writes (the 'simulated' and 'remount' cases do)")
        else:
            ro = subprocess.run(["mount", "-o", "remount,ro", str(root)], capture_output=True, text=True, check=False)
            assert ro.returncode == 0, ro.stderr
            with pytest.raises(StoreError, match="sub.*read-only file system"):  # no new root: a clear error
                PosixStore(root / "sub", LAYOUT, use_direct=True)
        store = PosixStore(root, LAYOUT, use_direct=True)
        assert store.direct == direct_here  # probed by reading a stored block
        assert store.lookup(ids) == [True] * 3
        for s in range(LAYOUT.num_shards):
            got = load_shard(store, ids, s)
            assert all(same_bits(g, shard_data(i, s)) for g, i in zip(got, ids, strict=False))
        with pytest.raises(TaskFailed) as err:
            dump_all(store, ids_for(1, "new"))
        assert str(root) in str(err.value) and "the block was not stored" in str(err.value)
        assert blk_files(root) == files and tmp_files(root) == []
    finally:
        if how == "chmod":
            os.chmod(root, 0o755)
        if how == "remount":
            subprocess.run(["umount", str(root)], check=False)


def test_failed_o_direct_probe_is_a_store_error_not_masked_by_cleanup(tmp_path: Path, monkeypatch) -> None:
    """A probe that fails for a reason other than "no O_DIRECT" or "no writes here" is a
    StoreError naming the directory; the cleanup's own failure (a read-only mount refuses the
    unlink too) is logged, never raised in its place."""
    root = tmp_path / "kv"
    root.mkdir()
    real_open, real_unlink = os.open, os.unlink
    prefix = str(root) + os.sep

    def broken_open(path, flags, *args, **kwargs):
        if str(path).startswith(prefix) and flags & posix_mod._O_DIRECT and flags & os.O_CREAT:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_open(path, flags, *args, **kwargs)

    def ro_unlink(path, *args, **kwargs):
        if str(path).startswith(prefix):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", broken_open)
    monkeypatch.setattr(os, "unlink", ro_unlink)
    with pytest.raises(StoreError) as err:
        PosixStore(root, LAYOUT, use_direct=True)
    assert str(root) in str(err.value) and "O_DIRECT" in str(err.value)


# ------------------------------------------------------------------------------ the marker
def test_store_marks_its_directory_and_refuses_another_format(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    PosixStore(root, LAYOUT).close()
    marker = root / posix_mod.MARKER_NAME
    assert marker.read_bytes().startswith(b"ucm-kv-store 1\n")
    PosixStore(root, LAYOUT).close()  # its own marker is accepted
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / posix_mod.MARKER_NAME).write_bytes(b"ucm-kv")  # another opener is writing it
    PosixStore(partial, LAYOUT).close()
    for text in (b"ucm-kv-store 2\nnewer names\n", b"my app's settings\n"):
        marker.write_bytes(text)
        with pytest.raises(StoreError, match="another store format") as err:
            PosixStore(root, LAYOUT)
        assert str(marker) in str(err.value)
    marker.unlink()
    marker.symlink_to(tmp_path / "partial" / posix_mod.MARKER_NAME)
    with pytest.raises(StoreError, match="symbolic link"):
        PosixStore(root, LAYOUT)
