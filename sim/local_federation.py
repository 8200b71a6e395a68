"""SuperLink and SuperNode processes on 127.0.0.1, started and stopped by PID.

``LocalFederation`` starts a SuperLink on a free port and SuperNodes that connect to it, each
with its own ``FLWR_HOME``, node config and log, starts ``flwr run`` against it, and stops every
process it started, with their children, by PID. ``sim.deploy`` runs the pipeline on it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from peel_fed.atomic import write_text_atomic
from sim.certs import Certificates
from sim.flower_env import configure_flower_env

APP_DIR = Path(__file__).resolve().parents[1]


class DeploymentError(RuntimeError):
    """A deployed run could not start or did not finish."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True while something accepts connections on ``host:port``."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process (``ps``: Linux and macOS)."""
    out = subprocess.run(
        ["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, check=True
    ).stdout
    kids: dict[int, list[int]] = {}
    for line in out.splitlines():
        pid, ppid = (int(x) for x in line.split())
        kids.setdefault(ppid, []).append(pid)
    return kids


def descendants(pid: int, kids: dict[int, list[int]] | None = None) -> list[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    kids = _children() if kids is None else kids
    out, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of ours counts as gone once reaped
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, values: dict) -> Path:
    """A flat ``key = value`` TOML file (run and node configs for Flower's CLIs)."""
    return write_text_atomic(path, "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))


@dataclass
class Process:
    """One process this launcher started, with its log and the port it serves."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    port: int
    seen: set[int] = field(default_factory=set)
    node_id: int | None = None


class LocalFederation:
    """SuperLink and SuperNode processes on 127.0.0.1; a context manager that stops them all.

    Parameters
    ----------
    workdir
        Folder for the processes' ``FLWR_HOME`` folders, configs and logs.
    certs
        TLS files for the SuperLink; ``None`` runs without TLS (insecure).
    """

    def __init__(
        self,
        workdir: str | Path,
        certs: Certificates | None,
        app_dir: Path = APP_DIR,
        log: Callable[[str], None] = print,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.certs, self.app_dir, self.log = certs, app_dir, log
        self.superlink: Process | None = None
        self.nodes: list[Process] = []
        self.flwr_run: Process | None = None
        self.env = dict(os.environ)
        self.env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
        self._last_scan = 0.0

    # --- processes ------------------------------------------------------------------------------
    def _start(self, name: str, cmd: list[str], home: Path, port: int) -> Process:
        home.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / "logs" / f"{name}.log"
        with open(log_path, "ab") as fh:
            popen = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=configure_flower_env(dict(self.env), flwr_home=home, keep_set=False),
                cwd=home,
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops it by PID
            )
        return Process(name, popen, log_path, port)

    def _tls_args(self, server: bool) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        if server:
            return [
                "--ssl-ca-certfile",
                str(self.certs.ca_cert),
                "--ssl-certfile",
                str(self.certs.server_cert),
                "--ssl-keyfile",
                str(self.certs.server_key),
            ]
        return ["--root-certificates", str(self.certs.ca_cert)]

    def start_superlink(self, wait_s: float = 60.0, node_auth: bool = False) -> Process:
        """Start the SuperLink on a free port and wait until its health endpoint answers.
        ``node_auth`` admits only SuperNodes whose public key was registered (TLS only)."""
        if node_auth and self.certs is None:
            raise DeploymentError("SuperNode authentication needs TLS")
        port = free_port()
        cmd = [
            _tool("flower-superlink"),
            *self._tls_args(server=True),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(self.workdir / "superlink.db"),
            "--disable-runtime-dependency-installation",
            *(["--enable-supernode-auth"] if node_auth else []),
        ]
        self.superlink = self._start("superlink", cmd, self.workdir / "superlink", port)
        deadline = time.monotonic() + wait_s
        while not self._healthy(port):
            if self.superlink.popen.poll() is not None:
                raise DeploymentError(
                    f"the SuperLink exited with code {self.superlink.popen.returncode}; "
                    f"see {self.superlink.log_path}"
                )
            if time.monotonic() > deadline:
                raise DeploymentError(f"the SuperLink did not answer within {wait_s:.0f} s")
            time.sleep(0.2)
        self.log(f"SuperLink on 127.0.0.1:{port} ({'TLS' if self.certs else 'insecure'})")
        return self.superlink

    def _healthy(self, port: int) -> bool:
        scheme = "https" if self.certs else "http"
        context = ssl.create_default_context(cafile=str(self.certs.ca_cert)) if self.certs else None
        try:
            with urllib.request.urlopen(
                f"{scheme}://127.0.0.1:{port}/health", timeout=1, context=context
            ) as r:
                return r.status == 200
        except OSError:
            return False

    def register_node(self, public_key: Path) -> None:
        """``flwr supernode register``: admit the SuperNode holding this key's private half."""
        cmd = [_tool("flwr"), "supernode", "register", str(public_key), self.connection()]
        home = self.workdir / "cli"
        env = configure_flower_env(dict(self.env), flwr_home=home, keep_set=False)
        done = subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
            raise DeploymentError(f"flwr supernode register failed: {tail[0]}")

    def add_node(
        self, partition_id: int, num_partitions: int, auth_key: Path | None = None, **node_config
    ) -> Process:
        """Start a SuperNode hosting partition ``partition_id`` of ``num_partitions``, signing
        its requests with ``auth_key`` (a private key file) when given.

        Further node config (``data-dir``, ``device-budget``) is passed as given.
        """
        if self.superlink is None:
            raise DeploymentError("start the SuperLink before the SuperNodes")
        name = f"supernode-{len(self.nodes)}"
        home = self.workdir / name
        config = {"partition-id": partition_id, "num-partitions": num_partitions, **node_config}
        config_path = write_toml(home / "node-config.toml", config)
        port = free_port()
        cmd = [
            _tool("flower-supernode"),
            *self._tls_args(server=False),
            "--superlink",
            f"127.0.0.1:{self.superlink.port}",
            "--port",
            str(port),
            "--node-config",
            str(config_path),
            *(["--auth-supernode-private-key", str(auth_key)] if auth_key else []),
        ]
        node = self._start(name, cmd, home, port)
        self.nodes.append(node)
        return node

    def wait_for_nodes(self, nodes: list[Process] | None = None, wait_s: float = 60.0) -> None:
        """Wait until every SuperNode has registered with the SuperLink (its log names the node
        id it was given, which is kept in ``Process.node_id``)."""
        todo = list(self.nodes if nodes is None else nodes)
        deadline = time.monotonic() + wait_s
        while todo:
            for proc in list(todo):
                match = re.search(r"SuperNode ID: (\d+)", proc.log_path.read_text(errors="replace"))
                if match:
                    proc.node_id = int(match.group(1))
                    todo.remove(proc)
                elif proc.popen.poll() is not None:
                    raise DeploymentError(
                        f"{proc.name} exited with code {proc.popen.returncode}; see {proc.log_path}"
                    )
            if todo and time.monotonic() > deadline:
                names = ", ".join(p.name for p in todo)
                raise DeploymentError(f"{names} did not connect within {wait_s:.0f} s")
            if todo:
                time.sleep(0.2)

    def kill(self, proc: Process, sig: int = signal.SIGKILL) -> None:
        """Kill one process and everything below it (a crashed SuperNode, say)."""
        for pid in [*descendants(proc.popen.pid), proc.popen.pid]:
            proc.seen.add(pid)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        proc.popen.wait(timeout=30)

    # --- the run --------------------------------------------------------------------------------
    def connection(self) -> str:
        """Write the ``flwr`` CLI's connection for this SuperLink; returns its name."""
        assert self.superlink is not None
        lines = ["[superlink.peel-fed-local]", f'address = "127.0.0.1:{self.superlink.port}"']
        if self.certs:
            lines.append(f"root-certificates = {_toml_value(str(self.certs.ca_cert))}")
        else:
            lines.append("insecure = true")
        write_text_atomic(self.workdir / "cli" / "config.toml", "\n".join(lines) + "\n")
        return "peel-fed-local"

    def start_run(self, run_config: dict) -> Process:
        """``flwr run <app> <connection> --stream --run-config <file>``; output in its log."""
        config_path = write_toml(self.workdir / "run-config.toml", run_config)
        cmd = [
            _tool("flwr"),
            "run",
            str(self.app_dir),
            self.connection(),
            "--stream",
            "--run-config",
            str(config_path),
        ]
        self.flwr_run = self._start("flwr-run", cmd, self.workdir / "cli", 0)
        return self.flwr_run

    def stream(
        self, proc: Process, on_line: Callable[[str], None], timeout_s: float | None = None
    ) -> int:
        """Pass ``proc``'s log lines to ``on_line`` until it exits; returns its exit code."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with open(proc.log_path, errors="replace") as fh:
            while True:
                line = fh.readline()
                if line:
                    on_line(line.rstrip("\n"))
                    continue
                code = proc.popen.poll()
                if code is not None:
                    for rest in fh.read().splitlines():
                        on_line(rest)
                    return code
                if deadline is not None and time.monotonic() > deadline:
                    raise DeploymentError(f"the run did not finish within {timeout_s:.0f} s")
                self._remember_children(every_s=2.0)
                time.sleep(0.1)

    # --- stopping -------------------------------------------------------------------------------
    def processes(self) -> list[Process]:
        procs = [self.flwr_run, self.superlink, *self.nodes]
        return [p for p in procs if p is not None]

    def _remember_children(self, every_s: float = 0.0) -> None:
        """Note the children of every started process (a SuperExec, app processes), so they can
        be stopped by PID even if their parent dies first (one ``ps`` per call, at most one
        call per ``every_s``)."""
        now = time.monotonic()
        if now - self._last_scan < every_s:
            return
        self._last_scan = now
        kids = _children()
        for proc in self.processes():
            if proc.popen.poll() is None:
                proc.seen.update(descendants(proc.popen.pid, kids))

    def started_pids(self) -> set[int]:
        """Every PID this launcher started or saw below one it started."""
        self._remember_children()
        return {pid for p in self.processes() for pid in (p.popen.pid, *p.seen)}

    def stop(self, grace_s: float = 10.0) -> list[int]:
        """SIGTERM every started process and its children by PID, SIGKILL what is left after
        ``grace_s``; returns the PIDs still alive afterwards (none, normally)."""
        pids = self.started_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            pids |= self.started_pids()  # children started while stopping
            time.sleep(0.2)
        for pid in pids:
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.processes():
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.2)
        return sorted(p for p in pids if pid_alive(p))

    def ports(self) -> list[int]:
        return [p.port for p in self.processes() if p.port]

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc) -> None:
        left = self.stop()
        if left:
            self.log(f"warning: processes still alive after stopping: {left}")


def _tool(name: str) -> str:
    """A Flower command from this Python's environment (so a venv need not be activated)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name
