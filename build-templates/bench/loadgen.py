"""A small HTTP/1.1 keep-alive load generator (asyncio, raw sockets, so the client costs
little CPU next to the servers it measures)."""

import asyncio
import time

try:
    import uvloop
except ImportError:
    uvloop = None


def build_requests(host, port, path, bodies):
    return [
        (b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
         b"Content-Length: %d\r\n\r\n" % (path.encode(), host.encode(), port, len(b)) + b)
        for b in bodies
    ]


class Conn:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host, port):
        return cls(*await asyncio.open_connection(host, port))

    async def call(self, request):
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = None
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length is None:
            raise RuntimeError("response without Content-Length: %r" % head)
        body = await self.reader.readexactly(length)
        return status, body

    def close(self):
        self.writer.close()


def percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summarize(latencies, errors, elapsed, sent=None):
    lat = sorted(latencies)
    return {"requests": len(lat), "sent": len(lat) if sent is None else sent, "errors": errors,
            "rps": len(lat) / elapsed,
            "p50_ms": percentile(lat, 0.50) * 1e3, "p99_ms": percentile(lat, 0.99) * 1e3}


async def closed_loop(host, port, requests, concurrency, duration, warmup=0.5):
    """`concurrency` connections, each sending its next request when the last one returns."""
    latencies, errors, sent = [], 0, 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop = measure_from + duration

    async def client(k):
        nonlocal errors, sent
        conn = await Conn.open(host, port)
        i = k
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= stop:
                    return
                status, _ = await conn.call(requests[i % len(requests)])
                t1 = time.perf_counter()
                sent += 1
                i += concurrency
                if t0 >= measure_from:
                    if status == 200:
                        latencies.append(t1 - t0)
                    else:
                        errors += 1
        finally:
            conn.close()

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return summarize(latencies, errors, duration, sent)


async def open_loop(host, port, requests, rate, duration, max_conns=512):
    """Requests sent at a fixed rate whatever the server does; latency counts from the
    scheduled send time, so a server that falls behind is charged for the queueing."""
    latencies, errors = [], 0
    idle = []
    opened = 0
    sem = asyncio.Semaphore(max_conns)
    start = time.perf_counter() + 0.05
    total = int(rate * duration)

    async def one(i, scheduled):
        nonlocal errors, opened
        async with sem:
            conn = idle.pop() if idle else None
            if conn is None:
                conn = await Conn.open(host, port)
                opened += 1
            status, _ = await conn.call(requests[i % len(requests)])
            done = time.perf_counter()
            idle.append(conn)
        if status == 200:
            latencies.append(done - scheduled)
        else:
            errors += 1

    tasks = []
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, scheduled)))
    await asyncio.gather(*tasks)
    for c in idle:
        c.close()
    return summarize(latencies, errors, duration)


def run(coro):
    if uvloop is not None:
        return uvloop.run(coro)
    return asyncio.run(coro)
