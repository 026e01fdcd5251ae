"""Model distribution at scale: N nodes pulling one model from the model store at once, against nginx.

The edgeloop store (`edgeloop-runtime store`, one process) and Debian's nginx (started by this script, with
sendfile, serving the very same files from the same directory) each serve one blob to N concurrent clients
on loopback, N = 10, 100, 500, in interleaved runs. Installs nginx with apt when it is missing (root).

    .venv/bin/python bench/store_fanout.py [--size-mb 100] [--clients 10,100,500] [--repeat 3]

The clients are what a node's fetch does on the wire (one GET, the body read to its end) without writing
the body to disk: N real `fetch` processes would each write 100 MB to this machine's one disk and measure
that disk. They run as 2 processes of N/2 threads, started together. For each server and N it prints the
aggregate throughput (bytes delivered / time until the last client finished; median run), p50 and p99 of
the clients' times to complete, the server's CPU seconds (user + system, all its processes) and CPU per GB,
and its peak RSS. Then:

- the store's throughput against nginx's at N = 100 (target ≥ 0.80);
- the store's peak RSS across N (target: flat, no per-client buffering of the blob);
- the real `edgeloop_runtime.fetch.fetch` through a proxy that cuts the first download at 50%: how much of
  the blob the resumed download transfers to finish (target ≤ 55%).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "runtime-image"))

from edgeloop_runtime.fetch import fetch  # noqa: E402

TOKEN = "bench-token"
CLIENT_PROCESSES = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.05)


# --- servers --------------------------------------------------------------------------------------------------


def nginx_binary() -> str:
    """nginx, installed from Debian's archive with apt if missing (its service is kept from starting)."""
    found = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("nginx is not installed and installing it needs root: apt-get install nginx-light")
    print("installing nginx-light with apt ...", flush=True)
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:  # Debian's maintainer scripts would start nginx on port 80: policy-rc.d 101 forbids it
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx-light"], check=True, env=env
        )
    finally:
        if ours:
            policy.unlink()
    return "/usr/sbin/nginx"


def start_nginx(work: Path, root: Path, port: int) -> subprocess.Popen:
    conf = work / "nginx.conf"
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(f"""{user}
worker_processes auto;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {work}/nginx-tmp;
    proxy_temp_path {work}/nginx-tmp;
    fastcgi_temp_path {work}/nginx-tmp;
    uwsgi_temp_path {work}/nginx-tmp;
    scgi_temp_path {work}/nginx-tmp;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {root};
    }}
}}
""")
    proc = subprocess.Popen([nginx_binary(), "-c", str(conf), "-p", str(work)], stderr=subprocess.DEVNULL)
    wait_port(port, proc, "nginx")
    end = time.monotonic() + 10
    while len(processes_of(proc.pid)) < 1 + os.cpu_count() and time.monotonic() < end:  # workers: auto
        time.sleep(0.05)
    return proc


def start_store(work: Path, root: Path, port: int) -> subprocess.Popen:
    token = work / "token"
    token.write_text(TOKEN)
    command = [sys.executable, "-m", "edgeloop_runtime.cli", "store", "--root", str(root), "--host", "127.0.0.1",
               "--port", str(port), "--token-file", str(token)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "runtime-image")}
    proc = subprocess.Popen(command, stderr=subprocess.DEVNULL, env=env)
    wait_port(port, proc, "the store")
    return proc


