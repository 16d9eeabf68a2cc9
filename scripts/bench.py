"""`make bench`: the bridge against in-process infinity and against infinity's REST server.

Three ways to get the same embeddings, measured side by side in one run, in
alternating order, repeated:

  A  in-process infinity inside infinity_env (the ceiling; scripts/bench_inprocess.py)
  B  the bridge, called from main_env (this process)
  C  infinity's own REST server (`infinity_emb v2`, infinity_env), called over
     HTTP from main_env, with JSON floats and with base64

Workloads: single-sentence latency (sequential), throughput (many requests in
flight at once), and a large reply (1024 x 1792 float32 from the Conan-shaped
model). Writes docs/benchmarks.md and docs/benchmarks.png.

    main_env/.venv/bin/python scripts/bench.py [--device cuda --large-model conan-large] [--repeat 3] ...
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bridge import BatchedInference, bundled_model_path  # noqa: E402
from bridge._supervisor import find_worker_python  # noqa: E402

SIDES = ("A", "B", "C-float", "C-base64")
SIDE_NAMES = {
    "A": "A: in-process infinity",
    "B": "B: bridge (main_env -> worker)",
    "C-float": "C: REST, JSON floats",
    "C-base64": "C: REST, base64",
}


def texts_for(count: int, seed: int, words: tuple[int, int] = (8, 40)) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "market",
        "rises",
        "engineers",
        "ship",
        "vectors",
        "through",
        "sockets",
        "while",
        "models",
        "embed",
        "sentences",
        "about",
        "cats",
        "weather",
        "python",
        "向量",
        "检索",
        "模型",
        "今天",
        "天气",
    ]
    return [" ".join(rng.choice(vocab, size=int(rng.integers(*words)))) for _ in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


# ---------------------------------------------------------------------- sides


class InProcess:
    """Side A: a long-lived infinity_env process that runs the workloads itself."""

    def __init__(self, models: list[dict[str, str]], batch_size: int) -> None:
        # Its logs go to a file, so that a death can be explained.
        self.log_path = REPO / ".bench_models" / "inprocess.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(find_worker_python()), str(REPO / "scripts" / "bench_inprocess.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=worker_env(),
        )
        self.ask({"cmd": "load", "models": models, "batch_size": batch_size})

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the in-process runner died; the end of {self.log_path}:\n{tail}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def latency(self, model: int, texts: list[str]) -> list[float]:
        seconds: list[float] = self.ask({"cmd": "latency", "model": model, "texts": texts})[
            "seconds"
        ]
        return seconds

    def throughput(self, model: int, requests: list[list[str]]) -> tuple[float, int]:
        answer = self.ask({"cmd": "throughput", "model": model, "requests": requests})
        return float(answer["seconds"]), int(answer["dim"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask({"cmd": "quit"})
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Bridge:
    """Side B: this process, through bridge.BatchedInference."""

    def __init__(
        self, model_ids: list[str], engines: list[str], device: str, dtype: str, batch_size: int
    ) -> None:
        self.client = BatchedInference(
            model_id=model_ids,
            engine=engines,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            max_inflight_items=1 << 20,
        )

    def latency(self, model: int, texts: list[str]) -> list[float]:
        seconds = []
        for text in texts:
            started = time.perf_counter()
            self.client.embed(sentences=[text], model_id=model).result()
            seconds.append(time.perf_counter() - started)
        return seconds

    def throughput(self, model: int, requests: list[list[str]]) -> tuple[float, int]:
        started = time.perf_counter()
        futures = [self.client.embed(sentences=r, model_id=model) for r in requests]
        results = [f.result() for f in futures]
        return time.perf_counter() - started, int(results[0][0][0].shape[0])

    def close(self) -> None:
        self.client.stop()


class Rest:
    """Side C: `infinity_emb v2` in infinity_env, over HTTP/1.1 keep-alive connections."""

    def __init__(
        self, model_ids: list[str], engines: list[str], device: str, dtype: str, batch_size: int
    ) -> None:
        self.port = free_port()
        command = [str(find_worker_python().parent / "infinity_emb"), "v2"]
        for model_id, engine in zip(model_ids, engines, strict=True):
            command += ["--model-id", model_id, "--engine", engine]
        command += [
            "--device",
            device,
            "--dtype",
            dtype,
            "--no-bettertransformer",
            # The server's default: its warm-up times the model and sets
            # infinity's batch_delay from it, as the bridge's worker does.
            "--model-warmup",
            "--lengths-via-tokenize",
            "--batch-size",
            str(batch_size),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.log = open(REPO / ".bench_models" / "rest-server.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=worker_env()
        )
        self.names = ["/".join(m.split("/")[-2:]) for m in model_ids]
        self.local = threading.local()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"infinity_emb v2 exited during start-up; see {self.log.name}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/models")
                if connection.getresponse().status == 200:
                    connection.close()
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("infinity_emb v2 did not start")

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
            self.local.connection = connection
        return connection

    def _post(self, body: str) -> tuple[int, bytes]:
        for attempt in (1, 2):
            connection = self._connection()
            try:
                connection.request(
                    "POST", "/embeddings", body=body, headers={"Content-Type": "application/json"}
                )
                response = connection.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, ConnectionError):
                # uvicorn closes keep-alive connections idle for 5 s; like any
                # pooled HTTP client, reconnect once and resend.
                connection.close()
                self.local.connection = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def embed(self, model: int, texts: list[str], encoding: str) -> list[np.ndarray[Any, Any]]:
        body = json.dumps({"model": self.names[model], "input": texts, "encoding_format": encoding})
        status, raw = self._post(body)
        payload = json.loads(raw)
        if status != 200:
            raise RuntimeError(f"REST error {status}: {payload}")
        if encoding == "base64":
            return [
                np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
                for item in payload["data"]
            ]
        return [np.asarray(item["embedding"], dtype=np.float32) for item in payload["data"]]

    def using(self, encoding: str, pool: ThreadPoolExecutor) -> RestSide:
        return RestSide(self, encoding, pool)

    def close(self) -> None:
        self.log.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass(frozen=True)
class RestSide:
    """Side C with one encoding (JSON floats or base64), shaped like A and B."""

    rest: Rest
    encoding: str
    pool: ThreadPoolExecutor

    def latency(self, model: int, texts: list[str]) -> list[float]:
        seconds = []
        for text in texts:
            started = time.perf_counter()
            self.rest.embed(model, [text], self.encoding)
            seconds.append(time.perf_counter() - started)
        return seconds

    def throughput(self, model: int, requests: list[list[str]]) -> tuple[float, int]:
        started = time.perf_counter()
        results = list(self.pool.map(lambda r: self.rest.embed(model, r, self.encoding), requests))
        return time.perf_counter() - started, int(results[0][0].shape[0])


# ---------------------------------------------------------------------- report


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def versions() -> dict[str, str]:
    python = find_worker_python()
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import json, numpy, torch, infinity_emb, transformers; print(json.dumps("
            "{'numpy': numpy.__version__, 'torch': torch.__version__, 'infinity_emb': infinity_emb.__version__,"
            " 'transformers': transformers.__version__, 'cuda': torch.cuda.get_device_name() if torch.cuda.is_available() else ''}))",
        ],
        capture_output=True,
        text=True,
        env=worker_env(),
        check=False,
    )
    found: dict[str, str] = json.loads(probe.stdout) if probe.returncode == 0 else {}
    return found


NULL_MODEL = "debug/null-model"  # infinity's debugengine: no model compute, transport cost only


@dataclass(frozen=True)
class Workload:
    """One measurement: sequential single requests ("seq"), all requests in flight at once
    ("burst"), or the same burst five times in a row, median taken ("single")."""

    name: str
    model: int
    kind: str
    requests: list[list[str]]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="minilm",
        help="model for latency/throughput: 'minilm' (bundled) or a path",
    )
    parser.add_argument(
        "--large-model",
        default="conan",
        help="model for the large reply: 'conan' (tiny Conan-shaped), 'conan-large' (BERT-large "
        "Conan shape, for GPUs) or a path",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--repeat", type=int, default=3, help="alternating repetitions of every side"
    )
    parser.add_argument(
        "--latency-n", type=int, default=100, help="sequential single-sentence requests"
    )
    parser.add_argument(
        "--requests", type=int, default=64, help="concurrent requests in the throughput test"
    )
    parser.add_argument(
        "--sentences", type=int, default=32, help="sentences per throughput request"
    )
    parser.add_argument("--large-rows", type=int, default=1024, help="rows of the large reply")
    parser.add_argument(
        "--overhead-n",
        type=int,
        default=300,
        help="sequential requests to the null model (transport cost alone)",
    )
    parser.add_argument(
        "--overhead-burst",
        type=int,
        default=1000,
        help="single-sentence requests in flight at once, to the null model",
    )
    parser.add_argument(
        "--http-connections", type=int, default=16, help="client connections to the REST server"
    )
    parser.add_argument("--no-rest", action="store_true", help="skip side C")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--title", default="", help="heading for this run (e.g. the card's name)")
    parser.add_argument(
        "--append", action="store_true", help="append to --out instead of replacing it"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    model = bundled_model_path() if args.model == "minilm" else args.model
    large_model = args.large_model
    if large_model in ("conan", "conan-large"):
        cache = REPO / ".bench_models"
        if not (cache / large_model / "config.json").exists():
            print(f"building the {large_model} model in {cache} ...", flush=True)
            subprocess.run(
                [
                    str(find_worker_python()),
                    str(REPO / "scripts" / "tiny_models.py"),
                    str(cache),
                    large_model,
                ],
                check=True,
                env=worker_env(),
                stdout=subprocess.DEVNULL,
            )
        large_model = str(cache / large_model)
    (REPO / ".bench_models").mkdir(exist_ok=True)
    # One engine per distinct model: infinity refuses two engines under one
    # served name (the GPU check uses the same model for every workload).
    model_ids = list(dict.fromkeys([model, large_model, NULL_MODEL]))
    engines = ["debugengine" if m == NULL_MODEL else "torch" for m in model_ids]
    small, large, null = (model_ids.index(m) for m in (model, large_model, NULL_MODEL))

    sides = [s for s in SIDES if not (args.no_rest and s.startswith("C"))]
    workloads = [
        Workload("latency", small, "seq", [[t] for t in texts_for(args.latency_n, seed=1)]),
        Workload(
            "throughput",
            small,
            "burst",
            [texts_for(args.sentences, seed=100 + i) for i in range(args.requests)],
        ),
        # One 1024-row request at a time, five times: the median is the sample.
        Workload("large", large, "single", [texts_for(args.large_rows, seed=7, words=(4, 12))]),
        Workload(
            "overhead latency", null, "seq", [[t] for t in texts_for(args.overhead_n, seed=2)]
        ),
        Workload(
            "overhead burst", null, "burst", [[t] for t in texts_for(args.overhead_burst, seed=3)]
        ),
    ]

    print(
        "starting A (in-process), B (bridge)" + ("" if args.no_rest else ", C (REST)") + " ...",
        flush=True,
    )
    started = time.perf_counter()
    a = InProcess(
        [
            {"model_id": m, "engine": e, "device": args.device, "dtype": args.dtype}
            for m, e in zip(model_ids, engines, strict=True)
        ],
        args.batch_size,
    )
    b = Bridge(model_ids, engines, args.device, args.dtype, args.batch_size)
    c = None if args.no_rest else Rest(model_ids, engines, args.device, args.dtype, args.batch_size)
    pool = ThreadPoolExecutor(args.http_connections)
    print(f"all sides ready in {time.perf_counter() - started:.0f} s", flush=True)

    def run(side: str, work: Workload, warm_up: bool = False) -> Any:
        requests = work.requests[:5] if warm_up and work.kind == "seq" else work.requests
        if side == "A":
            target: Any = a
        elif side == "B":
            target = b
        else:
            assert c is not None
            target = c.using(side.split("-")[1], pool)
        if work.kind == "seq":
            return target.latency(work.model, [r[0] for r in requests])
        if work.kind == "single":
            runs = [target.throughput(work.model, requests) for _ in range(1 if warm_up else 5)]
            return statistics.median(s for s, _ in runs), runs[0][1]
        return target.throughput(work.model, requests)

    # Warm every path once (first calls pay for lazy initialisation).
    for side in sides:
        for work in workloads:
            run(side, work, warm_up=True)

    samples: dict[tuple[str, str], list[Any]] = {}
    progress = tqdm(total=args.repeat * len(sides) * len(workloads), desc="bench", unit="run")
    try:
        for rep in range(args.repeat):
            order = (
                sides[rep % len(sides) :] + sides[: rep % len(sides)]
            )  # rotate: no side always first
            for work in workloads:
                for side in order:
                    samples.setdefault((side, work.name), []).append(run(side, work))
                    progress.update()
    finally:
        progress.close()
        pool.shutdown()
        a.close()
        b.close()
        if c is not None:
            c.close()

    report = summarise(samples, sides, args, workloads)
    write_report(report, args, versions())
    return 0


def summarise(
    samples: dict[tuple[str, str], list[Any]],
    sides: list[str],
    args: argparse.Namespace,
    workloads: list[Workload],
) -> dict[str, Any]:
    by_name = {w.name: w for w in workloads}
    rows = {w.name: sum(len(r) for r in w.requests) for w in workloads}
    out: dict[str, Any] = {"sides": sides, "per_side": {}, "ratios": {}, "rows": rows}
    for side in sides:
        lat = samples[(side, "latency")]
        null_lat = samples[(side, "overhead latency")]
        out["per_side"][side] = {
            "p50_ms": [pct(x, 50) * 1000 for x in lat],
            "p99_ms": [pct(x, 99) * 1000 for x in lat],
            "throughput": [rows["throughput"] / s for s, _ in samples[(side, "throughput")]],
            "large_s": [s for s, _ in samples[(side, "large")]],
            "large_dim": samples[(side, "large")][0][1],
            "null_p50_ms": [pct(x, 50) * 1000 for x in null_lat],
            "null_p99_ms": [pct(x, 99) * 1000 for x in null_lat],
            "null_rps": [
                len(by_name["overhead burst"].requests) / s
                for s, _ in samples[(side, "overhead burst")]
            ],
        }
    n = args.repeat
    ps = out["per_side"]

    def ratio(side_x: str, key: str, side_y: str, invert: bool = False) -> list[float]:
        xs, ys = ps[side_x][key], ps[side_y][key]
        return [(ys[i] / xs[i]) if invert else (xs[i] / ys[i]) for i in range(n)]

    ratios: dict[str, list[float]] = {
        "throughput B/A": ratio("B", "throughput", "A"),
        "large reply B/A (speed)": ratio("B", "large_s", "A", invert=True),
        "p50 added by B over A (ms)": [
            ps["B"]["p50_ms"][i] - ps["A"]["p50_ms"][i] for i in range(n)
        ],
        "large reply: ms added over A by B": [
            (ps["B"]["large_s"][i] - ps["A"]["large_s"][i]) * 1000 for i in range(n)
        ],
        "null model: p50 added by B over A (ms)": [
            ps["B"]["null_p50_ms"][i] - ps["A"]["null_p50_ms"][i] for i in range(n)
        ],
        "null model: requests/s B/A": ratio("B", "null_rps", "A"),
    }
    for encoding in ("float", "base64"):
        side = f"C-{encoding}"
        if side in ps:
            ratios[f"throughput B/C-{encoding}"] = ratio("B", "throughput", side)
            ratios[f"large reply B/C-{encoding} (speed)"] = ratio("B", "large_s", side, invert=True)
            # Without the model's compute: the milliseconds this path adds over A.
            ratios[f"large reply: ms added over A by C-{encoding}"] = [
                (ps[side]["large_s"][i] - ps["A"]["large_s"][i]) * 1000 for i in range(n)
            ]
            ratios[f"p50 latency B/C-{encoding}"] = ratio("B", "p50_ms", side)
            ratios[f"null model: p50 latency B/C-{encoding}"] = ratio("B", "null_p50_ms", side)
            ratios[f"null model: requests/s B/C-{encoding}"] = ratio("B", "null_rps", side)
    out["ratios"] = ratios
    out["large_rows"] = rows["large"]
    return out


TARGETS = [
    ("throughput B/A", ">=", 0.97),
    ("p50 added by B over A (ms)", "<=", 0.5),
    ("large reply B/C-float (speed)", ">=", 1.5),
    ("large reply B/C-base64 (speed)", ">=", 1.5),
    ("p50 latency B/C-float", "<=", 0.5),
    ("p50 latency B/C-base64", "<=", 0.5),
    ("null model: p50 added by B over A (ms)", "<=", 0.5),
    ("null model: p50 latency B/C-float", "<=", 0.5),
    ("null model: p50 latency B/C-base64", "<=", 0.5),
]


def write_report(report: dict[str, Any], args: argparse.Namespace, stack: dict[str, str]) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    device = stack.get("cuda") or platform.processor() or platform.machine()
    title = args.title or f"{args.device} run"
    lines = [
        f"## {title} — {now}",
        "",
        f"- machine: {os.cpu_count()} CPU cores, device `{args.device}` ({device}); "
        f"worker stack: numpy {stack.get('numpy', '?')}, torch {stack.get('torch', '?')}, "
        f"transformers {stack.get('transformers', '?')}, infinity-emb {stack.get('infinity_emb', '?')}; "
        f"main: numpy {np.__version__}",
        f"- models: latency/throughput `{Path(args.model).name if args.model != 'minilm' else 'all-MiniLM-L6-v2'}`, "
        f"large reply `{Path(args.large_model).name}` ({report['per_side']['B']['large_dim']} dims); "
        f"dtype {args.dtype}, batch size {args.batch_size}, BetterTransformer off on every side",
        f"- workloads: latency = {args.latency_n} sequential 1-sentence requests; throughput = {args.requests} "
        f"requests x {args.sentences} sentences all in flight ({report['rows']['throughput']} rows); large reply = one request "
        f"of {report['large_rows']} rows x {report['per_side']['B']['large_dim']} float32 "
        f"({report['large_rows'] * report['per_side']['B']['large_dim'] * 4 / 1e6:.1f} MB)",
        f"- {args.repeat} repetitions, sides alternating in rotated order; cells are median (min–max)",
        "",
        f"- null model = infinity's `debugengine` (no model compute): {args.overhead_n} sequential requests, "
        f"and {args.overhead_burst} single-sentence requests in flight at once; what it measures is each "
        "path's own cost",
        "",
        "| side | p50 latency ms | p99 latency ms | throughput sentences/s | large reply s "
        "| null model p50 ms | null model p99 ms | null model requests/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side in report["sides"]:
        ps = report["per_side"][side]
        lines.append(
            f"| {SIDE_NAMES[side]} | {spread(ps['p50_ms'], '{:.2f}')} | {spread(ps['p99_ms'], '{:.2f}')} | "
            f"{spread(ps['throughput'], '{:.1f}')} | {spread(ps['large_s'], '{:.3f}')} | "
            f"{spread(ps['null_p50_ms'], '{:.3f}')} | {spread(ps['null_p99_ms'], '{:.3f}')} | "
            f"{spread(ps['null_rps'], '{:.0f}')} |"
        )
    lines += [
        "",
        "| ratio (per repetition, side by side) | median | min | max | target |",
        "|---|---|---|---|---|",
    ]
    targets = {name: (op, value) for name, op, value in TARGETS}
    for name, values in report["ratios"].items():
        target = ""
        if name in targets:
            op, value = targets[name]
            ok = (
                statistics.median(values) >= value
                if op == ">="
                else statistics.median(values) <= value
            )
            target = f"{op} {value} {'✅' if ok else '❌'}"
        lines.append(
            f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} | {target} |"
        )
    lines.append("")
    section = "\n".join(lines) + "\n"

    args.out.parent.mkdir(parents=True, exist_ok=True)
    chart = (
        args.out.with_suffix(".png")
        if not args.append
        else args.out.with_name(f"{args.out.stem}-{args.device}.png")
    )
    draw_chart(report, chart, title)
    section += f"\n![{title}]({chart.name})\n"
    if args.append and args.out.exists():
        text = args.out.read_text(encoding="utf-8").rstrip() + "\n\n" + section
    else:
        header_file = REPO / "docs" / "benchmarks_header.md"
        header = (
            header_file.read_text(encoding="utf-8") if header_file.exists() else "# Benchmarks\n"
        )
        text = header.rstrip() + "\n\n" + section
    args.out.write_text(text, encoding="utf-8")
    print(section)
    print(f"wrote {args.out} and {chart}")


def draw_chart(report: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = report["sides"]
    labels = [SIDE_NAMES[s].split(":")[0] + ("" if s in ("A", "B") else s[1:]) for s in sides]
    colors = ["#888888", "#1f77b4", "#d62728", "#ff7f0e"][: len(sides)]
    metrics: list[tuple[str, str, Callable[[dict[str, Any]], list[float]]]] = [
        ("p50 latency, MiniLM (ms, lower is better)", "p50_ms", lambda p: p["p50_ms"]),
        ("throughput (sentences/s, higher is better)", "throughput", lambda p: p["throughput"]),
        ("large reply 1024x1792 (s, lower is better)", "large_s", lambda p: p["large_s"]),
        ("null model p50 (ms, lower is better)", "null_p50_ms", lambda p: p["null_p50_ms"]),
        ("null model requests/s (higher is better)", "null_rps", lambda p: p["null_rps"]),
    ]
    figure, axes = plt.subplots(1, 5, figsize=(20, 3.8))
    for axis, (name, _, pick) in zip(axes, metrics, strict=True):
        medians = [statistics.median(pick(report["per_side"][s])) for s in sides]
        lows = [m - min(pick(report["per_side"][s])) for m, s in zip(medians, sides, strict=True)]
        highs = [max(pick(report["per_side"][s])) - m for m, s in zip(medians, sides, strict=True)]
        axis.bar(labels, medians, color=colors, yerr=[lows, highs], capsize=4)
        axis.set_title(name, fontsize=10)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
