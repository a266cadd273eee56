"""The KV store on real files: round trips, hash chain, crashes, corruption, full and read-only
disks, concurrency, eviction, the DRAM cache and the pipeline."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ucm.config.errors import ConfigError
from ucm.integration.vllm.extra_config import parse_extra_config
from ucm.store import (
    BlockCorrupt,
    BlockLayout,
    BlockMissing,
    DramStore,
    EmptyStore,
    PipelineStore,
    PosixStore,
    StoreError,
    StoreSpec,
    TaskFailed,
    block_hash,
    build_store,
    prefix_block_hashes,
    root_hash,
)
from ucm.store import posix as posix_mod

LAYOUT = BlockLayout(num_shards=4, shard_shape=(8, 2, 16), dtype=torch.bfloat16)  # 512 B shards


def ids_for(n: int, tag: str = "") -> list[str]:
    return prefix_block_hashes(list(range(n * 4)), 4, namespace=tag)


def shard_data(block_id: str, shard: int, layout: BlockLayout = LAYOUT) -> torch.Tensor:
    """Deterministic content of a (block, shard), so any process can check what it reads."""
    g = torch.Generator().manual_seed(int(block_id[:12], 16) * 131 + shard)
    x = torch.randn(layout.shard_shape, generator=g) * 100
    return x.to(layout.dtype) if layout.dtype.is_floating_point else x.to(torch.int64).to(layout.dtype)


def dump_all(store, ids: list[str], layout: BlockLayout = LAYOUT) -> None:
    for s in range(layout.num_shards):
        store.wait(store.dump(ids, s, torch.stack([shard_data(i, s, layout) for i in ids])))


def load_shard(store, ids: list[str], shard: int, layout: BlockLayout = LAYOUT) -> torch.Tensor:
    out = torch.empty((len(ids), *layout.shard_shape), dtype=layout.dtype)
    store.wait(store.load(ids, shard, out))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def blk_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".blk"))


def tmp_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp."))


def run_py(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kw,
    )


# ------------------------------------------------------------------------------ hash chain
def test_hash_chain_same_prefix_same_ids_and_a_change_propagates() -> None:
    tokens = list(range(1000, 1064))
    ids = prefix_block_hashes(tokens, 16)
    assert len(ids) == 4 and len(set(ids)) == 4
    assert prefix_block_hashes(tokens + [7, 8, 9], 16) == ids  # a partial tail has no id
    assert prefix_block_hashes(tokens[:40], 16) == ids[:2]
    changed = list(tokens)
    changed[20] += 1  # block 1
    other = prefix_block_hashes(changed, 16)
    assert other[0] == ids[0] and all(a != b for a, b in zip(other[1:], ids[1:], strict=False))
    assert prefix_block_hashes(tokens, 16, namespace="another-model") != ids
    # every input form hashes alike
    assert prefix_block_hashes(torch.tensor(tokens), 16) == prefix_block_hashes(np.array(tokens, np.int32), 16) == ids
    # the format is stable: blake2b-128, personalised, over parent bytes + int64 little-endian tokens
    root = hashlib.blake2b(b"root\0", digest_size=16, person=b"ucm-kv-block").hexdigest()
    assert root_hash() == root
    want = hashlib.blake2b(
        bytes.fromhex(root) + np.arange(1000, 1016, dtype="<i8").tobytes(), digest_size=16, person=b"ucm-kv-block"
    ).hexdigest()
    assert ids[0] == want == block_hash(None, tokens[:16])


# ------------------------------------------------------------------------------ round trips
def make_store(kind: str, tmp_path: Path, layout: BlockLayout = LAYOUT, **kw):
    if kind == "posix":
        return PosixStore(tmp_path / "kv", layout, workers=2, **kw)
    if kind == "posix-direct":
        return PosixStore(tmp_path / "kv", layout, workers=2, use_direct=True, **kw)
    if kind == "posix-2dirs":
        return PosixStore([tmp_path / "a", tmp_path / "b"], layout, workers=2, **kw)
    if kind == "dram":
        return DramStore(layout, 64 * layout.block_nbytes, workers=2)
    if kind == "pipeline":
        return PipelineStore(
            DramStore(layout, 64 * layout.block_nbytes), PosixStore(tmp_path / "kv", layout), workers=2
        )
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["posix", "posix-direct", "posix-2dirs", "dram", "pipeline"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
def test_round_trip_bit_exact(kind: str, dtype: torch.dtype, tmp_path: Path) -> None:
    layout = BlockLayout(3, (4, 2, 64), dtype)
    with make_store(kind, tmp_path, layout) as store:
        ids = ids_for(5, kind)
        assert store.lookup(ids) == [False] * 5
        # shards arrive out of order and in both accepted forms (batched tensor, list of tensors)
        for s in (2, 0, 1):
            src = [shard_data(i, s, layout) for i in ids]
            store.wait(store.dump(ids, s, src if s == 1 else torch.stack(src)))
        assert store.lookup(ids) == [True] * 5
        for s in range(3):
            got = load_shard(store, ids[::-1], s, layout)
            for row, block_id in zip(got, ids[::-1], strict=False):
                assert same_bits(row, shard_data(block_id, s, layout))
        # mixed shards in one call
        mixed = torch.empty((3, *layout.shard_shape), dtype=dtype)
        store.wait(store.load([ids[0], ids[3], ids[3]], [2, 0, 1], mixed))
        assert same_bits(mixed[1], shard_data(ids[3], 0, layout)) and same_bits(mixed[2], shard_data(ids[3], 1, layout))


@pytest.mark.parametrize("kind", ["posix", "dram", "pipeline"])
def test_read_now_matches_load_and_reports_misses(kind: str, tmp_path: Path) -> None:
    """The synchronous read (offload's loads) returns what `load` returns, on the calling thread."""
    with make_store(kind, tmp_path) as store:
        ids = ids_for(3, kind)
        for s in range(LAYOUT.num_shards):
            store.wait(store.dump(ids[:2], s, torch.stack([shard_data(i, s) for i in ids[:2]])))
        threads = threading.active_count()
        dst = torch.zeros((3, *LAYOUT.shard_shape), dtype=LAYOUT.dtype)
        failures = store.read_now([ids[1], ids[2], ids[0]], 2, dst)
        assert list(failures) == [ids[2]] and isinstance(failures[ids[2]], BlockMissing)
        assert same_bits(dst[0], shard_data(ids[1], 2)) and same_bits(dst[2], shard_data(ids[0], 2))
        assert threading.active_count() == threads  # no pool thread was started for it


@pytest.mark.parametrize("kind", ["posix", "dram"])
def test_block_visible_only_when_every_shard_is_in(kind: str, tmp_path: Path) -> None:
    with make_store(kind, tmp_path) as store:
        ids = ids_for(2)
        for s in range(3):
            store.wait(store.dump(ids, s, torch.stack([shard_data(i, s) for i in ids])))
        assert store.lookup(ids) == [False, False]
        task = store.load(ids, 0, torch.empty((2, *LAYOUT.shard_shape), dtype=LAYOUT.dtype))
        with pytest.raises(TaskFailed) as err:
            store.wait(task)
        assert sorted(err.value.missing) == sorted(ids) and store.check(task)
        store.wait(store.dump(ids, 3, torch.stack([shard_data(i, 3) for i in ids])))
        assert store.lookup(ids) == [True, True]
    if kind == "posix":
        assert tmp_files(tmp_path / "kv") == []


def test_bad_arguments_fail_at_once(tmp_path: Path) -> None:
    with PosixStore(tmp_path, LAYOUT) as store:
        ids = ids_for(2)
        good = torch.zeros((2, *LAYOUT.shard_shape), dtype=LAYOUT.dtype)
        with pytest.raises(ValueError, match="dtype|hold"):
            store.dump(ids, 0, good.float())
        with pytest.raises(ValueError, match="shard 4 out of range"):
            store.dump(ids, 4, good)
        with pytest.raises(ValueError, match=r"\[2,"):
            store.dump(ids, 0, good[:1])
        with pytest.raises(ValueError, match="hex"):
            store.dump(["not-an-id"] * 2, 0, good)
        with pytest.raises(ValueError, match="contiguous"):
            store.load(ids, 0, [t.t() for t in torch.zeros((2, 16, 16), dtype=LAYOUT.dtype)])


# ------------------------------------------------------------------------------ crashes
KILL_CHILD = """
import sys, time, torch
from ucm.store import BlockLayout, PosixStore
lay = BlockLayout(2, (1024,), torch.float32)
store = PosixStore(sys.argv[1], lay)
store._pause_before_publish = 120.0
bid, phase = sys.argv[2], sys.argv[3]
store.wait(store.dump([bid], 0, torch.ones(1, 1024)))
if phase == "between-shards":
    print("ready", flush=True)
    time.sleep(120)
print("ready", flush=True)
store.wait(store.dump([bid], 1, torch.ones(1, 1024)))
"""


@pytest.mark.parametrize("phase", ["between-shards", "before-rename"])
def test_process_killed_during_dump_leaves_no_block(phase: str, tmp_path: Path) -> None:
    root = tmp_path / "kv"
    bid = ids_for(1)[0]
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(root), bid, phase], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        deadline = time.time() + 30
        while phase == "before-rename":  # wait until the header (the last write) is in the temp file
            tmps = tmp_files(root)
            if tmps and (root / tmps[0]).read_bytes()[:8] == posix_mod.MAGIC:
                break
            assert time.time() < deadline, "the child never reached the rename"
            time.sleep(0.05)
        assert len(tmp_files(root)) == 1
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    layout = BlockLayout(2, (1024,), torch.float32)
    store = PosixStore(root, layout)  # opening sweeps the dead process's temp file
    assert store.lookup([bid]) == [False]
    assert blk_files(root) == [] and tmp_files(root) == []
    with pytest.raises(TaskFailed) as err:
        store.wait(store.load([bid], 0, torch.empty(1, 1024)))
    assert err.value.missing == [bid]


