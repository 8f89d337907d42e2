"""The content-addressed teacher cache on disk: packed frames of one sequence each, found by a key.

The trainer (``--teacher_cache``) and ``gkd-teacher precompute`` both write it and must agree on every
byte of the key, so it lives here, beside the frame it stores.

Key. A record's key hashes the :class:`CacheContext` (teacher fingerprint, model name and revision,
vocabulary, k, temperature, log-prob and tail mode, cache format) with the sequence's token ids and its
row spans: another teacher, k, temperature or tail mode gives other keys, hence no hits, never wrong rows.

Layout. Every writer (one per process: a rank, a precompute) appends to its own shard,
``<host>-<pid>-<nonce>-<n>.shard.part``, and never touches another's, so concurrent writers need no
lock, which matters because file locking (SQLite's included) is unreliable on NFS. Sealing a shard
fsyncs it, renames it to ``.shard``, writes its index (an SQLite database, ``.idx.part``) and renames that
to ``.idx``: renames are atomic, so a reader sees a whole sealed shard or nothing. Readers open every
sealed index read-only and ``immutable`` (no locks, no journal), and their own writer's unsealed records
from memory. A writer seals when it closes and every ``seal_bytes`` or ``seal_seconds``.

Integrity. A shard starts with a magic and its context; every record has a header (magic, key, length,
CRC-32 of the payload), checked on every read. An index whose format or context differs, a shard shorter
than its index says or with another header, and a record whose header or checksum does not match are
ignored with a warning, never trusted: the row is fetched from the teacher again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import sqlite3
import struct
import time
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from shared.alignment import RowSpan
from shared.codec import FrameError, TopkFrame, decode_frame, encode_frame

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bumped when the key, the shard or the index layout changes: older files are then foreign."""

SHARD_MAGIC = b"GKDTC\x00\x01\n"
RECORD = struct.Struct("<4s16sQI")
"""Record header: magic, key, payload length, CRC-32 of the payload."""
RECORD_MAGIC = b"GKDR"
KEY_BYTES = 16
SHARD_SUFFIX, INDEX_SUFFIX, PART = ".shard", ".idx", ".part"

SEAL_BYTES = 256 * 1024 * 1024
SEAL_SECONDS = 600.0
"""A writer's records become visible to other processes when sealed: at close, and at least this often."""
RESCAN_SECONDS = 30.0
"""A reader looks for newly sealed shards (other ranks', other nodes') on a miss, at most this often."""


class CacheError(ValueError):
    """The cache cannot serve this run as asked (no rows for this student, several teachers' rows)."""


