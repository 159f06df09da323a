"""Which iptables variant (nft or legacy) this node uses, and reading what is programmed.

Like kube-proxy's images, pick the variant that already holds rules, so a node's rules are never
split across the two; nft wins a tie (Debian's default).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from agent.kernel import nftrules
from agent.kernel.commands import CommandError, have, run

VARIANTS = ("nft", "legacy")


@dataclass(frozen=True, slots=True)
class Tools:
    variant: str  # "nft", "legacy" or "" (plain binaries)

    def binary(self, family: int, what: str) -> str:
        base = "iptables" if family == 4 else "ip6tables"
        suffix = f"-{self.variant}" if self.variant else ""
        return f"{base}{suffix}-{what}" if what else f"{base}{suffix}"


def count_rules(save_output: str) -> int:
    return sum(1 for line in save_output.splitlines() if line.startswith("-A "))


def detect_variant() -> tuple[Tools, str]:
    """Return the tools to use and a sentence saying why."""
    counts: dict[str, int] = {}
    broken: list[str] = []
    for v in VARIANTS:
        tools = Tools(v)
        if not have(tools.binary(4, "restore")):
            continue
        try:  # a variant the kernel cannot serve (nf_tables missing, as in some kernels) is no choice
            total = count_rules(run([tools.binary(4, "save")], timeout=30))
        except (CommandError, OSError):
            broken.append(v)
            continue
        with contextlib.suppress(CommandError, OSError):
            total += count_rules(run([tools.binary(6, "save")], timeout=30))
        counts[v] = total
    if not counts:
        return Tools(""), "no working iptables-nft/iptables-legacy binaries; using plain iptables"
    if broken:
        only = next(iter(counts))
        why = f"iptables-{'/'.join(broken)} cannot read the kernel's tables; {only} holds {counts[only]} rules"
        return Tools(only), why
    if counts.get("legacy", 0) > counts.get("nft", 0):
        return Tools("legacy"), f"iptables-legacy holds {counts['legacy']} rules, nft {counts.get('nft', 0)}"
    pick = "nft" if "nft" in counts else "legacy"
    if pick == "nft" and counts["nft"] == 0 and "legacy" in counts and not _writable(Tools("nft")):
        # Listing works on a kernel whose nf_tables refuses every change (seen in a UML 6.1 guest)
        return Tools("legacy"), "iptables-nft cannot write to this kernel (nf_tables refused a scratch chain)"
    return Tools(pick), f"rules found: {counts}; nft preferred on a tie"


def _writable(tools: Tools) -> bool:
    """Whether a scratch chain can be made and removed in one atomic restore (no net change)."""
    probe = "*filter\n:KPA-VARIANT-PROBE - [0:0]\n-X KPA-VARIANT-PROBE\nCOMMIT\n"
    try:
        run([tools.binary(4, "restore"), "-w", "5", "--noflush"], stdin=probe, timeout=30)
    except (CommandError, OSError):
        return False
    return True


@dataclass(slots=True)
class SavedTables:
    """Our chains and the jump rules into them, from one iptables-save or read over netlink (read_nft)."""

    chains: dict[str, set[str]] = field(default_factory=dict)
    hooks: dict[str, list[str]] = field(default_factory=dict)  # table -> "-A CHAIN ... -j KPA-..." lines
    rules: dict[tuple[str, str], int] = field(default_factory=dict)  # (table, our chain) -> rule count
    # (table, our chain) -> a digest of its rules as the kernel prints them (order-sensitive; only
    # comparable within one process: it finds a rule edited in place, count unchanged)
    digests: dict[tuple[str, str], int] = field(default_factory=dict)


_TABLE = re.compile(r"^\*(\w+)")


def _lines(text: str) -> Iterator[str]:
    """The lines of `text` one at a time: no list of all of them (tens of MB at 10k Services)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        if end < 0:
            end = len(text)
        yield text[start:end]
        start = end + 1


def parse_save(text: str, prefix: str) -> SavedTables:
    out = SavedTables()
    table = ""
    for line in _lines(text):
        m = _TABLE.match(line)
        if m:
            table = m.group(1)
            out.chains.setdefault(table, set())
            out.hooks.setdefault(table, [])
        elif line.startswith(":" + prefix):
            name = line[1:].split(" ", 1)[0]
            out.chains[table].add(name)
            out.rules.setdefault((table, name), 0)
        elif line.startswith("-A " + prefix):
            key = (table, line[3:].split(" ", 1)[0])
            out.rules[key] = out.rules.get(key, 0) + 1
            out.digests[key] = hash((out.digests.get(key, 0), line))
        elif line.startswith("-A ") and f"-j {prefix}" in line:
            out.hooks[table].append(line)
    return out