# ------------------------------------------------------------------------------ corruption
def _stored(tmp_path: Path) -> tuple[PosixStore, list[str]]:
    store = PosixStore(tmp_path / "kv", LAYOUT)
    ids = ids_for(3)
    dump_all(store, ids)
    return store, ids


@pytest.mark.parametrize("where", ["payload", "header", "checksum-table"])
def test_flipped_byte_is_a_miss_never_data(where: str, tmp_path: Path) -> None:
    store, ids = _stored(tmp_path)
    path = store.path(ids[1])
    raw = bytearray(path.read_bytes())
    at = {
        "payload": store.header_size + 2 * store.stride + 100,
        "header": 30,
        "checksum-table": posix_mod._FIXED.size + 8 * 3 + 4 * 2,
    }[where]
    raw[at] ^= 0x10
    path.write_bytes(bytes(raw))
    store = PosixStore(tmp_path / "kv", LAYOUT)  # a fresh process: no remembered header
    out = torch.full((3, *LAYOUT.shard_shape), 7.0, dtype=LAYOUT.dtype)
    with pytest.raises(TaskFailed) as err:
        store.wait(store.load(ids, 2, out))
    assert err.value.missing == [ids[1]] and isinstance(err.value.failures[ids[1]], BlockCorrupt)
    assert same_bits(out[0], shard_data(ids[0], 2)) and same_bits(out[2], shard_data(ids[2], 2))
    assert store.lookup(ids) == [True, False, True]  # the bad file is gone: a later dump can replace it
    dump_all(store, [ids[1]])
    assert same_bits(load_shard(store, [ids[1]], 2)[0], shard_data(ids[1], 2))


