"""A Flower deployment on this machine: ``flower-superlink`` and N ``flower-supernode`` processes, then ``flwr run``.

The commands are the ones docs/flower.md gives an operator; this module only starts them as subprocesses on
loopback ports, each with its own ``FLWR_HOME``, and stops every process it started (and their children: the
SuperExec and the ServerApp / ClientApp processes Flower spawns) by process id. Used by tests/test_flower.py and
bench/flower_vs_daemon.py (``pip install edgezo[flower]``).

TLS (``tls=(ca, cert, key)``) is Flower's: the SuperLink serves HTTPS with ``--ssl-ca-certfile/--ssl-certfile/
--ssl-keyfile``, SuperNodes verify it with ``--root-certificates``, ``flwr`` with ``root-certificates`` in its
connection. ``tls=None`` runs everything with ``--insecure`` (plaintext on loopback), which callers must ask for.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CONNECTION = "edgezo-local"  # the SuperLink connection name written into flwr's config.toml
APP_DIR = Path(__file__).resolve().parent / "flower"  # the Flower App (pyproject.toml) flwr run ships


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: object) -> str:
    """A node/run config value as Flower parses it (TOML scalars: strings quoted, numbers and bools bare)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_arg(cfg: dict[str, object]) -> str:
    """``{"model": "/m.gguf", "threads": 1}`` → ``model="/m.gguf" threads=1`` (--node-config / --run-config)."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in cfg.items())


def guide_toml(path: Path, *, state: Path, log: Path, rounds: int, clients: int, port: int = 0,
               insecure: bool = False, k: int = 8, deadline_s: float = 300.0) -> Path:
    """A small subspace-round guide.toml for a loopback run (tests, bench/flower_vs_daemon.py): LoRA r2, τ = 2."""
    server = f'state_dir = "{state}"\nlog_file = "{log}"\n'
    if insecure:
        server += f"host = \"127.0.0.1\"\nport = {port}\ninsecure = true\nlong_poll_s = 2.0\n"
    path.write_text(f"""[server]
{server}
[rounds]
rounds = {rounds}
min_clients = {clients}
max_clients = {clients}
deadline_s = {deadline_s}
join_window_s = 0.0

[train]
kind = "subspace"
k = {k}
local_steps = 2
q = 1
batch = 4

[model]
rank = 2
lora_alpha = 4.0
""")
    return path


class LocalDeployment:
    """SuperLink + SuperNodes on loopback. ``start(node_configs)``, ``run(run_config)``, ``close()`` (or ``with``).

    ``root``: a working folder (logs, one FLWR_HOME per process). ``tls``: (ca.pem, cert.pem, key.pem) for the
    SuperLink, or None for ``--insecure``.
    """

    def __init__(self, root: str | os.PathLike, *, tls: tuple[str, str, str] | None = None,
                 bin_dir: str | os.PathLike | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.bin = Path(bin_dir) if bin_dir else Path(sys.executable).parent
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[str, Path] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _env(self, name: str) -> dict[str, str]:
        home = self.root / "flwr-home" / name
        home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # Each process installs FABs under its own FLWR_HOME; no telemetry or update check leaves this machine.
        env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                   PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
        return env

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        with open(log, "ab") as f:
            f.write(("$ " + shlex.join(argv) + "\n").encode())
            f.flush()
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=self._env(name), cwd=self.root,
                                 start_new_session=True)
        self.procs.append(p)
        return p

    def superlink_argv(self) -> list[str]:
        """``flower-superlink`` with TLS (or --insecure) on this deployment's port."""
        argv = [str(self.bin / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.tls is None:
            return argv + ["--insecure"]
        ca, cert, key = self.tls
        return argv + ["--ssl-ca-certfile", ca, "--ssl-certfile", cert, "--ssl-keyfile", key]

    def supernode_argv(self, node_config: dict[str, object], runtime_port: int) -> list[str]:
        """``flower-supernode`` pointing at this SuperLink, its ClientApp configured by ``node_config``."""
        argv = [str(self.bin / "flower-supernode"), "--superlink", self.address, "--port", str(runtime_port),
                "--node-config", config_arg(node_config)]
        return argv + (["--insecure"] if self.tls is None else ["--root-certificates", self.tls[0]])

    def start(self, node_configs: list[dict[str, object]], *, timeout: float = 90.0) -> None:
        """Start the SuperLink, wait until it listens, start one SuperNode per node config, wait until each has
        registered with the SuperLink (its log says so)."""
        self._spawn("superlink", self.superlink_argv())
        self._wait(lambda: _listening(self.port), timeout, "the SuperLink to listen")
        for i, nc in enumerate(node_configs):
            self._spawn(f"supernode-{i}", self.supernode_argv(nc, free_port()))
        self._wait(lambda: all("SuperNode ID:" in self.log_text(f"supernode-{i}") for i in range(len(node_configs))),
                   timeout, "the SuperNodes to register")
        self._write_flwr_config()

    def _write_flwr_config(self) -> None:
        home = self.root / "flwr-home" / "cli"
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.address}"']
        lines += ["insecure = true"] if self.tls is None else [f"root-certificates = {_toml_value(self.tls[0])}"]
        (home / "config.toml").write_text("\n".join(lines) + "\n")

    def run(self, run_config: dict[str, object], *, app_dir: str | os.PathLike = APP_DIR,
            timeout: float = 60.0) -> str:
        """``flwr run APP CONNECTION --run-config ...``: submits the run (it returns once the SuperLink accepted it,
        not when the run ends). Returns flwr's output; RuntimeError when flwr fails."""
        argv = [str(self.bin / "flwr"), "run", str(app_dir), CONNECTION, "--run-config", config_arg(run_config)]
        p = subprocess.run(argv, env=self._env("cli"), cwd=self.root, capture_output=True, text=True,
                           timeout=timeout, check=False)
        out = p.stdout + p.stderr
        (self.root / "flwr-run.log").write_text("$ " + shlex.join(argv) + "\n" + out)
        if p.returncode != 0:
            raise RuntimeError(f"flwr run failed ({p.returncode}):\n{out[-3000:]}")
        return out

    def log_text(self, name: str) -> str:
        p = self.logs.get(name)
        return p.read_text(errors="replace") if p is not None and p.exists() else ""

    def tail(self, lines: int = 40) -> str:
        """The last lines of every process's log (for a failure message)."""
        return "\n".join(f"== {n}\n" + "\n".join(self.log_text(n).splitlines()[-lines:]) for n in self.logs)

    def _wait(self, ok, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not ok():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > end:
                why = f"{dead} exited" if dead else f"timed out after {timeout:.0f} s"
                raise RuntimeError(f"waiting for {what}: {why}\n{self.tail()}")
            time.sleep(0.2)

    def close(self) -> None:
        """Stop every process started here and the processes they started (SuperExec, ServerApp, ClientApps),
        each by its pid: SIGTERM, then SIGKILL for what is still running after 5 s."""
        import psutil

        tree: list[psutil.Process] = []
        for p in self.procs:
            try:
                proc = psutil.Process(p.pid)
                tree += proc.children(recursive=True) + [proc]
            except psutil.NoSuchProcess:
                pass
        for proc in tree:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for p in self.procs:
            if p.poll() is None:
                p.wait(timeout=5)
        self.procs.clear()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
