"""Serve latency: the Videos API on Ray Serve vs calling the generator in-process, on random-init configs.

For each `--config` (default tiny and small, CPU):
  direct      `TextToVideo.generate` in this process, one job at a time (`--repeats` jobs): latency p50/p95
  serve x1    one client: POST /v1/videos, poll GET every 50 ms until completed: latency p50/p95
              -> Serve overhead = serve p50 - direct p50 (HTTP, job store, text encoder hop, streaming progress,
                 mp4 + thumbnail + spritesheet encode and write, polling granularity)
  serve xC    `--clients` clients submitting back to back for `--duration` s: throughput (completed jobs/s),
              latency p50/p95, refused (429/503) count
  each Serve measurement once per `--max-batch-size` (default 1 and 4): 1 runs every job in its own sampler call,
  4 lets up to 4 queued compatible jobs share one (the ingress batches what waits in the job store)
Everything for one config runs in one Ray/Serve instance started here, so the numbers sit side by side.

    python benchmarks/serve_latency.py                                   # tiny + small, 20 steps, CPU
    python benchmarks/serve_latency.py --config base --device cuda       # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct(config: str, steps: int, repeats: int, device: str) -> list[float]:
    from lumiere.config import load_config
    from lumiere.pipeline import TextToVideo

    gen = TextToVideo.random_init(load_config(config), device=device)
    gen.generate(["warm up"], steps=steps, seed=0)
    out = []
    for i in range(repeats):
        t = time.perf_counter()
        gen.generate([f"a red square moving right {i}"], steps=steps, seed=i)
        out.append(time.perf_counter() - t)
    return out


def one_job(http, steps: int, i: int) -> tuple[float, str]:
    t = time.perf_counter()
    r = http.post("/v1/videos", json={"prompt": f"a red square moving right {i}", "seed": i,
                                      "num_inference_steps": steps})
    if r.status_code != 200:
        return time.perf_counter() - t, str(r.status_code)
    vid = r.json()["id"]
    while True:
        v = http.get(f"/v1/videos/{vid}").json()
        if v["status"] in ("completed", "failed"):
            return time.perf_counter() - t, v["status"]
        time.sleep(0.05)


def serve_runs(config: str, steps: int, repeats: int, clients: int, duration: float, device: str,
               max_batch_size: int = 4) -> dict:
    import httpx
    import ray
    from ray import serve

    from serve.app import build_app

    data = tempfile.mkdtemp(dir="/tmp", prefix="lbench")
    port = free_port()
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"random_init": config, "data_dir": data, "no_auth": True, "device": device,
                         "max_pending_jobs": 4 * clients, "max_active_jobs_per_tenant": 4 * clients,
                         "max_steps": 1000, "max_batch_size": max_batch_size,
                         "deployments": {"Generator": {"autoscaling_config": {"min_replicas": 1,
                                                                              "max_replicas": 1}}}}),
              name="lumiere", route_prefix="/")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
    one_job(http, steps, -1)  # warm up every deployment
    single = [one_job(http, steps, i) for i in range(repeats)]
    latencies, refused, statuses = [], 0, []
    lock = threading.Lock()
    stop = time.perf_counter() + duration

    def client(c: int):
        nonlocal refused
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as h:
            i = 0
            while time.perf_counter() < stop:
                lat, status = one_job(h, steps, 10_000 * c + i)
                i += 1
                with lock:
                    if status in ("429", "503"):
                        refused += 1
                    else:
                        statuses.append(status)
                        latencies.append(lat)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    serve.shutdown()
    return {"single": [s[0] for s in single], "single_ok": all(s[1] == "completed" for s in single),
            "load": latencies, "completed": statuses.count("completed"), "failed": len(statuses) - statuses.count(
                "completed"), "refused": refused, "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help="tiny, small, base (repeatable; default tiny and small)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch-size", type=int, action="append", help="repeatable; default 1 and 4")
    a = p.parse_args()
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    print(f"# serve_latency: {' '.join(sys.argv[1:]) or '(defaults)'}; {platform.node()} "
          f"{os.cpu_count()} CPUs, {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    rows = []
    for config in a.config or ["tiny", "small"]:
        d = direct(config, a.steps, a.repeats, a.device)
        for mb in a.max_batch_size or [1, 4]:
            s = serve_runs(config, a.steps, a.repeats, a.clients, a.duration, a.device, mb)
            rows.append((config, mb, d, s))
            print(f"{config} batch<={mb}: direct p50 {pct(d, .5):.3f}s | serve x1 p50 {pct(s['single'], .5):.3f}s "
                  f"p95 {pct(s['single'], .95):.3f}s | load x{a.clients}: {s['completed']} completed in "
                  f"{s['wall']:.1f}s, refused {s['refused']}, failed {s['failed']}", flush=True)
    print()
    print(f"| config | max batch | direct p50 / p95 (s) | Serve, 1 client p50 / p95 (s) | Serve overhead p50 | "
          f"{a.clients} clients: jobs/s | {a.clients} clients p50 / p95 (s) | refused / failed |")
    print("|---|---|---|---|---|---|---|---|")
    for config, mb, d, s in rows:
        overhead = pct(s["single"], .5) - pct(d, .5)
        print(f"| {config} | {mb} | {pct(d, .5):.3f} / {pct(d, .95):.3f} | {pct(s['single'], .5):.3f} / "
              f"{pct(s['single'], .95):.3f} | +{overhead:.3f} s ({pct(s['single'], .5) / pct(d, .5):.2f}×) | "
              f"{s['completed'] / s['wall']:.2f} | {pct(s['load'], .5):.2f} / {pct(s['load'], .95):.2f} | "
              f"{s['refused']} / {s['failed']} |")


if __name__ == "__main__":
    main()