def test_header_holds_crc32c_of_each_shard_and_an_old_format_is_a_miss(tmp_path: Path) -> None:
    """The format as documented in ucm/store/posix.py, read back with struct: each shard's
    checksum is the CRC-32C of its bytes on disk (checked against the standard test vector of
    CRC-32C first, so a wrong polynomial cannot pass), and a version-1 file (zlib CRC-32) is a
    miss, not data."""
    import struct

    import crc32c

    assert crc32c.crc32c(b"123456789") == 0xE3069283  # RFC 3720's check value
    store, ids = _stored(tmp_path)
    raw = store.path(ids[0]).read_bytes()
    _, version, hsize, stride, _, _, nshards, ndim = posix_mod._FIXED.unpack_from(raw)
    assert version == 2 and nshards == LAYOUT.num_shards
    table = struct.unpack_from(f"<{nshards}I", raw, posix_mod._FIXED.size + 8 * ndim)
    for k in range(nshards):
        payload = raw[hsize + k * stride : hsize + k * stride + LAYOUT.shard_nbytes]
        assert payload == shard_data(ids[0], k).view(torch.uint8).numpy().tobytes()
        assert table[k] == crc32c.crc32c(payload)
    old = bytearray(raw)
    struct.pack_into("<I", old, 8, 1)  # the version field
    store.path(ids[0]).write_bytes(bytes(old))
    fresh = PosixStore(tmp_path / "kv", LAYOUT)
    with pytest.raises(TaskFailed) as err:
        fresh.wait(fresh.load(ids[:1], 0, torch.empty((1, *LAYOUT.shard_shape), dtype=LAYOUT.dtype)))
    assert isinstance(err.value.failures[ids[0]], BlockCorrupt) and "version 1" in str(err.value.failures[ids[0]])


