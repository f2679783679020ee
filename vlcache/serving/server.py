"""Run a real Triton Inference Server on an artifact: `vlcache-serve` and the :class:`TritonServer` API.

Contract:
* :func:`find_tritonserver`: ``tritonserver`` on PATH, else the binary inside the installed
  ``nvidia-pytriton`` wheel; :class:`ServeError` when there is none.
* Backends: a server from a standard install (``/opt/tritonserver/bin``, the NGC images) uses its
  own ``backends/`` folder. For the wheel's binary a backend directory is prepared in a private work
  folder: ``python/`` holding the wheel's ``libtriton_python.so``, ``triton_python_backend_utils.py``
  and the stub built for the running Python (``python_backend_stubs/<major.minor>/``).
* Environment of the server: ``LD_LIBRARY_PATH`` = the running interpreter's LIBDIR (so the stub
  loads this libpython, not another of the same version), then the wheel's ``nvidia_pytriton.libs``,
  then the caller's; the running interpreter's ``bin`` first on ``PATH`` (the stub's embedded Python
  finds its prefix, venv included, from the ``python3`` on PATH). That environment must have
  numpy < 2: with numpy 2 the stub hands the model zeros.
* The server binds to 127.0.0.1 only (HTTP, gRPC, metrics); a port of 0 means a free one.
  ``start`` returns once ``/v2/models/vlcache/ready`` answers 200, or raises :class:`ServeError`
  with the tail of the server's log when the process exits or the timeout passes.
* ``stop`` sends SIGTERM (Triton unloads the model and exits), waits, then SIGKILLs the process
  group; the context manager always stops. `vlcache-serve` stops the same way on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from vlcache.serving import protocol

HOST = "127.0.0.1"
LOG_TAIL_LINES = 40


class ServeError(Exception):
    """The server cannot be found, started or kept running (a one-line message, plus a log tail)."""


def find_tritonserver() -> Path:
    """The ``tritonserver`` binary to run (see the module docstring)."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path).resolve()
    try:
        import pytriton  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise ServeError(
            "tritonserver not found: not on PATH and nvidia-pytriton is not installed "
            "(pip install 'vlcache[serve]', or run inside an NGC tritonserver image)"
        ) from None
    binary = Path(pytriton.__file__).resolve().parent / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise ServeError(f"nvidia-pytriton is installed but has no tritonserver binary at {binary}")
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
            raise ServeError(f"{binary} has no python backend in {backends}")
        return backends
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


class TritonServer:
    """A ``tritonserver`` process serving ``repository`` on 127.0.0.1; a context manager.

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
    ) -> None:
        self.repository = Path(repository).resolve()
        if not (self.repository / protocol.MODEL_NAME / "config.pbtxt").is_file():
            raise ServeError(
                f"{self.repository} is not a vlcache model repository (no {protocol.MODEL_NAME}/config.pbtxt)"
            )
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
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
        **kwargs: object,
    ) -> TritonServer:
        """Serve ``ARTIFACT/triton``, or a copy rendered with these settings when any is given.
        The artifact is verified first (hashes, versions: :func:`vlcache.artifact.verify_artifact`)."""
        from vlcache.artifact import verify_artifact
        from vlcache.serving.repository import render_repository

        manifest = verify_artifact(artifact_dir)
        repository = manifest.triton_dir
        overrides = {
            k: v
            for k, v in {"instances": instances, "num_threads": num_threads, "max_tokens_cap": max_tokens_cap}.items()
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
        """``host:port`` of the gRPC endpoint."""
        return f"{HOST}:{self.grpc_port}"

    def command(self, backends: Path) -> list[str]:
        return [
            str(self.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--grpc-address={HOST}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={HOST}",
            f"--http-port={self.http_port}",
            f"--metrics-address={HOST}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=15",
            # a private shared-memory prefix: several servers may run on one machine
            f"--backend-config=python,shm-region-prefix-name=vlcache_{os.getpid()}_{self.grpc_port}_",
        ]

    def start(self) -> TritonServer:
        if self.process is not None:
            raise ServeError("the server is already started")
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
        url = f"http://{HOST}:{self.http_port}/v2/models/{protocol.MODEL_NAME}/ready"
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
                raise ServeError(
                    f"tritonserver exited (status {code}) before model '{protocol.MODEL_NAME}' was ready; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if self.ready():
                return
            time.sleep(0.25)
        raise ServeError(
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
        return process.returncode

    def cleanup(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --- vlcache-serve ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlcache-serve",
        description="Serve a vlcache artifact directory with Triton Inference Server (bound to 127.0.0.1).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("artifact_dir", help="artifact directory written by vlcache-build")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0: a free one)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (0: a free one)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (0: a free one)")
    p.add_argument("--instances", type=int, default=None, help="model instances (default: the rendered repository's)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch / ONNX Runtime threads per instance (default: the repository's)",
    )
    p.add_argument("--max-tokens-cap", type=int, default=None, help="largest max_tokens a request may ask for")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the model to be ready")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vlcache.artifact import ArtifactError
    from vlcache.serving.repository import RenderError

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    server: TritonServer | None = None
    try:
        server = TritonServer.for_artifact(
            args.artifact_dir,
            instances=args.instances,
            num_threads=args.threads,
            max_tokens_cap=args.max_tokens_cap,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            startup_timeout=args.timeout,
        )
        print(f"vlcache-serve: starting tritonserver on {server.repository} (log {server.log_path})", flush=True)
        server.start()
        print(
            f"vlcache-serve: ready: gRPC {server.url}, HTTP {HOST}:{server.http_port}, "
            f"metrics {HOST}:{server.metrics_port}; Ctrl-C to stop",
            flush=True,
        )
        while server.running():
            time.sleep(0.5)
        print(f"vlcache-serve: tritonserver exited unexpectedly; log:\n{log_tail(server.log_path)}", file=sys.stderr)
        return 1
    except (ArtifactError, RenderError, ServeError) as e:
        print(f"vlcache-serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlcache-serve: stopping", flush=True)
        return 0
    finally:
        if server is not None:
            code = server.stop()
            if code is not None:
                print(f"vlcache-serve: tritonserver stopped (status {code})", flush=True)
            server.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