def read_nft(tools: Tools, family: int, prefix: str, tables: Iterable[str],
             builtins: Iterable[tuple[str, str]]) -> SavedTables | None:
    """What parse_save() finds in iptables-nft-save's output, without that child (about 250 MB at
    10k Services): our chains, rule counts and digests over netlink (nftrules; its digests compare
    only with its own), and the jumps into them from `builtins` ((table, built-in chain)) from
    `iptables-nft -S` of those chains alone. None when nf_tables or a built-in chain cannot be read
    that way."""
    out = SavedTables()
    held = nftrules.chain_digests(family, tables, prefix)
    if held is None:
        return None
    for table, chains in held.items():
        out.chains[table] = set(chains)
        out.hooks[table] = []
        for name, (count, digest) in chains.items():
            out.rules[(table, name)] = count
            out.digests[(table, name)] = digest
    for table, builtin in sorted(set(builtins)):
        try:  # a table or built-in chain not there yet lists as its policy alone (exit 0)
            text = run([tools.binary(family, ""), "-t", table, "-S", builtin], timeout=30)
        except (CommandError, OSError):  # unreadable is not "no jumps": that would add them again
            return None
        out.hooks.setdefault(table, []).extend(
            ln for ln in text.splitlines() if ln.startswith("-A ") and f"-j {prefix}" in ln)
    return out


# -- writing: shared by every mode that programs xtables rules -----------------------------------

HOOK_COMMENT = "kube-proxy-agent"
_LINE = re.compile(r"line (\d+)")


# A jump from a built-in chain into one of a mode's chains, the only kind of rule a mode adds
# outside its own chains: (table, built-in chain, the mode's chain, extra match such as
# "-m conntrack --ctstate NEW"). Plain tuples, so a mode's pure render code can declare them.
Hook = tuple[str, str, str, str]


def hook_rule(hook: Hook, comment: str = HOOK_COMMENT) -> str:
    _, builtin, chain, match = hook
    extra = f"{match} " if match else ""
    return f"-A {builtin} {extra}-m comment --comment {comment} -j {chain}"


class RestoreFailed(RuntimeError):
    """iptables-restore refused an input; the message has its error and the offending line."""

    def __init__(self, message: str, offending: str) -> None:
        super().__init__(message)
        self.offending = offending


def offending_line(text: str, stderr: str) -> str:
    """The input line an iptables-restore error names ("line N failed"), or ""."""
    m = _LINE.search(stderr)
    if not m:
        return ""
    n = int(m.group(1))
    start = 0
    for _ in range(n - 1):  # without a list of every line: restore inputs reach tens of MB
        start = text.find("\n", start) + 1
        if start == 0:
            return ""
    end = text.find("\n", start)
    return text[start:end if end >= 0 else len(text)]


def restore(tools: Tools, family: int, text: str, timeout: float = 300) -> None:
    """`iptables-restore --noflush` of `text` (atomic per table); RestoreFailed when refused."""
    argv = [tools.binary(family, "restore"), "-w", "5", "--noflush"]
    try:
        run(argv, stdin=text, timeout=timeout)
    except CommandError as exc:
        bad = offending_line(text, exc.stderr)
        raise RestoreFailed(
            f"{argv[0]} failed: {exc.stderr or 'exit ' + str(exc.code)}" + (f"; offending line: {bad}" if bad else ""),
            bad,
        ) from exc


def missing_hooks(saved: SavedTables, hooks: Iterable[Hook], comment: str = HOOK_COMMENT) -> dict[str, list[str]]:
    """table -> `-I` lines for the hooks the kernel does not hold (inserted first, as kube-proxy)."""
    out: dict[str, list[str]] = {}
    for hook in hooks:
        table, builtin, chain, match = hook
        present = any(
            h.startswith(f"-A {builtin} ") and h.endswith(f"-j {chain}") and match in h
            for h in saved.hooks.get(table, [])
        )
        if not present:
            out.setdefault(table, []).append("-I" + hook_rule(hook, comment)[2:])
    return out