def test_truncated_file_is_a_miss(tmp_path: Path) -> None:
    store, ids = _stored(tmp_path)
    path = store.path(ids[0])
    os.truncate(path, path.stat().st_size - 1000)
    assert store.lookup(ids) == [False, True, True]
    with pytest.raises(TaskFailed) as err:
        store.wait(store.load(ids[:1], 0, torch.empty((1, *LAYOUT.shard_shape), dtype=LAYOUT.dtype)))
    assert isinstance(err.value.failures[ids[0]], BlockCorrupt)
    path.write_bytes(b"")  # an empty file too
    assert store.lookup(ids[:1]) == [False]


@pytest.mark.parametrize(
    "other", [BlockLayout(4, (8, 2, 16), torch.float16), BlockLayout(4, (8, 2, 256), LAYOUT.dtype)]
)
def test_other_layout_under_our_id_is_a_miss_and_replaced(other: BlockLayout, tmp_path: Path) -> None:
    """A namespace mix-up: a file under our id that is not a block of our layout never becomes data."""
    _, ids = _stored(tmp_path)
    store = PosixStore(tmp_path / "kv", other)
    with pytest.raises(TaskFailed) as err:
        store.wait(store.load(ids[:1], 0, torch.empty((1, *other.shard_shape), dtype=other.dtype)))
    assert err.value.missing == ids[:1] and store.lookup(ids[:1]) == [False]  # dropped
    dump_all(store, ids[:1], other)
    assert same_bits(load_shard(store, ids[:1], 3, other)[0], shard_data(ids[0], 3, other))
    if other.shard_nbytes > 4096:  # another file size: neither a hit nor kept by a dump
        assert store.lookup(ids[1:2]) == [False]
        dump_all(store, ids[1:2], other)
        assert same_bits(load_shard(store, ids[1:2], 2, other)[0], shard_data(ids[1], 2, other))


