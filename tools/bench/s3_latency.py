"""Reading from S3 with a real bucket's latency: the loopback server behind a delaying proxy.

    .venv-bench/bin/python -m tools.bench.s3_latency [--delay-ms 0,20] [--task tokens]

The loopback S3 server (``rclone serve s3``, as the test suite starts it) answers in well under a
millisecond, so it cannot show what a real bucket's 10-50 ms to first byte does to many small
requests. Here every connection goes through a TCP proxy (`LatencyProxy`) that holds each chunk
of the server's answer for ``--delay-ms`` before passing it on (in order; requests go through at
once): each request then costs one more delay, while a large body still streams at full speed.

One pass per row, each in this process with a fresh node cache, over the stream benchmark's
corpus (``python -m tools.bench.stream --mb 300`` prepares it under ``.bench/stream``), no
DataLoader workers:

- raw GET: every shard object read whole, one after the other (``fs.cat_file``);
- whole shards: ``ShardDataset(shuffle_unit="shard")``, shards fetched into the node cache;
- blocks: ``ShardDataset(shuffle_unit="block")`` (each block by a ranged GET), ``range_requests``
  of 8 (the default) and 32; then again with windows of ``--small-window-mib`` (4 MiB): the
  300 MB corpus fits in 2 default windows, so its blocks are listed with their neighbours and
  share GETs, which a corpus many times its window does not.

Columns: seconds for the epoch, MB/s of stored bytes, the first sample's latency, and the
ranged GETs the pass made.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import threading
import time
from pathlib import Path

from tools.bench.harness import ROOT


class LatencyProxy:
    """A loopback TCP proxy that delays every chunk coming back from ``upstream`` by ``delay_s``.

    Args:
        upstream_port: The server's port on 127.0.0.1.
        delay_s: How long each chunk of an answer is held (one added delay per request).
    """

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def __enter__(self) -> LatencyProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        with contextlib.suppress(asyncio.CancelledError):  # the proxy closing
            await asyncio.gather(
                self._pipe(client_r, server_w, 0.0), self._pipe(server_r, client_w, self.delay_s)
            )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=1024)

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while data := await reader.read(1 << 16):
                await queue.put((self._loop.time() + delay_s, data))
        except (ConnectionError, OSError):
            pass
        await queue.put((0.0, b""))
        with contextlib.suppress(ConnectionError, OSError):
            await sender
            writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", default="0,20", help="comma-separated added delays")
    parser.add_argument("--task", default="tokens", choices=("text", "tokens"))
    parser.add_argument("--corpus", default=str(ROOT / ".bench/stream/corpus-300mb-0/s3"))
    parser.add_argument(
        "--small-window-mib",
        type=int,
        default=4,
        help="window of the last rows: the corpus then reads as one many times its window does",
    )
    args = parser.parse_args()

    import fsspec

    from shardloader import ShardDataset, StreamConfig
    from shardloader.testing import S3Server

    server = S3Server(data_dir=Path(args.corpus)).start()
    url = f"s3://bench/shardloader-{args.task}"
    print(
        "| delay | pass | s | MB/s stored | first sample s | ranged GETs |\n"
        "|---|---|---|---|---|---|"
    )
    try:
        for delay_ms in [float(d) for d in args.delay_ms.split(",")]:
            with LatencyProxy(server.port, delay_ms / 1000) as proxy:
                opts = dict(server.storage_options)
                opts["client_kwargs"] = {
                    **opts["client_kwargs"],
                    "endpoint_url": f"http://127.0.0.1:{proxy.port}",
                }
                fs = fsspec.filesystem("s3", skip_instance_cache=True, **opts)
                files = [f for f in fs.ls(url) if f.endswith(".arrow")]
                start = time.perf_counter()
                stored = sum(len(fs.cat_file(f)) for f in files)
                raw_s = time.perf_counter() - start
                print(
                    f"| {delay_ms:g} ms | raw GET, one object at a time | {raw_s:.2f} | "
                    f"{stored / 1e6 / raw_s:.0f} | - | - |",
                    flush=True,
                )
                passes: list[tuple[str, dict[str, int | str]]] = [
                    ("whole shards", {"shuffle_unit": "shard"})
                ]
                passes += [
                    (f"blocks, {n} in flight", {"shuffle_unit": "block", "range_requests": n})
                    for n in (8, 32)
                ]
                small = args.small_window_mib << 20
                passes += [
                    (
                        f"blocks, {n} in flight, {args.small_window_mib} MiB windows",
                        {"shuffle_unit": "block", "range_requests": n, "shuffle_bytes": small},
                    )
                    for n in (8, 32)
                ]
                # Warm-up: imports, the first client, the manifest.
                with tempfile.TemporaryDirectory(prefix="shardloader-lat-") as cache:
                    warm = StreamConfig(seed=0, cache_dir=cache, shuffle_unit="shard")
                    next(iter(ShardDataset(url, config=warm, storage_options=opts)))
                for name, settings in passes:
                    with tempfile.TemporaryDirectory(prefix="shardloader-lat-") as cache:
                        config = StreamConfig(seed=0, cache_dir=cache, **settings)
                        dataset = ShardDataset(url, config=config, storage_options=opts)
                        start = time.perf_counter()
                        first = None
                        for _ in dataset:
                            if first is None:
                                first = time.perf_counter() - start
                        seconds = time.perf_counter() - start
                        gets = int(dataset.fetch_counters().get("range_reads", 0))
                        dataset.close()
                    print(
                        f"| {delay_ms:g} ms | {name} | {seconds:.2f} | "
                        f"{stored / 1e6 / seconds:.0f} | {first:.2f} | {gets} |",
                        flush=True,
                    )
    finally:
        server.close()


if __name__ == "__main__":
    main()
