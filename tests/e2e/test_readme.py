"""The README's "Using it" commands, run as written right after the quick start: a newcomer
copies them into a second terminal of the same checkout while ``chat-service serve`` runs
there, so that is where they must work (they once failed with ``chat-service: command not
found`` and ``No module named 'websockets'``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import EmbeddedServer

REPO = Path(__file__).resolve().parents[2]
BLOCK_TIMEOUT = 60.0


def shell_blocks(section: str) -> list[str]:
    """The ```sh blocks under the README's ``## section`` heading, in order."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start : end if end != -1 else None], re.S)


def new_terminal_env() -> dict[str, str]:
    """A shell as a new terminal has it: no venv on PATH, no CHAT_* settings."""
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CHAT_") and k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
    }
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """A folder like the quick start's checkout (``.venv`` is this run's venv) with the
    service running there on its embedded PostgreSQL; yields it and the service's port."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the README's commands use the quick start's venv: run pytest from a venv")
    for tool in ("curl", "bash"):
        if shutil.which(tool) is None:
            pytest.skip(f"the README's commands need {tool}, which is not installed")
    folder = tmp_path_factory.mktemp("checkout")
    (folder / ".venv").symlink_to(sys.prefix)
    server = EmbeddedServer(folder / "serve.log", cwd=folder)
    server.start()
    try:
        yield folder, server.port
    finally:
        server.stop()


def run_block(block: str, folder: Path, port: int, until: str) -> tuple[int, str]:
    """Run ``block`` in bash as written (the port aside): its exit code and output. Its
    stdin stays open until ``until`` has been printed (the interactive websocket client reads
    it), then closes as a Ctrl-D would."""
    script = block.replace("localhost:8000", f"localhost:{port}")
    proc = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=folder,
        env=new_terminal_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    output: list[str] = []
    seen = threading.Event()

    def read(stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            output.append(line)
            if until in line:
                seen.set()

    reader = threading.Thread(target=read, args=(proc.stdout,), daemon=True)
    reader.start()
    seen.wait(BLOCK_TIMEOUT)
    proc.stdin.close()
    try:
        code = proc.wait(BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    reader.join(5)
    proc.stdout.close()
    return code, "".join(output)


@pytest.mark.slow
def test_using_it_commands_work_as_written_after_the_quick_start(checkout):
    folder, port = checkout
    blocks = shell_blocks("Using it")
    assert blocks, "the README lost its 'Using it' commands"
    started = time.monotonic()
    code, output = run_block(blocks[0], folder, port, until='"type":"ready"')
    print(f"'Using it' ran in {time.monotonic() - started:.1f}s:\n{output}")
    assert code == 0, output
    assert "command not found" not in output and "No module named" not in output, output
    # The POST stored the message, the history page shows it, and the websocket client saw
    # it replayed (since=0) before ready.
    assert output.count('"body":"hello"') >= 3, output
    assert output.index('"type":"message"') < output.index('"type":"ready"'), output