# ------------------------------------------------------------------------------ full / read-only disks
def _mount_tmpfs(path: Path, opts: str) -> bool:
    path.mkdir()
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "none", str(path)], capture_output=True, check=False
        ).returncode
        == 0
    )


def test_disk_full_is_a_clear_error_and_leaves_no_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "small"
    layout = BlockLayout(4, (64 * 1024,), torch.uint8)  # 256 KiB blocks
    if not _mount_tmpfs(root, "size=1m"):
        # no mount rights: a real EFBIG from a file-size rlimit in a child process instead
        code = """
        import resource, signal, sys, torch
        from ucm.store import BlockLayout, PosixStore, TaskFailed, prefix_block_hashes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = PosixStore(sys.argv[1], BlockLayout(4, (64 * 1024,), torch.uint8))
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            store.wait(store.dump(prefix_block_hashes(range(4), 4), 0, torch.ones(1, 64 * 1024, dtype=torch.uint8)))
        except TaskFailed as exc:
            print(exc)
        """
        out = run_py(code, str(root))
        assert "cannot" in out.stdout and "EFBIG" in out.stdout, out.stdout + out.stderr
        assert tmp_files(root) == []
        return
    try:
        store = PosixStore(root, layout)
        ids = prefix_block_hashes(range(40), 4)
        stored, error = [], None
        for bid in ids:
            try:
                dump_all(store, [bid], layout)
                stored.append(bid)
            except TaskFailed as exc:
                error = exc
                break
        assert error is not None and 1 <= len(stored) < len(ids)
        assert "no space left on device" in str(error) and str(root) in str(error)
        assert tmp_files(root) == [] and store.lookup(stored) == [True] * len(stored)
        assert same_bits(load_shard(store, stored[:1], 3, layout)[0], shard_data(stored[0], 3, layout))
    finally:
        subprocess.run(["umount", str(root)], check=False)


def test_read_only_directory_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    if not _mount_tmpfs(root, "size=1m,ro"):
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        store = PosixStore(root, LAYOUT)
        with pytest.raises(TaskFailed) as err:
            dump_all(store, ids_for(1))
        assert "read-only file system" in str(err.value) and str(root) in str(err.value)
        assert store.lookup(ids_for(1)) == [False] and tmp_files(root) == []
    finally:
        subprocess.run(["umount", str(root)], check=False)


def test_permission_denied_is_a_clear_error() -> None:
    root = Path(tempfile.mkdtemp(prefix="ucm-store-locked-"))  # under /tmp: other users can reach it
    os.chmod(root, 0o555)
    code = """
    import os, sys, torch
    from ucm.store import BlockLayout, PosixStore, TaskFailed, prefix_block_hashes
    if sys.argv[2] == "drop":  # root ignores mode bits: become nobody once imports are done
        os.setuid(65534)
    store = PosixStore(sys.argv[1], BlockLayout(1, (16,), torch.float32))
    try:
        store.wait(store.dump(prefix_block_hashes(range(4), 4), 0, torch.ones(1, 16)))
    except TaskFailed as exc:
        print(exc)
    """
    out = run_py(code, str(root), "drop" if os.geteuid() == 0 else "keep")
    assert "permission denied" in out.stdout and str(root) in out.stdout, out.stdout + out.stderr
    assert list(root.iterdir()) == []
    root.rmdir()


def test_o_direct_refused_falls_back_with_a_message(tmp_path: Path, monkeypatch, caplog) -> None:
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & posix_mod._O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(posix_mod.os, "open", no_direct)
    with caplog.at_level(logging.WARNING, logger="ucm.store"):
        store = PosixStore(tmp_path, LAYOUT, use_direct=True)
    assert not store.direct and "does not support O_DIRECT" in caplog.text
    dump_all(store, ids_for(1))
    assert same_bits(load_shard(store, ids_for(1), 0)[0], shard_data(ids_for(1)[0], 0))


