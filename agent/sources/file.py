"""--source: Services, EndpointSlices and Nodes from a YAML file or a directory of them.

Multi-document YAML or JSON, `kind: List` accepted, in the same shape the API serves. The files
are re-read when they change (polled), and the whole set replaces the previous one.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import yaml

from agent.model.records import KIND_TYPES, DecodeError, Record, from_builtins
from agent.model.serviceport import NamespacedName, Problem
from agent.sources.base import Sink, key_of

log = logging.getLogger("agent.source.file")
SUFFIXES = (".yaml", ".yml", ".json")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    return [path]


def _documents(path: Path) -> Iterator[object]:
    with path.open() as fh:
        for doc in yaml.safe_load_all(fh):
            if isinstance(doc, dict) and doc.get("kind") == "List":
                yield from doc.get("items") or []
            elif doc is not None:
                yield doc


def load(path: Path) -> tuple[dict[str, dict[NamespacedName, Record]], list[Problem]]:
    """Every record under `path` by kind, and what could not be read."""
    out: dict[str, dict[NamespacedName, Record]] = {k: {} for k in KIND_TYPES}
    problems: list[Problem] = []
    for f in _files(path):
        try:
            docs = list(_documents(f))
        except (OSError, ValueError, yaml.YAMLError) as exc:  # ValueError: not UTF-8
            problems.append(Problem("File", str(f), "unreadable", f"cannot parse: {exc}"))
            continue
        for doc in docs:
            kind = doc.get("kind", "") if isinstance(doc, dict) else ""
            if kind not in KIND_TYPES:
                continue  # other kinds (Pods, Deployments ...) may share the file
            try:
                rec = from_builtins(kind, doc)
            except DecodeError as exc:
                problems.append(Problem(kind, str(f), "decode_error", str(exc)))
                continue
            out[kind][key_of(rec)] = rec
    return out, problems


def _stamp(path: Path) -> tuple[tuple[str, int, int, int], ...]:
    """What tells a file changed: its inode too (a file replaced by rename, as editors and
    ConfigMap volumes do, within the file system's timestamp granularity, keeps mtime and size)."""
    stamps = []
    for f in _files(path):
        try:
            st = f.stat()
        except OSError:
            continue
        stamps.append((str(f), st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


class FileSource:
    def __init__(self, path: str, sink: Sink, poll_seconds: float = 0.5) -> None:
        self.path = Path(path)
        self.sink = sink
        self.poll = poll_seconds
        self._stop = threading.Event()
        self._stamp: tuple[tuple[str, int, int, int], ...] = ()

    def check(self) -> None:
        if not self.path.exists():
            raise FileNotFoundError(f"--source {self.path}: no such file or directory")

    def load_once(self) -> None:
        self._stamp = _stamp(self.path)
        records, problems = load(self.path)
        for p in problems:
            self.sink.bad_object(p)
        for kind in KIND_TYPES:
            self.sink.replace_all(kind, records[kind])
        log.info("source loaded path=%s services=%d endpointslices=%d nodes=%d", self.path,
                 len(records["Service"]), len(records["EndpointSlice"]), len(records["Node"]))

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