def processes_of(pid: int) -> list[int]:
    """`pid` and its children (nginx's workers)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return [pid, *children]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            pass
    return total / 1024


# --- clients --------------------------------------------------------------------------------------------------


def _one_client(port: int, path: str, start_at: float, timeout: float, out: list) -> None:
    begin = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed in the headers")
                head += chunk
            head, rest = head.split(b"\r\n\r\n", 1)
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
            )
            got, buffer = len(rest), bytearray(1 << 18)
            while got < length:
                n = sock.recv_into(buffer)
                if not n:
                    raise ConnectionError(f"closed after {got} of {length} bytes")
                got += n
        out.append((time.monotonic() - start_at, got, time.monotonic() - begin))
    except OSError as error:
        out.append((None, 0, str(error)))


def _client_process(port: int, path: str, n: int, start_at: float, timeout: float, queue) -> None:
    out: list = []
    time.sleep(max(0.0, start_at - time.monotonic()))
    threads = [threading.Thread(target=_one_client, args=(port, path, start_at, timeout, out)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put(out)


def fan_out(port: int, path: str, n: int, server_pids: list[int], timeout: float) -> dict:
    """N clients at once; their times to complete, the aggregate throughput and the server's cost."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    start_at = time.monotonic() + 0.5
    shares = [n // CLIENT_PROCESSES + (i < n % CLIENT_PROCESSES) for i in range(CLIENT_PROCESSES)]
    workers = [context.Process(target=_client_process, args=(port, path, k, start_at, timeout, queue)) for k in shares]
    for w in workers:
        w.start()
    cpu_before, peak = cpu_seconds(server_pids), 0.0
    results: list = []
    while len(results) < n:
        try:
            results += queue.get(timeout=0.05)
        except Exception:  # queue.Empty: sample the server meanwhile
            peak = max(peak, rss_mb(server_pids))
            if not any(w.is_alive() for w in workers) and queue.empty():
                break
    for w in workers:
        w.join(timeout)
    cpu = cpu_seconds(server_pids) - cpu_before
    done = [r for r in results if r[0] is not None]
    failed = [r[2] for r in results if r[0] is None]
    times = sorted(r[0] for r in done)
    total = sum(r[1] for r in done)
    wall = max(times) if times else float("nan")
    return {
        "n": n,
        "failed": len(failed) + (n - len(results)),
        "errors": failed[:3],
        "throughput": total / wall / 1e9 if times else 0.0,
        "p50": statistics.median(times) if times else float("nan"),
        "p99": times[min(len(times) - 1, int(0.99 * len(times)))] if times else float("nan"),
        "cpu": cpu,
        "cpu_per_gb": cpu / (total / 1e9) if total else float("nan"),
        "rss": peak,
    }


# --- resume ---------------------------------------------------------------------------------------------------


class CuttingProxy:
    """Forwards to the store; cuts the first response after `cut` bytes; counts the bytes of every response."""

    def __init__(self, upstream: int, cut: int):
        self.upstream, self.cut = upstream, cut
        self.sent: list[int] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            index = len(self.sent)
            self.sent.append(0)
            threading.Thread(target=self._serve, args=(client, index), daemon=True).start()

    def _serve(self, client: socket.socket, index: int):
        with client, socket.create_connection(("127.0.0.1", self.upstream)) as upstream:
            client.settimeout(30)
            request = client.recv(65536)
            upstream.sendall(request)
            limit = self.cut if index == 0 else None
            while chunk := upstream.recv(1 << 18):
                if limit is not None and self.sent[index] + len(chunk) >= limit:
                    client.sendall(chunk[: limit - self.sent[index]])
                    self.sent[index] = limit
                    client.shutdown(socket.SHUT_RDWR)
                    return
                client.sendall(chunk)
                self.sent[index] += len(chunk)

    def close(self):
        self.listener.close()


def resume_check(store_port: int, sha: str, size: int, work: Path) -> dict:
    proxy = CuttingProxy(store_port, cut=size // 2)
    try:
        fetch(f"http://127.0.0.1:{proxy.port}/sha256/{sha}", sha, work / "fetch-cache", backoff=0.1, jitter=0)
    finally:
        proxy.close()
    return {"attempts": len(proxy.sent), "first": proxy.sent[0], "rest": sum(proxy.sent[1:])}


# --- main -----------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--clients", default="10,100,500")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per server and N (median)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per client, seconds")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]

    work = Path(tempfile.mkdtemp(prefix="store-fanout-"))
    work.chmod(0o755)
    (work / "nginx-tmp").mkdir()
    root = work / "store"
    (root / "sha256").mkdir(parents=True)
    size = args.size_mb * 1_000_000
    data = os.urandom(size)
    sha = hashlib.sha256(data).hexdigest()
    (root / "sha256" / sha).write_bytes(data)
    (root / "sha256" / sha).chmod(0o444)
    del data
    path = f"/sha256/{sha}"

    store_port, nginx_port = free_port(), free_port()
    store = start_store(work, root, store_port)
    nginx = start_nginx(work, root, nginx_port)
    servers = {"store": (store_port, [store.pid]), "nginx": (nginx_port, processes_of(nginx.pid))}
    print(f"blob: {size / 1e6:.0f} MB; clients: {CLIENT_PROCESSES} processes; nginx {nginx_binary()}, "
          f"worker processes {len(servers['nginx'][1]) - 1}; store: one process", flush=True)  # fmt: skip
    results: dict[tuple[str, int], list[dict]] = {}
    try:
        for name in servers:  # warm the page cache and both servers
            fan_out(servers[name][0], path, 2, servers[name][1], args.timeout)
        for n in counts:
            for _ in range(args.repeat):
                for name, (port, pids) in servers.items():
                    results.setdefault((name, n), []).append(fan_out(port, path, n, pids, args.timeout))
        resumed = resume_check(store_port, sha, size, work)
    finally:
        for proc in (store, nginx):
            proc.send_signal(signal.SIGTERM if proc is store else signal.SIGQUIT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'N':>4} {'server':6} {'GB/s':>6} {'p50 s':>7} {'p99 s':>7} {'CPU s':>6} {'CPU s/GB':>8} "
          f"{'peak RSS MB':>11} {'failed':>6}")  # fmt: skip
    median = {}
    for (name, n), runs in results.items():
        best = sorted(runs, key=lambda r: r["throughput"])[len(runs) // 2]
        median[name, n] = best
        print(f"{n:>4} {name:6} {best['throughput']:6.2f} {best['p50']:7.2f} {best['p99']:7.2f} {best['cpu']:6.1f} "
              f"{best['cpu_per_gb']:8.3f} {max(r['rss'] for r in runs):11.1f} {sum(r['failed'] for r in runs):>6}"
              + (f"  {runs[0]['errors']}" if runs[0]["errors"] else ""))  # fmt: skip

    print()
    if 100 in counts:
        ratio = median["store", 100]["throughput"] / median["nginx", 100]["throughput"]
        print(f"store / nginx aggregate throughput at N=100: {ratio:.2f} (target >= 0.80: "
              f"{'met' if ratio >= 0.8 else f'missed by {0.8 - ratio:.2f}'})")  # fmt: skip
        cpu = median["store", 100]["cpu_per_gb"] / median["nginx", 100]["cpu_per_gb"]
        print(f"store / nginx CPU seconds per GB served at N=100: {cpu:.2f}")
    rss = {n: max(r["rss"] for r in results["store", n]) for n in counts}
    print("store peak RSS by N: " + ", ".join(f"N={n}: {v:.1f} MB" for n, v in rss.items())
          + f" (largest / smallest: {max(rss.values()) / min(rss.values()):.2f}; target: flat)")  # fmt: skip
    share = resumed["rest"] / size
    print(f"a fetch cut at 50% ({resumed['first'] / size:.1%} delivered) transferred {share:.1%} of the blob "
          f"to finish in {resumed['attempts'] - 1} more attempt(s) (target <= 55%: "
          f"{'met' if share <= 0.55 else 'missed'})")  # fmt: skip
    failed = sum(r["failed"] for runs in results.values() for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
