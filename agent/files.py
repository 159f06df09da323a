"""Reading the files the agent is given (--config, --source, a kubeconfig): JSON decoded as JSON
(msgspec: a 14 MB List in well under a second), YAML with libyaml when PyYAML has it, and every
parse error naming the file and the line."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import yaml

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BYTE = re.compile(r"\(byte (\d+)\)")
NEWLINE = b"\n"


class FileError(ValueError):
    """A file that cannot be read or parsed; the message names the file and, when known, the line."""


def _json_line(data: bytes, exc: msgspec.DecodeError) -> str:
    m = _BYTE.search(str(exc))
    if m is None:
        return ""
    return f"line {data.count(NEWLINE, 0, int(m.group(1))) + 1}: "


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc)
    context = getattr(exc, "context", None)
    return f"{where}{problem}" + (f" ({context})" if context else "")


def parse(data: bytes, name: str, *, json_only: bool = False) -> list[object]:
    """The documents in `data` (read from `name`, used in errors): one for JSON, as many as the
    YAML stream holds. Text that starts like JSON is tried as JSON first; if that fails and the
    file is not `.json`, as YAML (a YAML flow mapping starts with `{` too)."""
    if json_only or data.lstrip()[:1] in (b"{", b"["):
        try:
            return [msgspec.json.decode(data)]
        except msgspec.DecodeError as exc:
            if json_only:
                raise FileError(f"{name}: {_json_line(data, exc)}not valid JSON: {exc}") from None
    try:
        return list(yaml.load_all(data, Loader=_LOADER))  # a safe loader: CSafeLoader or SafeLoader
    except yaml.YAMLError as exc:
        raise FileError(f"{name}: {_yaml_problem(exc)}") from None


class _Top(msgspec.Struct):
    kind: str = ""
    items: list[msgspec.Raw] | None = None


class _Kind(msgspec.Struct):
    kind: str = ""


def json_objects(data: bytes, name: str, *, json_only: bool = False) -> list[tuple[str, msgspec.Raw]] | None:
    """(kind, the object's JSON bytes) of every object of a JSON file, a `List`'s items or the one
    object, without building Python objects for the whole file (a 10k-Service List would take ~10x
    its size as dicts); None when `data` is not JSON and may be YAML (see `parse`). Items that are
    not objects are left out."""
    if not json_only and data.lstrip()[:1] != b"{":
        return None
    try:
        try:
            top = msgspec.json.decode(data, type=_Top)
        except msgspec.ValidationError:  # not an object with a kind and a list of items
            if not json_only:
                return None
            msgspec.json.decode(data)  # valid JSON (nothing of ours), or the syntax error below
            return []
    except msgspec.DecodeError as exc:
        if json_only:
            raise FileError(f"{name}: {_json_line(data, exc)}not valid JSON: {exc}") from None
        return None
    if top.kind != "List":
        return [(top.kind, msgspec.Raw(data))]
    out = []
    for raw in top.items or []:
        try:
            out.append((msgspec.json.decode(raw, type=_Kind).kind, raw))
        except msgspec.ValidationError:
            continue
    return out


def read(path: Path, name: str) -> bytes:
    """The bytes of the file at `path`; FileError naming it as `name` when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FileError(f"{name}: cannot read: {exc.strerror or exc}") from None


def documents(path: Path, what: str = "") -> list[object]:
    """Every document in the file at `path`; `what` (e.g. "--config") prefixes the file's name."""
    name = f"{what} {path}" if what else str(path)
    return parse(read(path, name), name, json_only=path.suffix == ".json")
