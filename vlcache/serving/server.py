"""Run a real Triton Inference Server on an artifact: the :class:`TritonServer` API and :func:`serve`,
what `vlcache-serve` (:mod:`vlcache.cli.serve`) runs.

Contract:
* :func:`find_tritonserver`: ``tritonserver`` on PATH, else the binary inside the installed
  ``nvidia-pytriton`` wheel; :class:`~vlcache.errors.UserError` when there is none.
* Backends: a server from a standard install (``/opt/tritonserver/bin``, the NGC images) uses its
  own ``backends/`` folder. For the wheel's binary a backend directory is prepared in a private work
  folder: ``python/`` holding the wheel's ``libtriton_python.so``, ``triton_python_backend_utils.py``
  and the stub built for the running Python (``python_backend_stubs/<major.minor>/``).
* Environment of the server: ``LD_LIBRARY_PATH`` = the running interpreter's LIBDIR (so the stub
  loads this libpython, not another of the same version), then the wheel's ``nvidia_pytriton.libs``,
  then the caller's; the running interpreter's ``bin`` first on ``PATH`` (the stub's embedded Python
  finds its prefix, venv included, from the ``python3`` on PATH). That environment must have
  numpy < 2: with numpy 2 the stub hands the model zeros.
* The server binds to 127.0.0.1 only (HTTP, gRPC, metrics) unless ``host`` says otherwise (``0.0.0.0``
  inside a container image: docker/Dockerfile); a port of 0 means a free one (on ``host``; the three
  are always different: :func:`free_ports`). The
  readiness probe and :attr:`TritonServer.url` use 127.0.0.1 when ``host`` is a wildcard address.
  ``start`` returns once ``/v2/models/vlcache/ready`` answers 200, or raises
  :class:`~vlcache.errors.UserError` with the tail of the server's log when the process exits or
  the timeout passes (every failure to find, prepare or start the server is a UserError: the
  command reports it without a traceback).
* ``stop`` sends SIGTERM (Triton unloads the model and exits), waits, then SIGKILLs the process
  group and removes the Python backend's shared-memory regions a killed server leaves in
  ``/dev/shm`` (those of this server's prefix only); the context manager always stops. :func:`serve` stops the same way on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType

from vlcache.errors import UserError
from vlcache.serving import protocol

HOST = "127.0.0.1"
#: bind addresses that mean "every interface": the server is then reached on 127.0.0.1 from inside
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
LOG_TAIL_LINES = 40


def find_tritonserver() -> Path:
    """The ``tritonserver`` binary to run (see the module docstring)."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path).resolve()
    try:
        import pytriton  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise UserError(
            "tritonserver not found: not on PATH and nvidia-pytriton is not installed "
            "(pip install 'vlcache[serve]', or run inside an NGC tritonserver image)"
        ) from None
    binary = Path(pytriton.__file__).resolve().parent / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise UserError(f"nvidia-pytriton is installed but has no tritonserver binary at {binary}")
    return binary


def _wheel_root(binary: Path) -> Path | None:
    """The wheel's ``pytriton/tritonserver`` folder when ``binary`` is the wheel's, else None."""
    root = binary.parent.parent
    return root if (root / "python_backend_stubs").is_dir() else None


def prepare_backends(binary: Path, workdir: Path) -> Path:
    """The ``--backend-directory`` for ``binary`` (prepared under ``workdir`` for the wheel's binary)."""
    wheel = _wheel_root(binary)
    if wheel is None:
        backends = binary.parent.parent / "backends"
        if not (backends / "python").is_dir():
            raise UserError(f"{binary} has no python backend in {backends}")
        return backends
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
    target = workdir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for item in (wheel / "backends" / "python").iterdir():
        if item.is_file():
            shutil.copy2(item, target / item.name)
    shutil.copy2(stub, target / stub.name)
    return target.parent


