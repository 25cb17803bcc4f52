"""Run docker/compose.yaml without a Docker daemon: every service's own command, natively, on 127.0.0.1.

What a `docker compose up` would do, as far as it matters for the commands and settings in the file:
- interpolation of `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `$$`
  from an env file (the stack's `docker/.env`; tests write one from `docker/.env.example`);
- each service's environment on top of the image's (`ENV` of the Dockerfile's last stage), and nothing
  from the calling process (a test's MLFLOW_TRACKING_URI must not leak into a server);
- the container's paths mapped to host folders: named volumes and the user's home to temp dirs, bind
  mounts to the repository's files, `configs` to files with their (interpolated) content, /app (the
  image's WORKDIR with the project) to this checkout, /opt/venv (the image's venv) to this venv;
- service hostnames to 127.0.0.1 and container ports to host ports: a published port to its host port
  (the env file chooses free ones), any other port (PostgreSQL's 5432, the worker's health port) to a
  free port; `--host 0.0.0.0` to 127.0.0.1 (native services bind the loopback only);
- start order from `depends_on` with `service_healthy`: each service's own `healthcheck.test` is run
  (mapped the same way) until it passes.
The `postgres` image is not one of ours: its entrypoint is emulated (initdb with POSTGRES_USER and
POSTGRES_PASSWORD, create POSTGRES_DB, run the bind-mounted /docker-entrypoint-initdb.d scripts) on a
throw-away cluster from Debian's binaries (tests/services/pg.py).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mfpipe import services
from tests.services import pg

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENV_EXAMPLE = ROOT / "docker" / ".env.example"
#: The image's venv (Dockerfile) is this environment's.
IMAGE_VENV = "/opt/venv"
#: Settings whose value is a port the service listens on inside its container (not published).
PORT_VARIABLES = ("PREFECT_WORKER_WEBSERVER_PORT",)
#: The one image that is not mfpipe's; its entrypoint is emulated (see the module docstring).
POSTGRES_IMAGE_PORT = 5432

#: `$$` | `${NAME}` / `${NAME:-x}` / `${NAME-x}` / `${NAME:?x}` / `${NAME?x}` (x may hold one `${...}`) | `$NAME`
_VARIABLE = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    """A required variable (`${VAR:?message}`) is unset or empty: compose refuses to start."""


def read_env_file(path: Path) -> dict[str, str]:
    """Compose's `.env` syntax: `KEY=VALUE`, `#` comments, optional single or double quotes."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """One string, as compose interpolates it (`:` forms treat an empty value as unset)."""

    def replace(match: re.Match[str]) -> str:
        escaped, name, operator, argument, bare = match.groups()
        if escaped:
            return "$"
        if bare:
            return env.get(bare, "")
        value = env.get(name)
        unset = value is None or (operator is not None and operator.startswith(":") and value == "")
        if operator in (":-", "-"):
            return interpolate(argument, env) if unset else str(value)
        if operator in (":?", "?") and unset:
            raise InterpolationError(f"required variable {name} is missing a value: {argument}")
        return value or ""

    return _VARIABLE.sub(replace, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """Every string value of a parsed compose file (keys are not interpolated)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def load_compose(env: Mapping[str, str], path: Path = COMPOSE) -> dict[str, Any]:
    """The compose file as `docker compose config` would see it with this env (anchors merged, interpolated)."""
    return interpolate_tree(yaml.safe_load(path.read_text()), env)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    lines = (line.strip() for line in joined.splitlines())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and line[0] != "#"]


def runtime_stage(text: str) -> list[tuple[str, str]]:
    """The instructions of the Dockerfile's last stage (what the image runs)."""
    steps = dockerfile_instructions(text)
    return steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]


def image_env(base_path: str) -> dict[str, str]:
    """`ENV` of the runtime stage; `$PATH` is the base image's PATH (here: this machine's)."""
    env: dict[str, str] = {}
    for op, args in runtime_stage(DOCKERFILE.read_text()):
        if op == "ENV":
            for pair in shlex.split(args):
                key, value = pair.split("=", 1)
                env[key] = value.replace("$PATH", base_path).replace("${PATH}", base_path)
    return env


def image_home() -> str:
    """The home of the image's user (`useradd --home-dir`): what HOME is inside the container."""
    found = re.search(r"--home-dir\s+(\S+)", DOCKERFILE.read_text())
    assert found, "Dockerfile: no useradd --home-dir"
    return found.group(1)


def image_workdir() -> str:
    return [args for op, args in runtime_stage(DOCKERFILE.read_text()) if op == "WORKDIR"][-1]


def is_secret(name: str) -> bool:
    """The stack's secrets by name (passwords, keys, the Prefect auth string): none may have a default."""
    return re.search(r"PASSWORD|SECRET|AUTH_STRING", name) is not None


