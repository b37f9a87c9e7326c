#!/usr/bin/env python3
"""Throttling, counting TCP relay for benches/load.sh (cache rows).

    relay.py LISTEN_PORT TARGET_PORT STATS_FILE [--rate MBPS] [--delay MS]

Listens on 127.0.0.1:LISTEN_PORT and forwards every connection to 127.0.0.1:TARGET_PORT.

- --rate: the target->client direction of all connections together is limited to MBPS
  megabytes (10^6 bytes) per second, like one shared link (0: no limit).
- --delay: every piece of data, in both directions, is delivered MS milliseconds after it was
  read (like `tc qdisc add dev lo root netem delay MS ms` on loopback: the round trip grows
  by 2 x MS).
- Counting: bytes in each direction, connections, and the HTTP/1.1 requests the client sent
  (method and path, parsed from the client->target stream). On SIGUSR1 (and on exit) the
  running totals are written as JSON to STATS_FILE (atomically: tmp file + rename).

Memory is bounded: each direction of a connection holds at most QUEUE pieces of READ bytes.
"""
import asyncio
import json
import os
import signal
import sys
import time

READ = 128 * 1024
QUEUE = 32  # 4 MiB per direction: > rate x delay at 100 MB/s and 20 ms

stats = {"conns": 0, "bytes_up": 0, "bytes_down": 0, "requests": {}}


class Link:
    """The shared target->client link: a byte is sent only when the link is free."""

    def __init__(self, rate):
        self.rate = rate
        self.next_t = 0.0

    async def take(self, n):
        if not self.rate:
            return
        now = time.monotonic()
        start = max(self.next_t, now - 0.005)  # up to 5 ms of unused link time is a burst
        self.next_t = start + n / self.rate
        wait = self.next_t - now
        if wait > 0:
            await asyncio.sleep(wait)


class RequestParser:
    """Finds request lines in a client->server HTTP/1.1 byte stream (bodies with Content-Length)."""

    def __init__(self):
        self.buf = b""
        self.skip = 0

    def feed(self, data):
        if self.skip:
            n = min(self.skip, len(data))
            self.skip -= n
            data = data[n:]
        self.buf += data
        while not self.skip:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:  # not HTTP/1.1 (or a huge head): stop parsing
                    self.buf = b""
                return
            head = self.buf[:end].decode("latin-1").split("\r\n")
            self.buf = self.buf[end + 4:]
            parts = head[0].split(" ")
            if len(parts) >= 2:
                key = parts[0] + " " + parts[1]
                stats["requests"][key] = stats["requests"].get(key, 0) + 1
            for h in head[1:]:
                k, _, v = h.partition(":")
                if k.strip().lower() == "content-length":
                    try:
                        self.skip = int(v.strip())
                    except ValueError:
                        pass
            if self.skip:
                n = min(self.skip, len(self.buf))
                self.skip -= n
                self.buf = self.buf[n:]


async def pump(reader, writer, delay, link, counter, parser=None):
    q = asyncio.Queue(QUEUE)

    async def read_side():
        try:
            while True:
                data = await reader.read(READ)
                if not data:
                    break
                await q.put((time.monotonic() + delay, data))
        except (ConnectionError, OSError):
            pass
        await q.put(None)

    rt = asyncio.ensure_future(read_side())
    try:
        while True:
            item = await q.get()
            if item is None:
                if writer.can_write_eof():
                    writer.write_eof()
                break
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if link:
                await link.take(len(data))
            if parser:
                parser.feed(data)
            writer.write(data)
            await writer.drain()
            stats[counter] += len(data)
    except (ConnectionError, OSError):
        pass
    finally:
        rt.cancel()


async def handle(creader, cwriter, target, delay, link):
    stats["conns"] += 1
    try:
        treader, twriter = await asyncio.open_connection("127.0.0.1", target)
    except OSError:
        cwriter.close()
        return
    up = asyncio.ensure_future(pump(creader, twriter, delay, None, "bytes_up", RequestParser()))
    down = asyncio.ensure_future(pump(treader, cwriter, delay, link, "bytes_down"))
    # one side ending (EOF passed on) does not end the other; a reset ends both
    await asyncio.wait([up, down], return_when=asyncio.ALL_COMPLETED)
    for w in (cwriter, twriter):
        w.close()


def dump(path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, path)


async def main():
    args = sys.argv[1:]
    rate = delay = 0.0
    pos = []
    while args:
        a = args.pop(0)
        if a == "--rate":
            rate = float(args.pop(0)) * 1e6
        elif a == "--delay":
            delay = float(args.pop(0)) / 1000
        else:
            pos.append(a)
    listen, target, path = int(pos[0]), int(pos[1]), pos[2]
    link = Link(rate)
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, target, delay, link), "127.0.0.1", listen, backlog=1024
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, dump, path)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    dump(path)
    print(f"relay 127.0.0.1:{listen} -> 127.0.0.1:{target} rate={rate / 1e6:g} MB/s delay={delay * 1000:g} ms", flush=True)
    async with server:
        await stop.wait()
    dump(path)


if __name__ == "__main__":
    asyncio.run(main())
