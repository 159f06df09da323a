"""--source: Services, EndpointSlices and Nodes from a YAML file or a directory of them.

Multi-document YAML or JSON, `kind: List` accepted, in the same shape the API serves. JSON is
decoded as JSON (msgspec), YAML with libyaml. The files are re-read when they change (polled; only
the files that changed are parsed again), and the whole set replaces the previous one. A file that
does not parse stops the agent at start-up (the error names the file and line); at run time it is
logged and counted, and that file's last good objects stay.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

from agent.files import FileError, json_objects, parse, read
from agent.model.records import KIND_TYPES, DecodeError, Record, from_builtins, from_json
from agent.model.serviceport import NamespacedName, Problem
from agent.sources.base import Sink, key_of

log = logging.getLogger("agent.source.file")
SUFFIXES = (".yaml", ".yml", ".json")
Records = dict[str, dict[NamespacedName, Record]]
Stamp = tuple[int, int, int]


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    return [path]


def _items(docs: Iterable[object]) -> Iterator[object]:
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "List":
            yield from doc.get("items") or []
        elif doc is not None:
            yield doc


def _kind(doc: object) -> str:
    return str(doc.get("kind", "")) if isinstance(doc, dict) else ""


def load_file(f: Path) -> tuple[Records, list[Problem]]:
    """The records of one file and the objects in it that could not be decoded; FileError when the
    file itself cannot be read or parsed."""
    out: Records = {k: {} for k in KIND_TYPES}
    problems: list[Problem] = []
    data = read(f, str(f))
    objects = json_objects(data, str(f), json_only=f.suffix == ".json")
    decoders: Iterable[tuple[str, Callable[[], Record]]]
    if objects is not None:  # JSON: each object decoded from its own bytes straight into its record
        decoders = ((kind, partial(from_json, kind, raw)) for kind, raw in objects)
    else:
        decoders = ((kind, partial(from_builtins, kind, doc))
                    for doc in _items(parse(data, str(f))) for kind in (_kind(doc),))
    for kind, decode in decoders:
        if kind not in KIND_TYPES:
            continue  # other kinds (Pods, Deployments ...) may share the file
        try:
            rec = decode()
        except DecodeError as exc:
            problems.append(Problem(kind, str(f), "decode_error", str(exc)))
            continue
        out[kind][key_of(rec)] = rec
    return out, problems


def _merge(parts: Iterable[Records]) -> Records:
    out: Records = {k: {} for k in KIND_TYPES}
    for part in parts:
        for kind, recs in part.items():
            out[kind].update(recs)
    return out


def load(path: Path) -> tuple[Records, list[Problem]]:
    """Every record under `path` by kind, and what could not be read."""
    parts: list[Records] = []
    problems: list[Problem] = []
    for f in _files(path):
        try:
            recs, bad = load_file(f)
        except FileError as exc:
            problems.append(Problem("File", str(f), "unreadable", f"cannot parse: {exc}"))
            continue
        parts.append(recs)
        problems += bad
    return _merge(parts), problems


def _stamp_of(f: Path) -> Stamp | None:
    """What tells a file changed: its inode too (a file replaced by rename, as editors and
    ConfigMap volumes do, within the file system's timestamp granularity, keeps mtime and size)."""
    try:
        st = f.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _stamp(path: Path) -> tuple[tuple[str, Stamp], ...]:
    return tuple((str(f), st) for f in _files(path) if (st := _stamp_of(f)) is not None)


class FileSource:
    def __init__(self, path: str, sink: Sink, poll_seconds: float = 0.5) -> None:
        self.path = Path(path)
        self.sink = sink
        self.poll = poll_seconds
        self._stop = threading.Event()
        self._stamp: tuple[tuple[str, Stamp], ...] = ()
        # file -> (its stamp when parsed, its records): the last good parse of each file
        self._parsed: dict[str, tuple[Stamp, Records]] = {}

    def check(self) -> None:
        """At start-up: the path exists and every file in it parses (FileError names the first
        that does not, with its line)."""
        if not self.path.exists():
            raise FileNotFoundError(f"--source {self.path}: no such file or directory")
        self._read(strict=True)

    def _read(self, *, strict: bool) -> Records:
        """Every file's records: parsed again only where the file changed; a file that does not
        parse raises (`strict`) or keeps its last good records (logged and counted)."""
        stamp = _stamp(self.path)
        parsed: dict[str, tuple[Stamp, Records]] = {}
        for name, st in stamp:
            prev = self._parsed.get(name)
            if prev is not None and prev[0] == st:
                parsed[name] = prev
                continue
            try:
                recs, bad = load_file(Path(name))
            except FileError as exc:
                if strict:
                    raise FileError(f"--source {exc}") from None
                self.sink.bad_object(Problem("File", name, "unreadable", f"cannot parse: {exc}"))
                log.error("--source file does not parse; keeping its last good objects file=%s error=%r", name,
                          str(exc))
                if prev is not None:
                    parsed[name] = prev
                continue
            for p in bad:
                self.sink.bad_object(p)
            parsed[name] = (st, recs)
        self._parsed, self._stamp = parsed, stamp
        return _merge(recs for _, recs in parsed.values())

    def load_once(self, keep: bool = True) -> None:
        """Apply every file's objects. `keep=False` for a one-shot load (--once, render, explain):
        the records are not kept for a reload (at 10k Services they held 46 MB through the sync)."""
        records = self._read(strict=False)
        if not keep:
            self._parsed = {}
        counts = {kind: len(recs) for kind, recs in records.items()}
        for kind in KIND_TYPES:  # each kind's records go once applied, unless kept
            self.sink.replace_all(kind, records[kind] if keep else records.pop(kind))
        log.info("source loaded path=%s services=%d endpointslices=%d nodes=%d", self.path,
                 counts["Service"], counts["EndpointSlice"], counts["Node"])

    def run(self) -> None:
        """Load, then re-load whenever the files change, until stop()."""
        self.load_once()
        while not self._stop.wait(self.poll):
            try:
                if os.path.exists(self.path) and _stamp(self.path) != self._stamp:
                    self.load_once()
            except Exception:  # keep watching; the next change gets another chance
                log.exception("reloading the source failed path=%s; keeping the last objects", self.path)

    def start(self) -> None:
        threading.Thread(target=self.run, name="file-source", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