def write_env_file(directory: Path, **settings: str) -> Path:
    """`docker/.env.example` with every empty (required) secret filled with a random one, plus `settings`."""
    values = read_env_file(ENV_EXAMPLE)
    user = values.get("MLFLOW_TRACKING_USERNAME") or "mfpipe"
    for key, value in values.items():
        if is_secret(key) and not value:  # the auth string is `user:password`, every other secret a password
            secret = secrets.token_urlsafe(24)
            values[key] = f"{user}:{secret}" if key == "PREFECT_API_AUTH_STRING" else secret
    values.update(settings)
    path = directory / ".env"
    path.write_text("".join(f'{key}="{value}"\n' for key, value in values.items()))
    path.chmod(0o600)
    return path


@dataclass
class Native:
    """One compose service as a native process: its command, environment, folder and ports."""

    name: str
    spec: dict[str, Any]
    ports: dict[int, int]  # container port -> host port
    home: Path
    process: services.Service | None = None
    cluster: pg.Cluster | None = None
    paths: dict[str, Path] = field(default_factory=dict)


class Stack:
    """The compose stack run natively (see the module docstring); start() in dependency order, stop() reversed."""

    def __init__(self, env_file: Path, workdir: Path) -> None:
        self.env = read_env_file(env_file)
        self.compose = load_compose(self.env)
        self.workdir = workdir
        self.services: dict[str, Native] = {}
        for name, spec in self.compose["services"].items():
            home = workdir / "home" / name
            home.mkdir(parents=True)
            self.services[name] = Native(name, spec, self._ports(name, spec), home)
        self._paths()
        self.started: list[Native] = []

    # -- mapping ------------------------------------------------------------------------------------
    def _ports(self, name: str, spec: Mapping[str, Any]) -> dict[int, int]:
        ports: dict[int, int] = {}
        for entry in spec.get("ports", []):
            host_ip, host_port, container_port = str(entry).split(":")
            assert host_ip == services.LOCALHOST, (name, entry)
            ports[int(container_port)] = int(host_port)
        for variable in PORT_VARIABLES:
            if variable in spec.get("environment", {}):
                ports[int(spec["environment"][variable])] = services.free_port()
        if str(spec.get("image", "")).startswith("postgres:"):
            ports[POSTGRES_IMAGE_PORT] = services.free_port()
        return ports

    def _paths(self) -> None:
        """Container path -> host path, per service."""
        compose_dir = COMPOSE.parent
        configs = self.compose.get("configs", {})
        for native in self.services.values():
            paths = {IMAGE_VENV: Path(sys.prefix), image_workdir(): ROOT, image_home(): native.home}
            for volume in native.spec.get("volumes", []):
                source, target = str(volume).split(":")[:2]
                if source.startswith((".", "/")):
                    paths[target] = (compose_dir / source).resolve()
                else:
                    paths[target] = self.workdir / "volumes" / source
                    paths[target].mkdir(parents=True, exist_ok=True)
            for config in native.spec.get("configs", []):
                path = self.workdir / "configs" / config["source"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(self._map_hosts(native, configs[config["source"]]["content"]))
                paths[config["target"]] = path
            native.paths = paths

    def _map_hosts(self, native: Native, text: str) -> str:
        """`service:port` and the service's own `127.0.0.1:port` -> this machine's address and port."""
        for other in self.services.values():
            for container, host in other.ports.items():
                text = re.sub(rf"\b{re.escape(other.name)}:{container}\b", f"{services.LOCALHOST}:{host}", text)
        for container, host in native.ports.items():
            text = re.sub(rf"\b(127\.0\.0\.1|localhost|0\.0\.0\.0):{container}\b", f"{services.LOCALHOST}:{host}", text)
        return text

    def _map(self, native: Native, text: str) -> str:
        """Hostnames, ports and paths of the container world -> this machine's."""
        text = self._map_hosts(native, text)
        for container_path in sorted(native.paths, key=len, reverse=True):
            if text == container_path or text.startswith(container_path + "/"):
                return str(native.paths[container_path]) + text[len(container_path) :]
        return text

    def _argv(self, native: Native, argv: list[str]) -> list[str]:
        out = [self._map(native, arg) for arg in argv]
        for i, arg in enumerate(argv[:-1]):
            if arg == "--host" and argv[i + 1] == "0.0.0.0":
                out[i + 1] = services.LOCALHOST
            if arg == "--port" and int(argv[i + 1]) in native.ports:
                out[i + 1] = str(native.ports[int(argv[i + 1])])
        return out

    def environment(self, native: Native) -> dict[str, str]:
        """What the service's process sees: a minimal base, the image's ENV, the service's environment."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(native.home)}
        if native.cluster is None:
            env.update(image_env(env["PATH"]))
        for key, value in native.spec.get("environment", {}).items():
            env[key] = str(value)
        for variable in PORT_VARIABLES:
            if variable in env:
                env[variable] = str(native.ports[int(env[variable])])
        return {key: self._map(native, value) if key != "PATH" else self._map_path_list(native, value)
                for key, value in env.items()}  # fmt: skip

    def _map_path_list(self, native: Native, value: str) -> str:
        return os.pathsep.join(self._map(native, part) for part in value.split(os.pathsep))

    def command(self, native: Native) -> list[str]:
        return self._argv(native, list(native.spec.get("entrypoint", [])) + list(native.spec.get("command", [])))

    def cwd(self, native: Native) -> Path:
        return Path(self._map(native, native.spec.get("working_dir", image_workdir())))

    # -- running ------------------------------------------------------------------------------------
    def waves(self) -> list[list[str]]:
        """Services grouped as compose starts them: each group once everything it depends on is healthy."""
        waves: list[list[str]] = []
        placed: set[str] = set()
        while len(placed) < len(self.services):
            wave = [name for name, native in self.services.items()
                    if name not in placed and set(native.spec.get("depends_on", {})) <= placed]  # fmt: skip
            assert wave, f"depends_on has a cycle among {set(self.services) - placed}"
            waves.append(wave)
            placed.update(wave)
        return waves

    def start(self, timeout: float = 300.0) -> None:
        """Start wave by wave (the servers' start-ups overlap, as in compose); stop everything on failure."""
        try:
            for wave in self.waves():
                for name in wave:
                    native = self.services[name]
                    if str(native.spec.get("image", "")).startswith("postgres:"):
                        self._start_postgres(native)
                    else:
                        self._start_process(native)
                    self.started.append(native)
                for name in wave:
                    self.wait_healthy(self.services[name], timeout)
        except BaseException:
            self.stop()
            raise

    def _start_postgres(self, native: Native) -> None:
        """The postgres image's entrypoint on a throw-away cluster: superuser, POSTGRES_DB, init scripts."""
        env = native.spec["environment"]
        user, database = env["POSTGRES_USER"], env.get("POSTGRES_DB", env["POSTGRES_USER"])
        native.cluster = pg.start(superuser=user, password=env["POSTGRES_PASSWORD"], port=native.ports[5432])
        if database != "postgres":
            native.cluster.execute([f'CREATE DATABASE "{database}"'])
        initdb = [path for target, path in native.paths.items() if target.startswith("/docker-entrypoint-initdb.d/")]
        for script in sorted(initdb, key=lambda p: p.name):
            native.cluster.run_script(script, database)

    def _start_process(self, native: Native) -> None:
        log = self.workdir / "logs" / f"{native.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            process = subprocess.Popen(
                self.command(native), env=self.environment(native), cwd=self.cwd(native), stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        native.process = services.Service(native.name, "", "", process, log)

    def healthcheck(self, native: Native) -> list[str]:
        """The service's `healthcheck.test`, mapped; PostgreSQL's client tools find the cluster via PG*."""
        test = list(native.spec["healthcheck"]["test"])
        argv = ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]
        return [self._map(native, arg) for arg in argv]

    def _health_env(self, native: Native) -> dict[str, str]:
        env = self.environment(native)
        if native.cluster is not None:
            bindir = str(Path(pg.pg_bin("pg_isready") or "pg_isready").parent)
            env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", PGHOST=services.LOCALHOST,
                       PGPORT=str(native.cluster.port))  # fmt: skip
        return env

    def wait_healthy(self, native: Native, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        command, env = self.healthcheck(native), self._health_env(native)
        while True:
            if native.process is not None and not native.process.running():
                raise RuntimeError(f"{native.name} exited {native.process.process.returncode}: {self.log_tail(native)}")
            result = subprocess.run(command, env=env, capture_output=True, timeout=60)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{native.name} not healthy after {timeout:.0f} s: {self.log_tail(native)}")
            time.sleep(1)

    def log_tail(self, native: Native, chars: int = 3000) -> str:
        return native.process.log_path.read_text(errors="replace")[-chars:] if native.process else ""

    def stop(self) -> None:
        """Reverse start order: SIGTERM and wait (services.Service.stop), then the PostgreSQL cluster."""
        for native in reversed(self.started):
            if native.process is not None:
                native.process.stop(timeout=60)
            if native.cluster is not None:
                native.cluster.stop()
        self.started = []

    def url(self, service: str, container_port: int) -> str:
        return f"http://{services.LOCALHOST}:{self.services[service].ports[container_port]}"


def running(env_file: Path, workdir: Path) -> Iterator[Stack]:
    """A started stack for a `with`-less fixture: yields it, stops it afterwards."""
    stack = Stack(env_file, workdir)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
