"""A Prefect server and a Ray head for one machine (`dataengine server`), on loopback by default.

Without a server every Ray worker that touches Prefect starts a temporary one of its own;
with one, flows and workers share it (`PREFECT_API_URL`). `start` runs `prefect server
start` as a child in its own session with its database under `home`, waits until the API
answers, starts a Ray head (`ray start --head --block`, in its own session too), and
writes both addresses and pids to `home/server.json`; `stop` reads that file, stops both
process groups, and removes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
STATE = "server.json"
RAY_TOKEN = "ray-auth-token"  # the head's token: clients read it by RAY_AUTH_TOKEN_PATH


class ServerError(RuntimeError):
    pass


@dataclass
class Servers:
    prefect_url: str  # PREFECT_API_URL for flows and workers
    prefect_pid: int
    ray_address: str | None  # RAY_ADDRESS; None when no Ray head was started
    home: str
    log: str
    ray_pid: int | None = None  # `ray start --head --block`, whose group holds the head's processes

    def env(self) -> dict[str, str]:
        """What a flow or a worker needs to use these (the Ray head's token by path)."""
        out = {"PREFECT_API_URL": self.prefect_url}
        if self.ray_address:
            out |= {"RAY_ADDRESS": self.ray_address, "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(Path(self.home) / RAY_TOKEN)}
        return out


def default_home() -> Path:
    return Path(os.environ.get("DATAENGINE_HOME", Path.home() / ".dataengine"))


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start(host: str = "127.0.0.1", port: int = 4200, ray: bool = True, ray_port: int = 6379,
          home: str | Path | None = None, allow_remote: bool = False, timeout_s: float = 120) -> Servers:
    """Start the Prefect server (and a Ray head) and wait until the API answers."""
    if host not in LOOPBACK and not allow_remote:
        raise ServerError(f"refusing to listen on {host}: not loopback (pass allow_remote to serve other machines)")
    home = Path(home or default_home())
    home.mkdir(parents=True, exist_ok=True)
    if (home / STATE).exists():
        old = load(home)
        if _alive(old.prefect_pid):
            raise ServerError(f"a server is already running (pid {old.prefect_pid}, {old.prefect_url}); "
                              "`dataengine server stop` first")
        (home / STATE).unlink()
    url = f"http://{host}:{port}/api"
    if _healthy(url):
        raise ServerError(f"something already answers on {url}")
    log = home / "prefect-server.log"
    env = dict(os.environ, PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)  # the server is not a client of another server
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not _healthy(url):
        if proc.poll() is not None:
            raise ServerError(f"prefect server exited with {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            _kill_group(proc.pid)
            raise ServerError(f"prefect server did not answer on {url} within {timeout_s:.0f} s; see {log}")
        time.sleep(0.5)
    ray_address, ray_pid = None, None
    if ray:
        # --block keeps `ray start` in the foreground and takes the head's processes down with
        # it: stopping its process group stops this head only (`ray stop` stops every Ray here).
        # Ray's GCS listens on every interface whatever --node-ip-address says, and a driver
        # rewrites a loopback address to this machine's IP, so the head goes by that IP; Ray's
        # token authentication (on by default) guards it.
        from ray._private.services import get_node_ip_address

        node_ip = get_node_ip_address()
        ray_address = f"{node_ip}:{ray_port}"
        token = home / RAY_TOKEN
        if not token.exists():
            import secrets

            token.touch(mode=0o600)
            token.write_text(secrets.token_hex(32))
        with open(home / "ray-head.log", "ab") as out:
            head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                                     f"--port={ray_port}", "--include-dashboard=false", "--disable-usage-stats"],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
                                             RAY_AUTH_TOKEN_PATH=str(token)))
        ray_pid = head.pid
        # Up when `ray start` says so: the port listens earlier, before the head has written
        # the auth token a client needs.
        while "Ray runtime started" not in (home / "ray-head.log").read_text(errors="replace"):
            if head.poll() is not None or time.monotonic() > deadline:
                _kill_group(head.pid)
                _kill_group(proc.pid)
                raise ServerError(f"the ray head did not start on {ray_address}; see {home / 'ray-head.log'}")
            time.sleep(0.5)
    servers = Servers(url, proc.pid, ray_address, str(home), str(log), ray_pid)
    (home / STATE).write_text(json.dumps(asdict(servers), indent=1))
    return servers


def load(home: str | Path | None = None) -> Servers:
    path = Path(home or default_home()) / STATE
    if not path.exists():
        raise ServerError(f"no server started from {path.parent} ({STATE} missing)")
    return Servers(**json.loads(path.read_text()))


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False  # our child, and it exited (now reaped)
    except ChildProcessError:
        pass  # not our child: ask the kernel
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _kill_group(pid: int, grace_s: float = 10) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)


def stop(home: str | Path | None = None) -> Servers:
    """Stop what `start` started from `home`."""
    servers = load(home)
    _kill_group(servers.prefect_pid)
    if servers.ray_pid:
        _kill_group(servers.ray_pid, grace_s=5)  # an idle head drains for 30 s on SIGTERM
    (Path(servers.home) / STATE).unlink(missing_ok=True)
    return servers