# ------------------------------------------------------------------------------ concurrency
PROC_CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from test_store import LAYOUT, dump_all, ids_for, load_shard, shard_data, same_bits
from ucm.store import PosixStore, TaskFailed
store = PosixStore(sys.argv[1], LAYOUT, workers=2, use_direct=True)
shared, own = ids_for(6, "shared"), ids_for(3, "own" + sys.argv[2])
for round in range(3):
    dump_all(store, shared[round::3] + own)
    for s in range(4):
        try:
            got = load_shard(store, shared, s)
        except TaskFailed as exc:  # not all written yet: a miss is fine, wrong bytes are not
            assert all(isinstance(e, Exception) for e in exc.failures.values())
            continue
        assert all(same_bits(g, shard_data(i, s)) for g, i in zip(got, shared))
print("ok", ids_for(6, "shared")[5])
"""


def test_concurrent_writers_and_readers_threads_and_processes(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    here = str(Path(__file__).parent)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROC_CHILD, str(root), str(k), here],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(3)
    ]
    store = PosixStore(root, LAYOUT, workers=4)
    shared = ids_for(6, "shared")
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for _ in range(5):
                dump_all(store, shared[k % 3 :: 2] + ids_for(2, f"thread{k}"))
        except Exception as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(20):
                out = torch.empty((6, *LAYOUT.shard_shape), dtype=LAYOUT.dtype)
                try:
                    store.wait(store.load(shared, 1, out))
                except TaskFailed as exc:
                    assert set(exc.missing) == set(exc.ids)  # only misses, never I/O errors
                    continue
                assert all(same_bits(o, shard_data(i, 1)) for o, i in zip(out, shared, strict=False))
        except Exception as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outs = [p.communicate(timeout=60) for p in procs]
    assert not errors, errors
    for p, (out, err) in zip(procs, outs, strict=False):
        assert p.returncode == 0 and out.split() == ["ok", shared[5]], err  # same ids in every process
    everything = shared + [i for k in range(4) for i in ids_for(2, f"thread{k}")]
    everything += [i for k in range(3) for i in ids_for(3, f"own{k}")]
    assert store.lookup(everything) == [True] * len(everything)
    for s in range(4):
        got = load_shard(store, everything, s)
        assert all(same_bits(g, shard_data(i, s)) for g, i in zip(got, everything, strict=False))
    assert len(blk_files(root)) == len(everything) and tmp_files(root) == []


def test_many_threads_racing_on_one_block_all_succeed(tmp_path: Path) -> None:
    """Writers of the very same shards: exactly one publish, no spurious failure, no leftovers."""
    store = PosixStore(tmp_path / "kv", LAYOUT, workers=8)
    for round_ in range(10):
        bid = ids_for(1, f"race{round_}")[0]
        srcs = [torch.stack([shard_data(bid, s)]) for s in range(4)]
        tasks = [store.dump([bid], s, srcs[s]) for _ in range(6) for s in range(4)]
        for task in tasks:
            store.wait(task)
        assert same_bits(load_shard(store, [bid], 2)[0], shard_data(bid, 2))
    assert len(blk_files(tmp_path / "kv")) == 10 and tmp_files(tmp_path / "kv") == []


# ------------------------------------------------------------------------------ eviction
def test_posix_capacity_evicts_least_recently_used(tmp_path: Path) -> None:
    probe = PosixStore(tmp_path / "probe", LAYOUT)
    cap = 5 * probe.file_size
    store = PosixStore(tmp_path / "kv", LAYOUT, capacity=cap)
    store.touch_interval_s = 0.0  # every load refreshes the LRU stamp
    ids = ids_for(12)
    dump_all(store, ids[:4])
    time.sleep(0.02)
    load_shard(store, ids[:1], 0)  # block 0 is now the most recently used
    store._begin_load([ids[1]])  # block 1 is being read: never a victim
    for bid in ids[4:6]:
        time.sleep(0.02)
        dump_all(store, [bid])
    # the sixth block crossed the limit: the two oldest untouched blocks went, down to 90 %
    assert store.lookup(ids[:6]) == [True, True, False, False, True, True]
    for bid in ids[6:]:
        time.sleep(0.02)
        dump_all(store, [bid])
        assert store.used_bytes() <= cap
    assert store.lookup([ids[1], ids[-1]]) == [True, True]  # the pinned one stays, the newest too
    store._end_load([ids[1]])
    # a new store over the same directory honours the limit on open
    smaller = PosixStore(tmp_path / "kv", LAYOUT, capacity=2 * probe.file_size)
    assert smaller.used_bytes() <= 2 * probe.file_size and smaller.lookup(ids[-1:]) == [True]


def test_dram_cache_bound_and_lru() -> None:
    cache = DramStore(LAYOUT, 3 * LAYOUT.block_nbytes + 100)
    ids = ids_for(5)
    dump_all(cache, ids[:3])
    assert cache.lookup(ids[:1]) == [True]  # a hit refreshes block 0
    dump_all(cache, ids[3:5])
    assert cache.used_bytes() <= cache.capacity
    assert cache.lookup(ids) == [True, False, False, True, True]
    assert same_bits(load_shard(cache, ids[:1], 2)[0], shard_data(ids[0], 2))
    with pytest.raises(StoreError, match="smaller than one block"):
        DramStore(LAYOUT, LAYOUT.block_nbytes - 1)


def test_pipeline_hit_path_and_fill(tmp_path: Path) -> None:
    cache = DramStore(LAYOUT, 8 * LAYOUT.block_nbytes)
    disk = PosixStore(tmp_path / "kv", LAYOUT)
    pipe = PipelineStore(cache, disk, workers=2)
    ids = ids_for(3)
    dump_all(pipe, ids)  # write-through
    assert cache.lookup(ids) == disk.lookup(ids) == [True] * 3
    cache.clear()
    assert pipe.lookup(ids) == [True] * 3  # from the disk
    for s in range(4):
        load_shard(pipe, ids, s)  # from the disk, filling the cache
    assert cache.lookup(ids) == [True] * 3
    for p in (tmp_path / "kv").iterdir():
        p.unlink()  # the disk forgets; the cache still serves
    hits = cache.hits
    got = load_shard(pipe, ids, 3)
    assert all(same_bits(g, shard_data(i, 3)) for g, i in zip(got, ids, strict=False)) and cache.hits == hits + 3
    assert pipe.lookup(ids_for(1, "new")) == [False]


def test_empty_store_stores_nothing() -> None:
    store = EmptyStore(LAYOUT, 2)
    ids = ids_for(2)
    dump_all(store, ids)
    assert store.lookup(ids) == [False, False]
    with pytest.raises(TaskFailed) as err:
        load_shard(store, ids, 0)
    assert isinstance(err.value.failures[ids[0]], BlockMissing)


# ------------------------------------------------------------------------------ config -> store
def _conn(name: str, **cfg) -> dict:
    return {"ucm_connectors": [{"ucm_connector_name": name, "ucm_connector_config": cfg}]}


def test_factory_builds_each_connector_from_its_config(tmp_path: Path) -> None:
    d = str(tmp_path / "kv")
    built = {
        "nfs": _conn(
            "UcmNfsStore",
            storage_backends=d,
            use_direct=True,
            transferStreamNumber=3,
            storage_capacity=1 << 30,
            kv_block_size=LAYOUT.block_nbytes,
        ),
        "dram": _conn("UcmDramStore", max_cache_size=1 << 20),
        "pipe": _conn("UcmPipelineStore", storage_backends=[d, d + "2"], max_cache_size=1 << 20),
        "empty": _conn("UcmPipelineStore", store_pipeline="Empty"),
    }
    stores = {k: build_store(parse_extra_config(v).stores[0].to_spec(), LAYOUT) for k, v in built.items()}
    assert isinstance(stores["nfs"], PosixStore) and stores["nfs"].direct and stores["nfs"].workers == 3
    assert stores["nfs"].capacity == 1 << 30
    assert isinstance(stores["dram"], DramStore) and stores["dram"].capacity == 1 << 20
    assert isinstance(stores["pipe"], PipelineStore) and len(stores["pipe"].backing.roots) == 2
    assert isinstance(stores["empty"], EmptyStore)
    with pytest.raises(StoreError, match="kv_block_size"):
        build_store(StoreSpec("Posix", (d,), kv_block_size=123), LAYOUT)


@pytest.mark.parametrize(
    "name, cfg, key",
    [
        ("UcmNfsStore", {}, "storage_backends"),
        ("UcmNfsStore", {"storage_backends": "/x", "max_cache_size": 5}, "max_cache_size"),
        ("UcmDramStore", {"max_cache_size": 5, "use_direct": True}, "use_direct"),
        ("UcmDramStore", {"max_cache_size": 5, "store_pipeline": "Posix"}, "store_pipeline"),
        ("UcmPipelineStore", {"storage_backends": "/x"}, "max_cache_size"),
        ("UcmPipelineStore", {"store_pipeline": "Empty", "storage_capacity": 9}, "storage_capacity"),
        ("UcmNfsStore", {"storage_backends": []}, "storage_backends"),
        ("UcmNfsStore", {"storage_backends": "/x", "bogus": 1}, "bogus"),
    ],
)
def test_config_rejects_keys_that_would_do_nothing(name: str, cfg: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_extra_config(_conn(name, **cfg))
    assert err.value.key == f"ucm_connectors[0].ucm_connector_config.{key}"


@pytest.mark.parametrize(
    "bad",
    [
        "AB" * 16,
        "0x" + "ab" * 15,
        "ab" * 15 + "_a",
        " " + "ab" * 15 + "a",
        "+" + "a" * 31,
        "\u0661" * 32,
        "ab" * 15,
        "ab" * 17,
        12345,
    ],
)
def test_non_canonical_ids_are_refused_at_the_api(tmp_path, bad) -> None:
    """One block, one spelling: upper case, `0x`, `_`, spaces, a sign, Unicode digits and other
    lengths are refused by dump and lookup before any file is named after them (an uppercase id
    used to be stored, then called corrupt and deleted by another process's first load)."""
    from ucm.store import BlockLayout, PosixStore

    layout = BlockLayout(1, (64,), torch.uint8)
    with PosixStore([tmp_path], layout) as store:
        with pytest.raises(ValueError, match="lowercase hex digits"):
            store.lookup([bad])
        with pytest.raises(ValueError, match="lowercase hex digits"):
            store.dump([bad], 0, [torch.zeros(64, dtype=torch.uint8)])
    assert not list(tmp_path.rglob("*.blk")) and not list(tmp_path.rglob("*.tmp*"))


def test_storage_backends_are_expanded_normalised_and_never_listed_twice(monkeypatch, tmp_path) -> None:
    """`~` is expanded (a literal `~` directory used to appear) and `/kv`, `/kv/` are one
    directory, refused when listed twice (its capacity used to be counted twice)."""
    monkeypatch.setenv("HOME", str(tmp_path))

    def spec(backends):
        extra = {
            "ucm_connectors": [
                {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": backends}}
            ]
        }
        return parse_extra_config(extra).stores[0].to_spec()

    assert spec("~/kv").storage_backends == (str(tmp_path / "kv"),)
    assert spec(["/a/kv/", "/b/kv"]).storage_backends == ("/a/kv", "/b/kv")
    for twice in (["/kv", "/kv/"], ["~/kv", str(tmp_path / "kv")], ["/kv", "/x/../kv"]):
        with pytest.raises(ConfigError, match="storage_backends.*names one directory twice"):
            spec(twice)
