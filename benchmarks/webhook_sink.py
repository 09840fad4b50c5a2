"""A webhook receiver for the benchmarks: answers every POST 200 after ``--delay`` seconds, as
a slow app backend would (``bench --webhook-delay``), and a GET at once (the harness's health
check). Its own process, so its work is not the load generator's. Prints the POSTs it answered
at SIGTERM; HTTP/1.1 keep-alive, ``Content-Length`` bodies only (what the service sends).

    python -m benchmarks.webhook_sink --delay 2 --port 8090
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

MAX_HEAD = 64 * 1024


class Sink:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.answered = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # CancelledError: the run ends with requests still waiting; nothing to report.
        with contextlib.suppress(
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
            asyncio.CancelledError,
        ):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if len(head) > MAX_HEAD:
                    break
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                post = head.startswith(b"POST ")
                if post:
                    await asyncio.sleep(self.delay)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
                self.answered += post
        writer.close()


async def main(delay: float, port: int) -> None:
    sink = Sink(delay)
    server = await asyncio.start_server(sink.serve, "127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    print(f"answered {sink.answered} POSTs", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", type=float, default=2.0, help="seconds before each answer")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(main(args.delay, args.port))
