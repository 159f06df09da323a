"""A real Kubernetes control plane as plain processes: etcd, kube-apiserver, kube-controller-manager.

- Certificates are made with openssl at start (a throw-away CA, a serving cert whose SANs include
  the address the apiserver listens on, client certs for the admin and the controller-manager) plus
  the service-account signing key pair.
- etcd listens on 127.0.0.1 (ports chosen free at run time). kube-apiserver listens only on
  `api_ip` (an address the harness put on a root-namespace bridge, reachable from the node
  namespaces over veths and from the harness itself) with `--authorization-mode=Node,RBAC`,
  service CIDR 10.96.0.0/16 and `--endpoint-reconciler-type=none`.
- kube-controller-manager runs only `endpointslice-controller` and
  `endpointslice-mirroring-controller`. It authenticates as user `system:kube-controller-manager`
  (client cert) with `--use-service-account-credentials`: each controller then runs as its own
  ServiceAccount in kube-system (`endpointslice-controller`, `endpointslice-mirroring-controller`)
  with the built-in `system:controller:*` roles, tokens minted through the TokenRequest API, exactly
  as on a kubeadm cluster. No token controller is needed.
- Identities for node agents are ServiceAccounts with tokens from the TokenRequest API:
  `kube-proxy-agent/kube-proxy-agent` bound by the ClusterRole shipped in manifests/ (so a missing
  verb there fails the tests), and `kube-system/kube-proxy` bound to the built-in
  `system:node-proxier` ClusterRole for the upstream reference.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster.kubeapi import Api, ApiError, apply_manifest_file, write_kubeconfig
from tests.cluster.procs import Proc

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
SERVICE_CIDR = "10.96.0.0/16"
AGENT_NAMESPACE = "kube-proxy-agent"
AGENT_SA = "kube-proxy-agent"
# Applied to give the agent its identity (the rest of manifests/ is the DaemonSet deployment).
AGENT_RBAC_FILES = ("namespace.yaml", "serviceaccount.yaml", "clusterrole.yaml", "clusterrolebinding.yaml")


class ControlPlaneUnavailable(RuntimeError):
    """The binaries cannot be built or found; the message says why and what to do."""


def find_bins() -> Path:
    """Build (first time) or reuse the cached control plane; the bin dir, or ControlPlaneUnavailable."""
    build = REPO / "tests" / "cluster" / "build.sh"
    proc = subprocess.run([str(build)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ControlPlaneUnavailable(
            f"tests/cluster/build.sh (make cluster-bins) failed: {proc.stderr.strip()[-1500:]}")
    out = proc.stdout.strip().splitlines()
    if not out:
        raise ControlPlaneUnavailable("tests/cluster/build.sh printed no bin dir")
    return Path(out[-1])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr.strip()}")


def make_certs(d: Path, api_ip: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3", "-subj", "/CN=kpa-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=d)

    def leaf(name: str, subject: str, ext: str) -> None:
        (d / f"{name}.ext").write_text(ext)
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "3", "-extfile", f"{name}.ext", cwd=d)

    sans = ",".join([f"IP:{api_ip}", "IP:127.0.0.1", "IP:10.96.0.1", "DNS:localhost", "DNS:kubernetes",
                     "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
                     "DNS:kubernetes.default.svc.cluster.local"])
    leaf("apiserver", "/CN=kube-apiserver",
         "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
         f"extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n")
    client = ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
              "extendedKeyUsage=clientAuth\n")
    leaf("admin", "/O=system:masters/CN=kubernetes-admin", client)
    leaf("kcm", "/CN=system:kube-controller-manager", client)
    openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


@dataclass
class ControlPlane:
    bins: Path
    run_dir: Path
    run_tag: str
    api_ip: str = "127.0.0.1"
    log: object = print
    etcd: Proc | None = None
    apiserver: Proc | None = None
    kcm: Proc | None = None
    api_port: int = 0
    admin: Api = field(init=False)
    kubeconfigs: dict[str, Path] = field(default_factory=dict)

    @property
    def pki(self) -> Path:
        return self.run_dir / "pki"

    @property
    def server(self) -> str:
        return f"https://{self.api_ip}:{self.api_port}"

    @property
    def ca(self) -> str:
        return str(self.pki / "ca.crt")

    def _say(self, msg: str) -> None:
        assert callable(self.log)
        self.log(msg)

    def start(self) -> ControlPlane:
        t0 = time.monotonic()
        make_certs(self.pki, self.api_ip)
        ec, ep = free_port(), free_port()
        self.api_port = free_port(self.api_ip)
        logs = self.run_dir / "logs"
        self.etcd = Proc("etcd", [
            str(self.bins / "etcd"), "--name", "kpa", "--data-dir", str(self.run_dir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{ec}", "--advertise-client-urls", f"http://127.0.0.1:{ec}",
            "--listen-peer-urls", f"http://127.0.0.1:{ep}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{ep}",
            "--initial-cluster", f"kpa=http://127.0.0.1:{ep}", "--initial-cluster-state", "new",
            "--unsafe-no-fsync", "--log-level", "warn",
        ], logs / "etcd.log", self.run_tag).start()
        p = self.pki
        self.apiserver = Proc("kube-apiserver", [
            str(self.bins / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{ec}",
            f"--bind-address={self.api_ip}", f"--secure-port={self.api_port}",
            f"--advertise-address={self.api_ip}", "--endpoint-reconciler-type=none",
            f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}",
            "--authorization-mode=Node,RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p / 'sa.pub'}",
            f"--service-account-signing-key-file={p / 'sa.key'}",
            "--profiling=false",
            # on SIGTERM, end open watches after 2 s (the default 0 leaves them open and the
            # process waits for them: a restart would take as long as the longest watch)
            "--shutdown-watch-termination-grace-period=2s",
        ], logs / "kube-apiserver.log", self.run_tag)
        self.admin = Api(self.server, self.ca, cert=str(p / "admin.crt"), key=str(p / "admin.key"))
        self._wait_etcd(ec)
        self.start_apiserver()
        self.kubeconfigs["admin"] = write_kubeconfig(self.run_dir / "admin.kubeconfig", self.server, self.ca,
                                                     user="kubernetes-admin", cert=str(p / "admin.crt"),
                                                     key=str(p / "admin.key"))
        kcm_kc = write_kubeconfig(self.run_dir / "kcm.kubeconfig", self.server, self.ca,
                                  user="system:kube-controller-manager", cert=str(p / "kcm.crt"),
                                  key=str(p / "kcm.key"))
        self.kcm = Proc("kube-controller-manager", [
            str(self.bins / "kube-controller-manager"),
            f"--kubeconfig={kcm_kc}",
            "--controllers=endpointslice-controller,endpointslice-mirroring-controller",
            "--use-service-account-credentials=true",
            "--leader-elect=false", "--secure-port=0",
            "--concurrent-service-endpoint-syncs=5",
        ], logs / "kube-controller-manager.log", self.run_tag).start()
        self.kubeconfigs["agent"] = self._agent_identity()
        self.kubeconfigs["kube-proxy"] = self._kube_proxy_identity()
        self._say(f"control plane up in {time.monotonic() - t0:.1f}s: apiserver {self.server}, etcd 127.0.0.1:{ec}")
        return self

    def _wait_etcd(self, port: int, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.etcd is not None
            if not self.etcd.running():
                raise RuntimeError(f"etcd exited:\n{self.etcd.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("etcd did not listen in time")

    def start_apiserver(self, timeout: float = 60) -> float:
        """Start (or restart) kube-apiserver; returns seconds until /readyz said ok."""
        assert self.apiserver is not None
        t0 = time.monotonic()
        self.apiserver.start()
        end = t0 + timeout
        while not self.admin.ready():
            if not self.apiserver.running():
                raise RuntimeError(f"kube-apiserver exited:\n{self.apiserver.tail()}")
            if time.monotonic() > end:
                raise TimeoutError(f"kube-apiserver not ready after {timeout:.0f}s:\n{self.apiserver.tail()}")
            time.sleep(0.1)
        return time.monotonic() - t0

    def stop_apiserver(self) -> float:
        """SIGTERM (graceful; open watches are ended after 2 s), SIGKILL after 30 s. Seconds taken."""
        assert self.apiserver is not None
        t0 = time.monotonic()
        self.apiserver.stop(timeout=30)
        return time.monotonic() - t0

    def restart_etcd(self, down: float, between: Callable[[], None] | None = None) -> float:
        """Stop etcd (SIGTERM), keep it down `down` seconds (calling between() while it is down),
        start it again on the same data; returns seconds until kube-apiserver's /readyz said ok."""
        assert self.etcd is not None
        self.etcd.stop(timeout=30)
        t_down = time.monotonic()
        if between is not None:
            between()
        time.sleep(max(0.0, down - (time.monotonic() - t_down)))
        t0 = time.monotonic()
        self.etcd.start()
        end = t0 + 60
        while not self.admin.ready():
            if time.monotonic() > end:
                raise TimeoutError(f"kube-apiserver not ready 60 s after etcd restarted:\n{self.etcd.tail()}")
            time.sleep(0.1)
        return time.monotonic() - t0

    def restart_controller_manager(self) -> None:
        """After an apiserver restart: the controller-manager's client-go informers hit the new
        apiserver before its RBAC caches are warm (403 on list/watch), back off exponentially (up
        to 30 s, reset only after 2 quiet minutes), and the EndpointSlice controller stays blind
        for up to a minute. That is the controller's business, not the proxy's, so the harness
        restarts it once the apiserver is ready."""
        assert self.kcm is not None
        self.kcm.stop(timeout=10)
        self.kcm.start()

    # -- identities --------------------------------------------------------------------------------

    def token(self, namespace: str, sa: str, seconds: int = 86400) -> str:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": seconds}}
        end = time.monotonic() + 30
        while True:
            try:
                out = self.admin.post(f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token", body)
                return str(out["status"]["token"])
            except ApiError as exc:  # the SA may need a moment after creation
                if exc.status != 404 or time.monotonic() > end:
                    raise
                time.sleep(0.2)

    def _agent_identity(self) -> Path:
        for f in AGENT_RBAC_FILES:
            apply_manifest_file(self.admin, MANIFESTS / f)
        tok = self.token(AGENT_NAMESPACE, AGENT_SA)
        return write_kubeconfig(self.run_dir / "agent.kubeconfig", self.server, self.ca,
                                user=f"system:serviceaccount:{AGENT_NAMESPACE}:{AGENT_SA}", token=tok)

    def _kube_proxy_identity(self) -> Path:
        self.admin.create({"apiVersion": "v1", "kind": "ServiceAccount",
                           "metadata": {"name": "kube-proxy", "namespace": "kube-system"}}, exist_ok=True)
        self.admin.create({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "kpa-harness:kube-proxy"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node-proxier"},
            "subjects": [{"kind": "ServiceAccount", "name": "kube-proxy", "namespace": "kube-system"}],
        }, exist_ok=True)
        tok = self.token("kube-system", "kube-proxy")
        return write_kubeconfig(self.run_dir / "kube-proxy.kubeconfig", self.server, self.ca,
                                user="system:serviceaccount:kube-system:kube-proxy", token=tok)

    def can_i(self, user: str, verb: str, resource: str, group: str = "") -> bool:
        """SubjectAccessReview as the admin: may `user` do this? (for clear RBAC failure messages)"""
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                  "spec": {"user": user, "groups": ["system:serviceaccounts", "system:authenticated"],
                           "resourceAttributes": {"verb": verb, "resource": resource, "group": group}}}
        return bool(self.admin.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
                    .get("status", {}).get("allowed"))

    def stop(self) -> None:
        for p in (self.kcm, self.apiserver, self.etcd):
            if p is not None:
                p.stop(timeout=20)