def server_env(binary: Path) -> dict[str, str]:
    """The server's environment (see the module docstring)."""
    env = dict(os.environ)
    libs = [str(sysconfig.get_config_var("LIBDIR") or "")]
    wheel = _wheel_root(binary)
    if wheel is not None:
        libs.append(str(wheel.parent.parent / "nvidia_pytriton.libs"))
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def free_port(host: str = HOST) -> int:
    """A TCP port free on ``host`` (default 127.0.0.1) right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(host: str, wanted: list[int]) -> list[int]:
    """``wanted`` with each 0 replaced by a free TCP port on ``host``: all different from each other
    and from the ports given (the sockets are held open together while the ports are chosen, so the
    system cannot hand out the same port twice)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held: list[socket.socket] = []
    ports = list(wanted)
    try:
        for i, port in enumerate(ports):
            while port == 0:
                s = socket.socket(family, socket.SOCK_STREAM)
                held.append(s)
                s.bind((host, 0))
                candidate = int(s.getsockname()[1])
                if candidate not in ports:
                    port = candidate
            ports[i] = port
    finally:
        for s in held:
            s.close()
    return ports


def connect_host(host: str) -> str:
    """The address a local client uses to reach a server bound to ``host``."""
    return HOST if host in WILDCARD_HOSTS else host


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


