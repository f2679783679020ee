"""The container images' moving parts that run without a container (docs/deploy.md).

* ``vlcache-serve --host``: the address Triton binds (the image binds 0.0.0.0); a client on the same
  machine still reaches a wildcard-bound server on 127.0.0.1.
* ``docker/entrypoint.sh``: arguments starting with ``-`` go to vlcache-serve with the VLCACHE_*
  settings, any other command runs instead, a missing artifact is one clear error (status 2).

The images themselves are built and served by ``scripts/check_image.sh`` (buildah), not here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vlcache.cli import serve as serve_cli
from vlcache.serving import protocol
from vlcache.serving.server import TritonServer, connect_host

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"


def _repository(tmp_path: Path) -> Path:
    (tmp_path / "repo" / protocol.MODEL_NAME).mkdir(parents=True)
    (tmp_path / "repo" / protocol.MODEL_NAME / "config.pbtxt").write_text("")
    return tmp_path / "repo"


def test_host_is_what_triton_binds_and_the_url_stays_local(tmp_path: Path):
    repository = _repository(tmp_path)
    default = TritonServer(repository, tritonserver="/bin/true", workdir=tmp_path / "w")
    assert "--grpc-address=127.0.0.1" in default.command(tmp_path)
    assert default.url == "127.0.0.1:8001"

    anywhere = TritonServer(repository, tritonserver="/bin/true", workdir=tmp_path / "w", host="0.0.0.0")
    command = anywhere.command(tmp_path)
    for flag in ("--grpc-address", "--http-address", "--metrics-address"):
        assert f"{flag}=0.0.0.0" in command
    assert anywhere.url == "127.0.0.1:8001"
    assert connect_host("::") == "127.0.0.1" and connect_host("10.0.0.5") == "10.0.0.5"


def test_serve_cli_has_host_defaulting_to_loopback():
    parser = serve_cli.build_parser()
    assert parser.parse_args(["ART"]).host == "127.0.0.1"
    assert parser.parse_args(["ART", "--host", "0.0.0.0"]).host == "0.0.0.0"


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A PATH folder whose vlcache-serve / vlcache-build print their arguments."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("vlcache-serve", "vlcache-build", "tritonserver"):
        script = folder / name
        script.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        script.chmod(0o755)
    return folder


def _entrypoint(args: list[str], fake_bin: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env=full, timeout=30)


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs /bin/sh")
def test_entrypoint_serves_the_artifact_with_the_image_settings(tmp_path: Path, fake_bin: Path):
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "manifest.json").write_text("{}")
    done = _entrypoint(
        ["--instances", "2"], fake_bin, VLCACHE_ARTIFACT=str(artifact), VLCACHE_HOST="0.0.0.0", VLCACHE_GRPC_PORT="9001"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "vlcache-serve",
        str(artifact),
        "--host",
        "0.0.0.0",
        "--grpc-port",
        "9001",
        "--http-port",
        "8000",
        "--metrics-port",
        "8002",
        "--instances",
        "2",
    ]


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs /bin/sh")
def test_entrypoint_runs_other_commands_and_refuses_a_missing_artifact(tmp_path: Path, fake_bin: Path):
    done = _entrypoint(["echo", "bench", "here"], fake_bin)
    assert (done.returncode, done.stdout) == (0, "bench here\n")

    missing = _entrypoint([], fake_bin, VLCACHE_ARTIFACT=str(tmp_path / "none"))
    assert missing.returncode == 2
    assert "no artifact in" in missing.stderr and missing.stdout == ""

    built = _entrypoint(
        [], fake_bin, VLCACHE_ARTIFACT=str(tmp_path / "none"), VLCACHE_BUILD_ON_START="1", VLCACHE_BACKEND="tensorrt"
    )
    assert built.returncode == 0, built.stderr
    assert built.stdout.splitlines()[0].split()[:5] == [
        "vlcache-build",
        "--model",
        "llava-tiny",
        "--backend",
        "tensorrt",
    ]
    assert built.stdout.splitlines()[1].startswith(f"vlcache-serve {tmp_path / 'none'} --host 0.0.0.0")


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs /bin/sh")
def test_entrypoint_hands_a_trtllm_artifact_to_tritonserver(tmp_path: Path, fake_bin: Path):
    # TensorRT-LLM's llmapi model is served by tritonserver itself, on the image's address and ports
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "manifest.json").write_text(json.dumps({"build": {"backend": "trtllm"}}))
    done = _entrypoint(["--log-verbose", "1"], fake_bin, VLCACHE_ARTIFACT=str(artifact), VLCACHE_HTTP_PORT="9000")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "tritonserver",
        "--model-repository",
        str(artifact / "triton"),
        "--http-address",
        "0.0.0.0",
        "--grpc-address",
        "0.0.0.0",
        "--metrics-address",
        "0.0.0.0",
        "--http-port",
        "9000",
        "--grpc-port",
        "8001",
        "--metrics-port",
        "8002",
        "--log-verbose",
        "1",
    ]