@dataclass(frozen=True)
class CacheContext:
    """Everything besides the sequence that decides a teacher row: a record's key covers all of it."""

    model: str
    model_revision: str
    tokenizer_fingerprint: str
    vocab_size: int
    top_k: int
    temperature: float = 1.0
    logprob_mode: str = "raw"
    tail: bool = False
    """Rows carry ``tail_logmass`` (the trainer's ``--tail tail``)."""
    logprobs: str = "float16"

    def to_json(self) -> str:
        return json.dumps({"cache_format": CACHE_FORMAT, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CacheContext:
        fields = json.loads(text)
        if fields.pop("cache_format", None) != CACHE_FORMAT:
            raise CacheError(f"cache format is not {CACHE_FORMAT}")
        return cls(**fields)

    @property
    def digest(self) -> bytes:
        return hashlib.blake2b(self.to_json().encode(), digest_size=KEY_BYTES).digest()

    def key(self, token_ids: Sequence[int], row_spans: Sequence[RowSpan]) -> bytes:
        """The record key of one sequence's rows: its ids and spans under this context."""
        ids = np.asarray(token_ids, dtype="<i4")
        spans = np.asarray(list(row_spans), dtype="<i8").reshape(-1)
        h = hashlib.blake2b(self.digest, digest_size=KEY_BYTES)
        h.update(struct.pack("<QQ", ids.size, spans.size))
        h.update(ids.tobytes())
        h.update(spans.tobytes())
        return h.digest()

    def encode(self, frame: TopkFrame) -> bytes:
        """One sequence's rows as stored: a packed frame, fp16 log-probs (as the wire's default) unless q8."""
        q8 = self.logprobs == "q8"
        stored = replace(frame.with_spans(), logprobs=frame.logprobs.float() if q8 else frame.logprobs.half())
        return encode_frame(stored, ids_encoding="packed", vocab_size=self.vocab_size, logprobs_q8=q8)


@dataclass(frozen=True)
class Location:
    path: Path
    offset: int
    length: int
    crc: int


def _shard_header(context_json: str) -> bytes:
    text = context_json.encode()
    return SHARD_MAGIC + struct.pack("<I", len(text)) + text


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_shard_header(f: BinaryIO) -> str | None:
    head = f.read(len(SHARD_MAGIC) + 4)
    if len(head) < len(SHARD_MAGIC) + 4 or head[: len(SHARD_MAGIC)] != SHARD_MAGIC:
        return None
    (n,) = struct.unpack("<I", head[len(SHARD_MAGIC) :])
    text = f.read(n)
    return text.decode(errors="replace") if len(text) == n else None


class _Shard:
    """A sealed shard and its index, opened read-only."""

    def __init__(self, index: Path) -> None:
        self.index_path = index
        self.db = sqlite3.connect(f"file:{index}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        try:
            meta = dict(self.db.execute("SELECT name, value FROM meta").fetchall())
            if meta.get("cache_format") != str(CACHE_FORMAT):
                raise CacheError(f"cache format {meta.get('cache_format')!r}, this code reads {CACHE_FORMAT}")
            self.context_json = str(meta["context"])
            self.path = index.with_name(str(meta["shard"]))
            self.size = int(meta["shard_bytes"])
        except BaseException:
            self.db.close()
            raise

    def check(self) -> None:
        """The shard holds what its index says: its size and header (magic and context)."""
        actual = self.path.stat().st_size if self.path.exists() else None
        if actual != self.size:
            raise CacheError(f"shard {self.path.name} has {actual} bytes, its index says {self.size} (truncated?)")
        with self.path.open("rb") as f:
            header = _read_shard_header(f)
        if header != self.context_json:
            raise CacheError(f"shard {self.path.name} has another header than its index names")

    def find(self, keys: list[bytes]) -> dict[bytes, Location]:
        found: dict[bytes, Location] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT key, offset, length, crc FROM records WHERE key IN ({marks})"
            for key, offset, length, crc in self.db.execute(query, chunk):
                found[bytes(key)] = Location(self.path, int(offset), int(length), int(crc))
        return found

    def close(self) -> None:
        self.db.close()


def cached_contexts(root: str | Path) -> list[CacheContext]:
    """The contexts of the sealed shards in ``root`` (what an offline run chooses its teacher from)."""
    out: set[CacheContext] = set()
    for index in sorted(Path(root).glob(f"*{INDEX_SUFFIX}")):
        try:
            shard = _Shard(index)
        except (sqlite3.Error, CacheError, KeyError, ValueError):
            continue  # TeacherCache warns about it when it opens the directory
        try:
            out.add(CacheContext.from_json(shard.context_json))
        except (CacheError, TypeError, ValueError):
            pass
        finally:
            shard.close()
    return sorted(out, key=lambda c: c.to_json())


class TeacherCache:
    """Reads every sealed shard of one context in ``root``; with ``writable``, appends to a shard of its own.

    Use from one thread, except :meth:`read`, which any thread may call (it only reads files).
    """

    def __init__(
        self,
        root: str | Path,
        context: CacheContext,
        *,
        writable: bool = True,
        seal_bytes: int = SEAL_BYTES,
        seal_seconds: float = SEAL_SECONDS,
        rescan_seconds: float = RESCAN_SECONDS,
    ) -> None:
        self.root = Path(root)
        self.context = context
        self._context_json = context.to_json()
        self.writable, self.seal_bytes, self.seal_seconds = writable, seal_bytes, seal_seconds
        self.rescan_seconds = rescan_seconds
        if writable:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise CacheError(f"teacher cache {self.root} is not a directory")
        self._shards: dict[Path, _Shard] = {}
        self._seen: set[Path] = set()
        self._last_scan = 0.0
        self._prefix = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._serial = 0
        self._fd: int | None = None
        self._part: Path | None = None
        self._written: dict[bytes, Location] = {}
        self._renamed: dict[Path, Path] = {}
        self._part_bytes = 0
        self._opened_at = 0.0
        self.rescan()

    # --- reading

    def rescan(self) -> None:
        """Open sealed shards not seen yet; warn about (and skip) what cannot be trusted."""
        self._last_scan = time.monotonic()
        others = 0
        for path in sorted(self.root.iterdir()):
            if path in self._seen or path.name.endswith(PART) or path.suffix == SHARD_SUFFIX:
                continue  # seen, still being written, or a shard (read through its index)
            self._seen.add(path)
            if path.suffix != INDEX_SUFFIX:
                logger.warning("teacher cache %s: ignoring %s, which is not a shard or an index", self.root, path.name)
                continue
            try:
                shard = _Shard(path)
            except (sqlite3.Error, CacheError, KeyError, ValueError) as exc:
                logger.warning("teacher cache %s: ignoring index %s, unreadable: %s", self.root, path.name, exc)
                continue
            if shard.context_json != self._context_json:
                others += 1
                shard.close()
                continue
            try:
                shard.check()
            except (OSError, CacheError) as exc:
                logger.warning("teacher cache %s: ignoring %s: %s", self.root, path.name, exc)
                shard.close()
                continue
            self._shards[path] = shard
        if others:
            logger.warning(
                "teacher cache %s: %d shard(s) hold rows of another teacher or settings (model, revision, "
                "tokenizer, k, temperature or tail mode): none of their rows can be hits for this run",
                self.root,
                others,
            )

    def locate(self, keys: Iterable[bytes]) -> dict[bytes, Location]:
        """Where each key that the cache holds is (keys it lacks are absent); looks for new shards on a miss."""
        wanted = list(dict.fromkeys(keys))
        found = {k: self._written[k] for k in wanted if k in self._written}
        for shard in list(self._shards.values()):
            missing = [k for k in wanted if k not in found]
            if not missing:
                return found
            found.update(shard.find(missing))
        if len(found) < len(wanted) and time.monotonic() - self._last_scan >= self.rescan_seconds:
            known = set(self._shards)
            self.rescan()
            for path, shard in self._shards.items():
                if path not in known:
                    found.update(shard.find([k for k in wanted if k not in found]))
        return found

    def read(self, key: bytes, where: Location) -> TopkFrame | None:
        """The record's frame, or None (with a warning) when its header, checksum or frame is wrong.

        Offsets and spans are not validated here (the frame was when written, and its checksum holds):
        validate what is assembled from records, once.
        """
        path = self._renamed.get(where.path, where.path)  # sealed since it was located
        try:
            with path.open("rb") as f:
                f.seek(where.offset)
                data = f.read(RECORD.size + where.length)
        except OSError as exc:
            logger.warning("teacher cache: cannot read %s: %s", where.path.name, exc)
            return None
        if len(data) != RECORD.size + where.length:
            logger.warning("teacher cache: record at %s:%d is truncated", where.path.name, where.offset)
            return None
        magic, got_key, length, crc = RECORD.unpack_from(data)
        payload = data[RECORD.size :]
        if magic != RECORD_MAGIC or got_key != key or length != where.length or crc != where.crc:
            logger.warning("teacher cache: record at %s:%d has another header", where.path.name, where.offset)
            return None
        if zlib.crc32(payload) != crc:
            logger.warning("teacher cache: record at %s:%d fails its checksum", where.path.name, where.offset)
            return None
        try:
            return decode_frame(payload, validate=False)
        except FrameError as exc:
            logger.warning("teacher cache: record at %s:%d is no frame: %s", where.path.name, where.offset, exc)
            return None

    def get(self, keys: Sequence[bytes]) -> list[TopkFrame | None]:
        """Each key's frame, or None."""
        found = self.locate(keys)
        return [self.read(k, found[k]) if k in found else None for k in keys]

    # --- writing

    def put(self, key: bytes, frame: TopkFrame) -> None:
        """Append one sequence's rows (a one-sequence frame); a key this writer holds unsealed is skipped."""
        if not self.writable:
            raise CacheError("this teacher cache was opened read-only")
        if key in self._written:
            return
        payload = self.context.encode(frame)
        if self._fd is None:
            self._open_part()
        assert self._fd is not None and self._part is not None
        crc = zlib.crc32(payload)
        record = RECORD.pack(RECORD_MAGIC, key, len(payload), crc) + payload
        offset = self._part_bytes
        _write_all(self._fd, record)
        self._part_bytes += len(record)
        self._written[key] = Location(self._part, offset, len(payload), crc)
        if self._part_bytes >= self.seal_bytes or time.monotonic() - self._opened_at >= self.seal_seconds:
            self.seal()

    def _open_part(self) -> None:
        self._serial += 1
        self._part = self.root / f"{self._prefix}-{self._serial}{SHARD_SUFFIX}{PART}"
        self._fd = os.open(self._part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        header = _shard_header(self._context_json)
        _write_all(self._fd, header)
        self._part_bytes = len(header)
        self._opened_at = time.monotonic()

    def seal(self) -> None:
        """Make this writer's records visible to every reader: shard renamed, then its index written and renamed."""
        if self._fd is None or self._part is None:
            return
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        shard = self._part.with_name(self._part.name[: -len(PART)])
        os.replace(self._part, shard)
        self._renamed[self._part] = shard
        records = [(k, loc.offset, loc.length, loc.crc) for k, loc in self._written.items()]
        index = shard.with_suffix(INDEX_SUFFIX)
        part_index = index.with_name(index.name + PART)
        with contextlib.suppress(FileNotFoundError):
            part_index.unlink()
        db = sqlite3.connect(part_index)
        try:
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute(
                "CREATE TABLE records (key BLOB PRIMARY KEY, offset INTEGER NOT NULL, length INTEGER NOT NULL, "
                "crc INTEGER NOT NULL) WITHOUT ROWID"
            )
            meta = {
                "cache_format": str(CACHE_FORMAT),
                "context": self._context_json,
                "shard": shard.name,
                "shard_bytes": str(self._part_bytes),
                "records": str(len(records)),
                "writer": self._prefix,
            }
            db.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
            db.executemany("INSERT OR IGNORE INTO records VALUES (?, ?, ?, ?)", records)
            db.commit()
        finally:
            db.close()
        with open(part_index, "rb") as f:
            os.fsync(f.fileno())
        os.replace(part_index, index)
        self._seen.add(index)
        self._shards[index] = _Shard(index)  # its records are read from there on, like any sealed shard's
        self._written.clear()
        self._part = None
        logger.info("teacher cache %s: sealed %s (%d records)", self.root, shard.name, len(records))

    def close(self) -> None:
        if self.writable:
            self.seal()
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
