"""Multi-host deployments: the launcher's host roles (``superlink-host``, ``node-host``), their
certificates and TLS checks, and the SuperLink host's evaluation data.

Fast tests (no Flower process but one SuperLink and nginx in the last of them):

* ``scripts/make-certs.sh`` always names localhost and 127.0.0.1 and adds the extra names; it
  refuses to write keys into this repository unless .gitignore covers the folder.
* existing certificates that lack a name the nodes dial are refused before anything starts,
  with the missing and the present names; a TLS server whose certificate does not name the
  address dialed is reported in one line naming both (what Flower reports as endless retries).
* central evaluation reads only the test split: a folder with only ``test.npz`` passes the
  launcher's check and loads; one with only ``train.npz`` is refused before the run.
* the node-host command refuses bad node configs and a missing key in one line.
* a Fleet proxy that cannot verify the SuperLink (a certificate without ``localhost``) is
  reported by the SuperLink host at start, in one line naming both names.

Slow test: three hosts as network namespaces created here (a bridge inside host A, private
10.39.0.0/24 addresses that exist only inside the namespaces): ``superlink-host`` in A
(SuperLink on A's loopback, Fleet proxy on A's network), ``node-host`` in B and C, an outsider
D holding the CA certificate and a key of its own, and a node dialing an address the certificate
does not name. Skipped, with the reason, where namespaces cannot be created (not root, no
``ip``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedlora import launch
from fedlora.launch import PROJECT, Processes, SuperLinkHost, TLSCheckError, flower_env
from fedlora.results import read_rounds
from fedlora.validate import ConfigError, check, check_eval_data

SAMPLE = PROJECT / "tests" / "data" / "fashion-mnist-sample"
MAKE_CERTS = PROJECT / "scripts" / "make-certs.sh"


def _need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


def _make_certs(out: Path, *names: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(MAKE_CERTS), str(out), *names], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "RSA_BITS": "2048"})


@pytest.fixture(scope="module")
def default_certs(tmp_path_factory) -> Path:
    _need("openssl")
    out = tmp_path_factory.mktemp("certs") / "c"
    assert _make_certs(out).returncode == 0
    return out


# ------------------------------------------------------------------------------ certificates


def test_make_certs_keeps_default_names_and_adds_extra_ones(tmp_path, default_certs):
    """Extra names are added to localhost/127.0.0.1, never instead of them (the Fleet proxy
    checks the SuperLink as localhost, the operator's CLI dials 127.0.0.1)."""
    assert launch.cert_names(default_certs / "server.pem") == ["localhost", "127.0.0.1"]
    res = _make_certs(tmp_path / "x", "10.0.0.1", "superlink.example.org", "localhost")
    assert res.returncode == 0, res.stderr
    names = launch.cert_names(tmp_path / "x" / "server.pem")
    assert names == ["localhost", "superlink.example.org", "127.0.0.1", "10.0.0.1"], names
    assert oct((tmp_path / "x" / "ca.key").stat().st_mode & 0o777) == "0o600"


def test_make_certs_refuses_a_tracked_folder_in_the_repository(tmp_path):
    """Private keys never land where ``git add`` would take them: a folder of this repository
    that .gitignore does not cover is refused (nothing written); an ignored one is fine."""
    _need("openssl", "git")
    if subprocess.run(["git", "-C", str(PROJECT), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    target = PROJECT / "docs" / "certs-test-39"
    res = _make_certs(target, "10.0.0.1")
    assert res.returncode == 2 and "refused" in res.stderr and "gitignore" in res.stderr
    assert not target.exists()
    # the folder the docs use is ignored
    ignored = subprocess.run(["git", "-C", str(PROJECT), "check-ignore", "-q",
                              "certs/ca.key"]).returncode
    assert ignored == 0, ".gitignore must cover certs/ (docs/deployment.md uses it)"


def test_existing_certificate_without_the_nodes_address_is_refused(tmp_path, default_certs):
    """The SuperLink host checks a certificate it reuses before starting anything: one that
    lacks the address the nodes dial is refused naming what is missing and what is there."""
    shutil.copytree(default_certs, tmp_path / "certs")
    with Processes(tmp_path / "logs") as procs:
        h = SuperLinkHost(procs, tmp_path, host="10.0.0.1", names=["fl.example.org"],
                          certs=tmp_path / "certs")
        with pytest.raises(ValueError) as err:
            h.ensure_certs()
    msg = str(err.value)
    assert "names localhost, 127.0.0.1 but not 10.0.0.1, fl.example.org" in msg, msg
    assert "\n" not in msg
    assert procs.procs == []  # nothing was started
    # names covering it (a wildcard for the DNS name) pass
    assert launch.name_matches("fl.example.org", ["*.example.org"])
    assert not launch.name_matches("a.fl.example.org", ["*.example.org"])
    assert launch.name_matches("10.0.0.1", ["localhost", "10.0.0.1"])


@contextlib.contextmanager
def _tls_server(certs: Path, host: str):
    """A TLS server on ``host`` with the SuperLink certificate; yields its port."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    srv = socket.socket()
    srv.bind((host, 0))
    srv.listen()
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with contextlib.suppress(OSError, ssl.SSLError):
                conn.settimeout(5)
                with ctx.wrap_socket(conn, server_side=True):
                    pass  # the handshake is all a client here looks at
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        srv.close()


def test_tls_name_mismatch_is_one_line_naming_both(tmp_path, default_certs):
    """A node dialing an address its SuperLink's certificate does not name gets one line with
    the name dialed and the names presented; the right name passes; a CA that did not sign the
    certificate, and a closed port, are named as such."""
    with _tls_server(default_certs, "127.0.0.2") as port:
        with pytest.raises(TLSCheckError) as err:
            launch.tls_check(f"127.0.0.2:{port}", default_certs / "ca.crt")
        msg = str(err.value)
        assert msg.startswith("TLS name mismatch: this node dials '127.0.0.2'"), msg
        assert "names localhost, 127.0.0.1" in msg and "\n" not in msg, msg
        other = tmp_path / "other"
        assert _make_certs(other).returncode == 0
        with pytest.raises(TLSCheckError, match="is .* the SuperLink host's ca.crt"):
            launch.tls_check(f"127.0.0.2:{port}", other / "ca.crt")
    with _tls_server(default_certs, "127.0.0.1") as port:
        launch.tls_check(f"127.0.0.1:{port}", default_certs / "ca.crt")
        launch.tls_check(f"localhost:{port}", default_certs / "ca.crt")
        # what a node host (e.g. one running docker/compose.node-host.yml) checks by hand
        assert launch.main(["node-host", "--check", "--superlink", f"localhost:{port}",
                            "--ca", str(default_certs / "ca.crt")]) == 0
    with pytest.raises(TLSCheckError, match="connection refused"):
        launch.tls_check(f"127.0.0.1:{port}", default_certs / "ca.crt")


# --------------------------------------------------------------------- evaluation data


def test_central_evaluation_needs_only_the_test_split(tmp_path):
    """The SuperLink host's data-dir needs the test split only: a folder with just test.npz is
    accepted and loads; one with just train.npz is refused before the run, naming the files."""
    from fedlora.tasks.data import load_images

    test_only, train_only = tmp_path / "eval", tmp_path / "train"
    test_only.mkdir()
    train_only.mkdir()
    shutil.copy(SAMPLE / "test.npz", test_only)
    shutil.copy(SAMPLE / "train.npz", train_only)
    rc = check({"dataset": "npz", "data-dir": str(test_only)})
    check_eval_data(rc)
    split = load_images("npz", str(test_only), "test")
    with np.load(SAMPLE / "test.npz") as z:
        assert len(split.y) == len(z["y"])
    with pytest.raises(ConfigError, match="central evaluation.*no dataset I can read for the test split.*test.npz"):
        check_eval_data(check({"dataset": "npz", "data-dir": str(train_only)}))
    # the launcher refuses it (exit 2) before any process starts
    assert launch.main(["sim", "--work-dir", str(tmp_path / "w"), 'dataset="npz"',
                        f'data-dir="{train_only}"'], light=True) == launch.EXIT_REFUSED
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------ node-host refusals


@pytest.mark.parametrize("extra, why", [
    (["--node-config", "partition-id=2 num-partitions=2"], "outside 0..1"),
    (["--node-config", "partition-id=0"], "needs num-partitions"),
    (["--node-config", "partition-id=0 num-partitions=2 colour=1"], "unknown node-config key"),
    (["--node-config", "partition-id=0 num-partitions=2", "--data-dir", "/no/such"],
     "not a folder on this host"),
])
def test_node_host_refuses_bad_node_config(tmp_path, default_certs, capsys, extra, why):
    key = launch.make_node_key(tmp_path / "k") if shutil.which("ssh-keygen") else None
    if key is None:
        pytest.skip("ssh-keygen not installed")
    rc = launch.main(["node-host", "--superlink", "127.0.0.1:1", "--ca",
                      str(default_certs / "ca.crt"), "--key", str(key), "--work-dir",
                      str(tmp_path / "w"), *extra])
    err = capsys.readouterr().err
    assert rc == launch.EXIT_REFUSED and why in err and err.count("\n") == 1, err


def test_node_host_without_key_is_refused(tmp_path, default_certs, capsys):
    rc = launch.main(["node-host", "--superlink", "127.0.0.1:1", "--ca",
                      str(default_certs / "ca.crt"), "--work-dir", str(tmp_path),
                      "--node-config", "partition-id=0 num-partitions=1"])
    err = capsys.readouterr().err
    assert rc == launch.EXIT_REFUSED and "no node key" in err and "--make-key" in err, err


# ------------------------------------------------------------- three hosts in namespaces

NET = "10.39.0"
A_IP, WRONG_IP = f"{NET}.1", f"{NET}.9"   # A's address, and one its certificate does not name
HOST_IPS = {"b": f"{NET}.2", "c": f"{NET}.3", "d": f"{NET}.4"}
FLEET_PORT, SUPERLINK_PORT = 9443, 9093   # each namespace has its own ports
RUN = {"num-server-rounds": 1, "feature-maps": 16, "lora-rank": 8, "local-epochs": 1,
       "max-examples-per-client": 64, "batch-size": 32, "fraction-train": 1.0,
       "dataset": "npz", "partitioner": "iid", "run-name": "netns"}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


@pytest.fixture
def hosts():
    """Namespaces a (bridge br0, 10.39.0.1 and .9), b, c, d (one veth into a's bridge each,
    10.39.0.2-4); every one deleted afterwards. Yields {short name: namespace name}."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    _need("ip")
    tag = f"fl39-{os.getpid()}"
    names = {h: f"{tag}-{h}" for h in "abcd"}
    made: list[str] = []
    try:
        first = _ip("netns", "add", names["a"], check=False)
        if first.returncode != 0:
            pytest.skip(f"ip netns add is not permitted here: {first.stderr.strip()}")
        made.append(names["a"])
        a = names["a"]
        _ip("-n", a, "link", "set", "lo", "up")
        _ip("-n", a, "link", "add", "br0", "type", "bridge")
        _ip("-n", a, "addr", "add", f"{A_IP}/24", "dev", "br0")
        _ip("-n", a, "addr", "add", f"{WRONG_IP}/24", "dev", "br0")
        _ip("-n", a, "link", "set", "br0", "up")
        for h, addr in HOST_IPS.items():
            ns = names[h]
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", a, "link", "add", f"v{h}", "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("-n", a, "link", "set", f"v{h}", "master", "br0")
            _ip("-n", a, "link", "set", f"v{h}", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        yield names
    finally:
        for ns in reversed(made):
            _ip("netns", "del", ns, check=False)


def _in(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def _launch(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedlora.launch", *args]


def _wait_log(procs: Processes, name: str, proc, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = procs.log(name)
        if text in log:
            return log
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{name}: no {text!r} (exit {proc.poll()}):\n{log[-3000:]}")
        time.sleep(0.3)


def _wait_exit(proc, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.args} still running after {timeout:.0f} s") from None


@pytest.mark.slow
def test_three_hosts_in_network_namespaces(hosts, tmp_path):
    """The operator's path across hosts, with the launcher's roles: A runs ``superlink-host``
    (Fleet proxy on A's network, SuperLink and Control on A's loopback only) with a folder of
    the nodes' public keys and an evaluation folder holding only ``test.npz``; B and C each run
    ``node-host`` with their own key and the CA; the run completes and the records name exactly
    the registered nodes. Meanwhile an outsider D with the CA certificate and a key of its own
    cannot reach Control (A's SuperLink port is closed to the network), gets 404 from the proxy
    for ``flwr ls``, and its node is refused; a node dialing an address the certificate does not
    name is refused before it starts, in one line naming both."""
    _need("openssl", "ssh-keygen")
    if launch.nginx_binary() is None:
        pytest.skip("nginx not installed (scripts/bootstrap.sh installs it)")
    work = tmp_path
    node_keys = work / "node-keys"
    node_keys.mkdir()
    evaluation = work / "eval"
    evaluation.mkdir()
    shutil.copy(SAMPLE / "test.npz", evaluation)   # central evaluation: the test split only
    env = flower_env(work / "none", {"RSA_BITS": "2048"})  # make-certs.sh: faster keys
    env.pop("FLWR_HOME")
    for h in "bcd":
        res = subprocess.run(_launch("node-host", "--make-key", "--work-dir", str(work / h)),
                             env=env, capture_output=True, text=True, timeout=60, cwd=PROJECT)
        assert res.returncode == 0 and "Next: send" in res.stdout, res.stderr
    for h in "bc":  # the operator of A receives B's and C's public keys, not D's
        shutil.copy(work / h / "supernode-key.pub", node_keys / f"{h}.pub")

    rc = {**RUN, "data-dir": str(evaluation), "run-dir": str(work / "runs")}
    with Processes(work / "logs") as procs:
        a = procs.start("host-a", _in(
            hosts["a"], *_launch("superlink-host", "--listen", f"0.0.0.0:{FLEET_PORT}",
                                 "--name", A_IP, "--superlink-port", str(SUPERLINK_PORT),
                                 "--node-keys", str(node_keys), "--work-dir", str(work / "a"),
                                 "--nodes", "2", "--wait", "300",
                                 *launch.config_string(rc).split(" "))), env, cwd=PROJECT)
        banner = _wait_log(procs, "host-a", a, "Next, on each node host", 180)
        assert f"node-host --superlink {A_IP}:{FLEET_PORT}" in banner, banner
        registered = {int(i) for i in re.findall(r"\.pub -> node (\d+)", banner)}
        assert len(registered) == 2, banner
        ca = work / "a" / "certs" / "ca.crt"

        # the outsider D: Control is not reachable from the network at all...
        probe = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1], "
                 "int(sys.argv[2])), 5)\n print('open')\nexcept OSError as e:\n print(e)")
        res = subprocess.run(_in(hosts["d"], sys.executable, "-c", probe, A_IP,
                                 str(SUPERLINK_PORT)), capture_output=True, text=True, timeout=30)
        assert "refused" in res.stdout, res.stdout + res.stderr
        res = subprocess.run(_in(hosts["d"], sys.executable, "-c", probe, A_IP,
                                 str(FLEET_PORT)), capture_output=True, text=True, timeout=30)
        assert res.stdout.strip() == "open", res.stdout + res.stderr   # the proxy is
        # ...the proxy forwards no Control call...
        d_cli = work / "d" / "cli"
        launch.write_connection(d_cli, "public", f"{A_IP}:{FLEET_PORT}", insecure=False,
                                root_certificates=str(ca))
        res = subprocess.run(_in(hosts["d"], "flwr", "ls", "public"), env=flower_env(d_cli),
                             capture_output=True, text=True, timeout=120, cwd=PROJECT)
        assert res.returncode != 0 and "404" in res.stdout + res.stderr, res.stdout[-2000:]
        # ...and its node, with an unregistered key, is refused
        d = procs.start("host-d", _in(hosts["d"], *_launch(
            "node-host", "--superlink", f"{A_IP}:{FLEET_PORT}", "--ca", str(ca),
            "--work-dir", str(work / "d"), "--node-config", "partition-id=0 num-partitions=2",
            "--data-dir", str(SAMPLE))), env, cwd=PROJECT)
        # a node dialing an address of A that the certificate does not name
        wrong = subprocess.run(_in(hosts["b"], *_launch(
            "node-host", "--superlink", f"{WRONG_IP}:{FLEET_PORT}", "--ca", str(ca),
            "--key", str(work / "b" / "supernode-key"), "--work-dir", str(work / "b-wrong"),
            "--node-config", "partition-id=0 num-partitions=2", "--data-dir", str(SAMPLE))),
            env=env, capture_output=True, text=True, timeout=60, cwd=PROJECT)
        assert wrong.returncode == launch.EXIT_REFUSED, wrong.stdout + wrong.stderr
        assert wrong.stderr.count("\n") == 1, wrong.stderr
        assert f"TLS name mismatch: this node dials '{WRONG_IP}'" in wrong.stderr
        assert f"names localhost, 127.0.0.1, {A_IP}" in wrong.stderr, wrong.stderr

        nodes = {h: procs.start(f"host-{h}", _in(hosts[h], *_launch(
            "node-host", "--superlink", f"{A_IP}:{FLEET_PORT}", "--ca", str(ca),
            "--work-dir", str(work / h), "--node-config",
            f"partition-id={i} num-partitions=2", "--data-dir", str(SAMPLE))), env, cwd=PROJECT)
            for i, h in enumerate("bc")}
        assert _wait_exit(d, 120) == launch.EXIT_FAILED
        assert "refused this node's key" in procs.log("host-d"), procs.log("host-d")[-2000:]
        code = _wait_exit(a, 600)
        log_a = procs.log("host-a")
        assert code == 0, log_a[-4000:]
        for h in "bc":
            assert "joined" in procs.log(f"host-{h}"), procs.log(f"host-{h}")[-2000:]
            assert nodes[h].poll() is None  # still serving until stopped
    rounds = read_rounds(work / "runs" / "netns")
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["clients"] == 2 and rounds[1]["failures"] == 0
    assert {int(n) for n in rounds[1]["bytes_up_per_node"]} == registered
    summary = json.loads((work / "runs" / "netns" / "summary.json").read_text())
    assert summary["rounds"] == 1


def _certs_without_localhost(out: Path) -> None:
    """A CA and a server certificate naming only 127.0.0.1: what make-certs.sh produced when
    given addresses before it always added localhost."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
           .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
           .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName(
               [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
           .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (out / "ca.crt").write_bytes(ca.public_bytes(pem))
    (out / "server.pem").write_bytes(srv.public_bytes(pem))
    (out / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (out / "server.key").chmod(0o600)


def test_fleet_proxy_that_cannot_verify_the_superlink_says_so(tmp_path, monkeypatch):
    """The proxy checks the SuperLink as ``localhost``. With a certificate that lacks that name
    (the SuperLink host's own name check switched off here, to get past it) the proxy answers
    502 to every node; the SuperLink host reports it at start, in one line naming the expected
    and the presented names, instead of nodes retrying forever."""
    _need("openssl")
    if launch.nginx_binary() is None:
        pytest.skip("nginx not installed (scripts/bootstrap.sh installs it)")
    _certs_without_localhost(tmp_path / "certs")
    monkeypatch.setattr(SuperLinkHost, "ensure_certs", lambda self: None)
    with Processes(tmp_path / "logs") as procs:
        h = SuperLinkHost(procs, tmp_path, certs=tmp_path / "certs")
        with pytest.raises(TLSCheckError) as err:
            h.start_superlink()
    msg = str(err.value)
    assert msg == ("TLS name mismatch: the Fleet proxy checks the SuperLink as 'localhost' but "
                   "its certificate names 127.0.0.1"), msg
