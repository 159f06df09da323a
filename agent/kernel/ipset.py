"""ipsets through the `ipset` tool: batches with `ipset restore`, members read with `ipset save`.

The tool, not a netlink library, because a full sync at 10k Services writes tens of thousands of
entries: `ipset restore` takes them in one process in milliseconds."""

from __future__ import annotations

from collections.abc import Iterable

from agent.kernel.commands import CommandError, have, run


class IpsetError(RuntimeError):
    pass


def available() -> bool:
    return have("ipset")


def restore(lines: Iterable[str]) -> None:
    """Apply `ipset restore -exist` lines (create, add, del, flush, destroy, swap) in one process.
    -exist: adding what is there or deleting what is not is no error."""
    text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    if not text:
        return
    try:
        run(["ipset", "restore", "-exist"], stdin=text, timeout=120)
    except CommandError as exc:
        raise IpsetError(f"ipset restore failed: {exc.stderr or exc}") from exc


def members(prefix: str) -> dict[str, set[str]]:
    """Every set whose name starts with `prefix`, with its entries (as `ipset save` prints them)."""
    try:
        out = run(["ipset", "save"], timeout=120)
    except CommandError as exc:
        raise IpsetError(f"ipset save failed: {exc.stderr or exc}") from exc
    sets: dict[str, set[str]] = {}
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) < 3 or not parts[1].startswith(prefix):
            continue
        if parts[0] == "create":
            sets.setdefault(parts[1], set())
        elif parts[0] == "add":
            sets.setdefault(parts[1], set()).add(parts[2].split(" ", 1)[0])
    return sets


def destroy(names: Iterable[str]) -> None:
    restore(f"destroy {n}" for n in names)
