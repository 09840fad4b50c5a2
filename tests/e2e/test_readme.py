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


def terminal_env(folder: Path, *, activated: bool) -> dict[str, str]:
    """A shell as a new terminal has it (no venv on PATH, no CHAT_* settings), or as the same
    terminal has it once the first block's ``. .venv/bin/activate`` ran there."""
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CHAT_") and k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
    }
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin]
    if activated:
        env["VIRTUAL_ENV"] = str(folder / ".venv")
        path.insert(0, str(folder / ".venv" / "bin"))
    env["PATH"] = os.pathsep.join(path)
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


def run_block(
    block: str, folder: Path, port: int, *, until: str, activated: bool
) -> tuple[int, str]:
    """Run ``block`` in bash as written (the port aside): its exit code and output. Its
    stdin stays open until ``until`` has been printed (the interactive websocket client reads
    it), then closes as a Ctrl-D would."""
    script = block.replace("localhost:8000", f"localhost:{port}")
    proc = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=folder,
        env=terminal_env(folder, activated=activated),
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


EXPECTED = [
    # The POST stored the message, the history page shows it, and the websocket client saw it
    # replayed (since=0) before ready.
    ('"type":"ready"', ['"body":"hello"', '"type":"message"', '"type":"ready"']),
    # service.client: sent, and received back as the room's newest message.
    ("alice: hello from Python", ["1 alice: hello", "alice: hello from Python"]),
]
"""Per ``sh`` block of "Using it", in order: the line that ends its input, and what its output
shows in that order."""


@pytest.mark.slow
def test_using_it_commands_work_as_written_after_the_quick_start(checkout):
    folder, port = checkout
    blocks = shell_blocks("Using it")
    assert len(blocks) == len(EXPECTED), "the README's 'Using it' blocks changed: update EXPECTED"
    for n, (block, (until, shown)) in enumerate(zip(blocks, EXPECTED, strict=True)):
        started = time.monotonic()
        # One terminal: the blocks after the first run where it activated the venv.
        code, output = run_block(block, folder, port, until=until, activated=n > 0)
        print(f"ran in {time.monotonic() - started:.1f}s:\n{output}")
        assert code == 0, output
        assert "command not found" not in output and "No module named" not in output, output
        at = 0
        for text in shown:
            assert text in output[at:], f"{text!r} not after position {at}:\n{output}"
            at = output.index(text, at) + len(text)
