"""Run a command inside a user-mode-linux guest: a real Linux 6.1 kernel with IPVS, ipsets and
iptables-legacy, booted in about 2 s with this machine's filesystem as its root (hostfs).

    rc, output = run_in_uml(["/work/main/.venv/bin/pytest", "-q", "tests/kernel", "--proxy-mode", "ipvs"])

Inside: /proc, /sys and a tmpfs on /run (so `ip netns` state stays in the guest) are mounted, the
IPVS, ipset and netfilter modules loaded, loopback up. The command runs from the repository with
KPA_IN_UML=1 set; its output and exit code come back through a run directory under /var/tmp
(shared with the host through hostfs). nf_tables does not work in this kernel: use iptables-legacy.
A guest that does not finish in `timeout` seconds is killed.

Needs Debian's user-mode-linux package and /lib/modules/<uml version> linking to
/usr/lib/uml/modules/<uml version> (`ensure_modules_link`, run by `make install`). On a host whose
XSAVE area outgrows the guest kernel's buffer (a CPU with AMX) the guest runs with a ptrace shim
(tests/uml_xstate.c, built with gcc into ~/.cache/kube-proxy-agent), without which its init dies.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UML = "/usr/bin/linux.uml"
UML_MODULES = Path("/usr/lib/uml/modules")
MODULES = ("ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_lc", "ip_vs_wlc", "ip_vs_sh", "ip_vs_mh", "ip_vs_sed",
           "ip_vs_nq", "ip_vs_dh", "ip_vs_lblc", "ip_vs_lblcr", "nf_conntrack", "nf_nat", "ip_set",
           "ip_set_hash_ip", "ip_set_hash_ipport", "ip_set_hash_ipportip", "ip_set_hash_ipportnet",
           "ip_set_hash_net", "ip_set_bitmap_port", "xt_set", "xt_ipvs", "xt_mark", "xt_comment",
           "xt_conntrack", "xt_addrtype", "xt_MASQUERADE", "xt_nat", "xt_statistic", "xt_recent", "xt_multiport",
           "iptable_nat", "iptable_filter", "iptable_mangle", "ip6table_nat", "ip6table_filter", "ip6table_mangle",
           "ipt_REJECT", "ip6t_REJECT", "nf_reject_ipv4", "dummy", "veth", "bridge", "br_netfilter", "tun", "sctp")


XSTATE_SHIM_SOURCE = Path(__file__).with_name("uml_xstate.c")


def xstate_shim() -> str:
    """The LD_PRELOAD shim that lets the guest kernel save and restore its processes' FPU state on
    a host with a larger XSAVE area than it knows (see uml_xstate.c); built once per source into
    ~/.cache. "" when it cannot be built (no gcc): on such hosts the guest's init then dies."""
    source = XSTATE_SHIM_SOURCE.read_bytes()
    out = Path.home() / ".cache" / "kube-proxy-agent" / f"uml-xstate-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if not out.exists():
        gcc = shutil.which("gcc")
        if gcc is None:
            return ""
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        built = subprocess.run([gcc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(XSTATE_SHIM_SOURCE), "-ldl"],
                               capture_output=True, text=True, check=False)
        if built.returncode != 0:
            return ""
        tmp.replace(out)
    return str(out)


def _uml_env() -> dict[str, str]:
    shim = xstate_shim()
    return {**os.environ, "LD_PRELOAD": shim} if shim else dict(os.environ)


def uml_version() -> str:
    versions = sorted(p.name for p in UML_MODULES.iterdir()) if UML_MODULES.is_dir() else []
    return versions[-1] if versions else ""


def why_no_uml() -> str:
    """"" when a guest can boot here, else what is missing."""
    if not os.path.exists(UML):
        return "user-mode-linux is not installed (apt-get install user-mode-linux)"
    version = uml_version()
    if not version:
        return f"no UML kernel modules under {UML_MODULES}"
    link = Path("/lib/modules") / version
    if not (link / "modules.dep").exists():
        return f"{link} does not lead to {UML_MODULES / version} (make install links it)"
    return ""


def ensure_modules_link() -> None:
    version = uml_version()
    if version:
        link = Path("/lib/modules") / version
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(UML_MODULES / version)


def _init_script(rundir: Path, command: Sequence[str], env: dict[str, str]) -> str:
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    return f"""#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root KPA_IN_UML=1 PYTHONDONTWRITEBYTECODE=1
{exports}mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
mkdir -p /run/netns /run/lock
for m in {' '.join(MODULES)}; do modprobe -q $m 2>/dev/null; done
ip link set lo up
# like a node whose CNI bridges pods (and like this machine): bridged traffic passes netfilter,
# so a reply from a pod to a pod on the same bridge is un-NATed
sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1
cd {shlex.quote(str(REPO))}
{shlex.join(command)} > {rundir}/output 2>&1
echo $? > {rundir}/rc
sync
exec /usr/bin/python3 -c 'import ctypes; ctypes.CDLL(None).reboot(0x4321fedc)'
"""


def run_in_uml(command: Sequence[str], *, mem: str = "1536M", timeout: float = 1800,
               env: dict[str, str] | None = None, extra_args: Sequence[str] = ()) -> tuple[int, str]:
    """Boot a guest, run `command` in it, return (exit code, its output). Exit code 124 means the
    guest did not finish in time (it was killed); 125 that it ended without running the command."""
    rundir = Path(tempfile.mkdtemp(prefix="kpa-uml-", dir="/var/tmp"))
    try:
        init = rundir / "init"
        init.write_text(_init_script(rundir, command, env or {}))
        init.chmod(0o755)
        argv = [UML, f"mem={mem}", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "rw",
                f"init={init}", "con0=null,fd:1", "con=null", *extra_args]
        with open(rundir / "console", "w") as console:
            try:
                subprocess.run(argv, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               timeout=timeout, check=False, start_new_session=True, env=_uml_env())
            except subprocess.TimeoutExpired:
                out = (rundir / "output").read_text(errors="replace") if (rundir / "output").exists() else ""
                return 124, out + f"\n[UML guest killed after {timeout:.0f}s]"
        rc_file = rundir / "rc"
        out = (rundir / "output").read_text(errors="replace") if (rundir / "output").exists() else ""
        if not rc_file.exists():
            console_tail = "\n".join((rundir / "console").read_text(errors="replace").splitlines()[-30:])
            return 125, out + "\n[UML guest ended without running the command]\n" + console_tail
        return int(rc_file.read_text().strip() or 125), out
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def in_uml() -> bool:
    return os.environ.get("KPA_IN_UML") == "1"


class Guest:
    """A guest running in the background (a node of the e2e cluster, say); stop() ends it."""

    def __init__(self, command: Sequence[str], *, mem: str = "768M", extra_args: Sequence[str] = (),
                 env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.rundir = Path(tempfile.mkdtemp(prefix="kpa-uml-", dir="/var/tmp"))
        init = self.rundir / "init"
        init.write_text(_init_script(self.rundir, command, env or {}))
        init.chmod(0o755)
        argv = [UML, f"mem={mem}", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "rw",
                f"init={init}", "con0=null,fd:1", "con=null", *extra_args]
        self.console = log or (self.rundir / "console")
        with open(self.console, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=_uml_env())

    def output(self) -> str:
        path = self.rundir / "output"
        return path.read_text(errors="replace") if path.exists() else ""

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        shutil.rmtree(self.rundir, ignore_errors=True)