def with_hooks(text: str, hooks: dict[str, list[str]]) -> str:
    """Insert `hooks` (table -> lines) into each table's block of a restore input, after the
    chains are declared; tables the input lacks get a block of their own."""
    if not hooks:
        return text
    out: list[str] = []
    table = ""
    seen: set[str] = set()
    for line in _lines(text):
        if line.startswith("*"):
            table = line[1:]
            seen.add(table)
        if line == "COMMIT":
            out.extend(hooks.get(table, []))
        out.append(line)
    for table, rules in hooks.items():
        if table not in seen:
            out += [f"*{table}", *rules, "COMMIT"]
    return "\n".join(out) + "\n"


def cleanup_text(saved: SavedTables) -> str:
    """A restore input removing every chain in `saved` and the jumps into them, nothing else."""
    out: list[str] = []
    for table in sorted(set(saved.chains) | set(saved.hooks)):
        hooks = saved.hooks.get(table, [])
        ours = sorted(saved.chains.get(table, set()))
        if not hooks and not ours:
            continue
        out.append(f"*{table}")
        out.extend(f":{c} - [0:0]" for c in ours)
        out.extend("-D" + h[2:] for h in hooks)
        out.extend(f"-X {c}" for c in ours)
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def cleanup_batches(saved: SavedTables, batch: int = 2000) -> list[str]:
    """`cleanup_text` split so no input declares more than `batch` chains (iptables-nft-restore
    slows down quadratically with the chains in one input: 100k chains in one took over 5 minutes):
    first the jumps from built-in chains, then every chain flushed, then every chain deleted (once
    all are flushed nothing refers to any of them)."""
    out: list[str] = []
    hooks = [(t, h) for t in sorted(saved.hooks) for h in saved.hooks[t]]
    if hooks:
        out.append(_blocks({t: [f"-D{h[2:]}" for tt, h in hooks if tt == t] for t, _ in hooks}))
    chains = [(t, c) for t in sorted(saved.chains) for c in sorted(saved.chains[t])]
    for verb in ("flush", "delete"):
        for i in range(0, len(chains), batch):
            part = chains[i:i + batch]
            lines: dict[str, list[str]] = {}
            for t, c in part:
                lines.setdefault(t, []).append(f":{c} - [0:0]" if verb == "flush" else f"-X {c}")
            out.append(_blocks(lines))
    return [b for b in out if b]


def _blocks(lines: dict[str, list[str]]) -> str:
    out: list[str] = []
    for table, body in lines.items():
        if body:
            out += [f"*{table}", *body, "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


def _surely_absent(tools: Tools, family: int, prefix: str) -> bool:
    """True when chain names alone show no chain named `prefix`* in the nft variant (a jump needs
    its chain, so nothing to remove): names over netlink, where iptables-nft-save renders every
    rule (30 s and a GB at 10k Services in another mode's tables)."""
    return tools.variant == "nft" and nftrules.any_chain(family, prefix) is False


def cleanup_chains(what: str, select: Callable[[str], SavedTables], families: tuple[int, ...] = (4, 6),
                   tools: Tools | None = None, absent: Callable[[Tools, int], bool] | None = None) -> list[str]:
    """Remove the chains `select` picks from an iptables-save (and the jumps into them), in both
    iptables variants (or just `tools`), skipping a (tool, family) `absent` rules out; returns what
    it did, one line per (tool, family), `what` naming the chains."""
    done: list[str] = []
    for t in [tools] if tools is not None else [Tools(v) for v in VARIANTS]:
        for fam in families:
            save = t.binary(fam, "save")
            if not have(save) or (absent is not None and absent(t, fam)):
                continue
            try:
                saved = select(run([save], timeout=120))
            except CommandError as exc:
                done.append(f"could not read rules tool={save} error={exc.stderr.strip()!r}")
                continue
            inputs = cleanup_batches(saved)
            for text in inputs:
                run([t.binary(fam, "restore"), "-w", "5", "--noflush"], stdin=text, timeout=300)
            if inputs:
                n = sum(len(c) for c in saved.chains.values())
                jumps = sum(len(h) for h in saved.hooks.values())
                done.append(f"removed {what} chains={n} jumps={jumps} tool={save} family=IPv{fam} "
                            f"restores={len(inputs)}")
    return done


def cleanup_prefix(prefix: str, families: tuple[int, ...] = (4, 6), tools: Tools | None = None) -> list[str]:
    """Remove every chain whose name starts with `prefix` and every jump into one."""
    return cleanup_chains(f"{prefix}*", lambda save: parse_save(save, prefix), families, tools,
                          lambda t, fam: _surely_absent(t, fam, prefix))