class TritonServer:
    """A ``tritonserver`` process serving ``repository`` on ``host`` (127.0.0.1); a context manager.

    Example::

        with TritonServer.for_artifact("out/llava-tiny", instances=1) as server:
            client = vlcache.client.Client(server.url)
    """

    def __init__(
        self,
        repository: str | Path,
        *,
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        startup_timeout: float = 300.0,
        tritonserver: str | Path | None = None,
        workdir: str | Path | None = None,
        host: str = HOST,
    ) -> None:
        self.repository = Path(repository).resolve()
        if not (self.repository / protocol.MODEL_NAME / "config.pbtxt").is_file():
            raise UserError(
                f"{self.repository} is not a vlcache model repository (no {protocol.MODEL_NAME}/config.pbtxt)"
            )
        self.host = host
        # 0: a free port; three separate free_port() calls could return the same port twice
        self.grpc_port, self.http_port, self.metrics_port = free_ports(
            host or "0.0.0.0", [grpc_port, http_port, metrics_port]
        )
        self.startup_timeout = startup_timeout
        self.binary = Path(tritonserver) if tritonserver else find_tritonserver()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="vlcache-serve-"))
        self.log_path = self.workdir / "tritonserver.log"
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def for_artifact(
        cls,
        artifact_dir: str | Path,
        *,
        instances: int | None = None,
        num_threads: int | None = None,
        max_tokens_cap: int | None = None,
        max_batch_size: int | None = None,
        kv_cache_mb: float | None = None,
        max_prefill_tokens: int | None = None,
        **kwargs: object,
    ) -> TritonServer:
        """Serve ``ARTIFACT/triton``, or a copy rendered with these settings when any is given
        (:func:`vlcache.serving.render_repository`; ``max_batch_size``: requests decoded together,
        ``kv_cache_mb``: each instance's KV pool in MiB, ``max_prefill_tokens``: prompt tokens prefilled
        between two decode steps, 0 for no limit). The artifact is verified first (hashes, versions:
        :func:`vlcache.artifact.verify_artifact`)."""
        from vlcache.artifact import verify_artifact
        from vlcache.serving.repository import render_repository

        manifest = verify_artifact(artifact_dir)
        if manifest.backend == "trtllm":
            raise UserError(
                f"{manifest.root} is a trtllm artifact: its repository ({manifest.triton_dir}) is TensorRT-LLM's "
                "llmapi model, served by tritonserver in a Triton TensorRT-LLM image on a GPU host (docs/trtllm.md), "
                "not by vlcache-serve"
            )
        repository = manifest.triton_dir
        overrides = {
            k: v
            for k, v in {
                "instances": instances,
                "num_threads": num_threads,
                "max_tokens_cap": max_tokens_cap,
                "max_batch_size": max_batch_size,
                "kv_cache_mb": kv_cache_mb,
                "max_prefill_tokens": max_prefill_tokens,
            }.items()
            if v is not None
        }
        workdir = Path(tempfile.mkdtemp(prefix="vlcache-serve-"))
        if overrides or not (repository / protocol.MODEL_NAME / "config.pbtxt").is_file():
            repository = render_repository(manifest.root, out=workdir / "repository", **overrides)  # type: ignore[arg-type]
        server = cls(repository, workdir=workdir, **kwargs)  # type: ignore[arg-type]
        server._own_workdir = True
        return server

    @property
    def url(self) -> str:
        """``host:port`` of the gRPC endpoint (127.0.0.1 when bound to every interface)."""
        return f"{connect_host(self.host)}:{self.grpc_port}"

    def command(self, backends: Path) -> list[str]:
        return [
            str(self.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=15",
            # a private shared-memory prefix: several servers may run on one machine
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]

    @property
    def shm_prefix(self) -> str:
        """The prefix of the Python backend's shared-memory regions (``/dev/shm``) of this server."""
        return f"vlcache_{os.getpid()}_{self.grpc_port}_"

    def start(self) -> TritonServer:
        if self.process is not None:
            raise RuntimeError("the server is already started")  # a caller's bug, not a user mistake
        backends = prepare_backends(self.binary, self.workdir)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(backends),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=server_env(self.binary),
                cwd=self.workdir,
                start_new_session=True,  # our own process group: Ctrl-C in a terminal reaches us only
            )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        host = connect_host(self.host)
        host = f"[{host}]" if ":" in host else host
        url = f"http://{host}:{self.http_port}/v2/models/{protocol.MODEL_NAME}/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise UserError(
                    f"tritonserver exited (status {code}) before model '{protocol.MODEL_NAME}' was ready; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if self.ready():
                return
            time.sleep(0.25)
        raise UserError(
            f"model '{protocol.MODEL_NAME}' not ready after {self.startup_timeout:.0f} s; "
            f"log {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); its exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # the stubs are in the server's process group; leave none behind
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()
        self._remove_shm()
        return process.returncode

    def _remove_shm(self) -> None:
        """Remove the shared-memory regions a killed server left behind (a clean exit leaves none)."""
        shm = Path("/dev/shm")
        if not shm.is_dir():
            return
        for region in shm.glob(f"{self.shm_prefix}*"):
            try:
                region.unlink()
            except OSError:
                pass

    def cleanup(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --- serving until stopped ------------------------------------------------------------------------
class _Terminated(Exception):
    """SIGTERM arrived while :func:`serve` was waiting."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def serve(
    server: TritonServer, say: Callable[[str], None] = print, warn: Callable[[str], None] = _stderr
) -> int | None:
    """Start ``server`` and keep it running until it exits or this process is asked to stop.

    SIGTERM (in the main thread) stops it and returns None; Ctrl-C stops it and re-raises the
    ``KeyboardInterrupt``. When tritonserver exits by itself, ``warn`` gets its status and the tail
    of its log, and the status is returned. ``server`` is always stopped (:meth:`TritonServer.stop`)
    and its work folder removed; ``say`` gets one line per step (starting, ready, stopping, stopped).
    """
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        say(f"starting tritonserver on {server.repository} (log {server.log_path})")
        server.start()
        local = server.url.rsplit(":", 1)[0]  # where a client on this machine reaches it
        bound = getattr(server, "host", HOST)
        say(
            f"ready: gRPC {server.url}, HTTP {local}:{server.http_port}, metrics {local}:{server.metrics_port}"
            + ("" if bound == local else f" (bound to {bound or '0.0.0.0'})")
            + "; Ctrl-C to stop"
        )
        while server.running():
            time.sleep(0.5)
        code = server.process.returncode if server.process is not None else None
        warn(f"tritonserver exited unexpectedly (status {code}); log {server.log_path}:\n{log_tail(server.log_path)}")
        return code
    except _Terminated:
        say("stopping")
        return None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        code = server.stop()
        if code is not None:
            say(f"tritonserver stopped (status {code})")
        server.cleanup()
