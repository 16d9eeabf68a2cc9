"""Driver of scripts/gpu_check.sh, run in the GPU image's own numpy-2 Python.

1. builds the Conan-shaped model (BERT-large + Dense 1792, random weights);
2. starts the worker on cuda (float16, a GPU memory budget, batch size 128);
3. embeds 8192 Chinese sentences of 16-256 characters while this numpy-2
   process keeps the same GPU busy with its own torch work;
4. reports both processes' GPU memory and the gpu_memory_utilization a vLLM
   beside them should get;
5. runs the benchmark's GPU section (A in-process vs B bridge; no REST: the
   image has no FastAPI stack).

Writes OUT/gpu-check.md and OUT/gpu-check.json (+ the benchmark's files).

``--device cpu`` (with small sizes) is a dry run of the same plumbing on a
machine without a GPU: the carried stacks, the worker wrapper, the worker's
start, the embed, the report and the benchmark's invocation. It is how this
script is checked before a GPU session spends its few minutes on it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bridge import BatchedInference  # noqa: E402
from bridge._supervisor import find_worker_python  # noqa: E402

MIB = 2**20


def chinese_sentences(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(16, 257, size=count)
    return ["".join(chr(c) for c in rng.integers(0x4E00, 0x4E00 + 3000, size=n)) for n in lengths]


def gpu_busy_loop(stop: threading.Event, stats: dict[str, Any], device: str) -> None:
    """This (numpy-2) process's own torch work, running while the worker embeds."""
    import torch

    size, dtype = (4096, torch.bfloat16) if device == "cuda" else (256, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    count = 0
    started = time.perf_counter()
    while not stop.is_set():
        (a @ b).sum().item()
        count += 1
    elapsed = time.perf_counter() - started
    stats["matmuls"] = count
    stats["tflops"] = 2 * size**3 * count / elapsed / 1e12
    if device == "cuda":
        stats["main_allocated_mib"] = torch.cuda.memory_allocated() / MIB
        stats["main_reserved_mib"] = torch.cuda.memory_reserved() / MIB


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--budget", type=float, default=0.3, help="worker GPU memory budget (fraction)"
    )
    parser.add_argument("--sentences", type=int, default=8192)
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run without a GPU"
    )
    parser.add_argument(
        "--model",
        default="conan-large",
        choices=["conan-large", "conan"],
        help="conan: the small Conan-shaped model, for dry runs",
    )
    parser.add_argument("--bench-args", default="", help="extra flags for bench.py (dry runs)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = args.device == "cuda"
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "card": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
        "main": {"numpy": np.__version__, "torch": torch.__version__},
        "model": "Conan-shaped BERT-large + Dense 1792"
        if args.model == "conan-large"
        else "Conan-shaped tiny BERT + Dense 1792",
        "dtype": "fp16" if cuda else "fp32",
        "main_work": "bf16 4096² matmuls" if cuda else "fp32 256² matmuls on the CPU",
    }
    print(f"card: {report['card']}; main numpy {np.__version__}", flush=True)

    models = Path("/tmp/bridge-gpu-models")
    if not (models / args.model / "config.json").exists():
        started = time.perf_counter()
        subprocess.run(
            [
                str(find_worker_python()),
                str(REPO / "scripts" / "tiny_models.py"),
                str(models),
                args.model,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        print(f"built {args.model} in {time.perf_counter() - started:.0f} s", flush=True)
    model = str(models / args.model)

    started = time.perf_counter()
    client = BatchedInference(
        model_id=model,
        engine="torch",
        device=args.device,
        dtype="float16" if cuda else "float32",
        batch_size=128,
        gpu_memory=args.budget if cuda else None,
        startup_timeout=300,
    )
    report["worker_ready_s"] = time.perf_counter() - started
    try:
        status = client.status()[0]
        report["worker"] = {
            "versions": status["versions"],
            "device": status["device"],
            "batch_size": client.models[0]["batch_size"],
            "batch_delay": client.models[0]["batch_delay"],
            "gpu_at_ready": status["gpu"],
        }
        print(
            f"worker ready in {report['worker_ready_s']:.0f} s: {status['device']}, "
            f"batch size {client.models[0]['batch_size']}",
            flush=True,
        )

        texts = chinese_sentences(args.sentences)
        requests = [texts[i : i + 128] for i in range(0, len(texts), 128)]
        stop = threading.Event()
        busy: dict[str, Any] = {}
        thread = threading.Thread(target=gpu_busy_loop, args=(stop, busy, args.device))
        thread.start()
        started = time.perf_counter()
        futures = [client.embed(sentences=r) for r in requests]
        rows = [row for f in futures for row in f.result(timeout=300)[0]]
        elapsed = time.perf_counter() - started
        during = client.status()[0]["gpu"]
        stop.set()
        thread.join()
        matrix = np.stack(rows)
        assert matrix.shape == (len(texts), 1792) and matrix.dtype == np.float32
        assert np.isfinite(matrix).all()
        report["embed"] = {
            "sentences": len(texts),
            "seconds": elapsed,
            "sentences_per_s": len(texts) / elapsed,
            "main_gpu_work": busy,
        }
        report["worker"]["gpu_under_load"] = during
        report["vllm_gpu_memory_utilization"] = (
            client.suggest_vllm_gpu_memory_utilization() if cuda else None
        )
        print(json.dumps(report["embed"]), flush=True)
    finally:
        client.stop()

    if not args.skip_bench:
        subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "bench.py"),
                "--device",
                args.device,
                "--dtype",
                "float16" if cuda else "float32",
                "--model",
                model,
                "--large-model",
                model,
                "--batch-size",
                "128",
                "--no-rest",
                "--repeat",
                "3",
                "--latency-n",
                "50",
                "--requests",
                "64",
                "--sentences",
                "128",
                "--overhead-n",
                "100",
                "--overhead-burst",
                "500",
                "--out",
                str(args.out / "benchmarks-cuda.md"),
                "--title",
                f"{report['card']} (device tool)",
                *args.bench_args.split(),
            ],
            check=False,
            timeout=300,
        )

    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str))
    write_markdown(report, args.out / "gpu-check.md")
    return 0


def write_markdown(report: dict[str, Any], path: Path) -> None:
    worker = report["worker"]
    lines = [
        f"## GPU check: {report['card']}, {report['date']}",
        "",
        f"- main process: numpy {report['main']['numpy']}, torch {report['main']['torch']}",
        f"- worker: numpy {worker['versions'].get('numpy')}, torch {worker['versions'].get('torch')}, "
        f"transformers {worker['versions'].get('transformers')}, infinity-emb "
        f"{worker['versions'].get('infinity_emb')}; ready in {report['worker_ready_s']:.0f} s; "
        f"batch size after budget calibration: {worker['batch_size']}; "
        f"batch_delay timed at {worker['batch_delay'] * 1000:.2f} ms",
        f"- embed: {report['embed']['sentences']} Chinese sentences (16-256 chars), {report['model']}, "
        f"{report['dtype']}: {report['embed']['sentences_per_s']:.0f} sentences/s, while the main process ran "
        f"{report['main_work']} at {report['embed']['main_gpu_work'].get('tflops', 0):.1f} TFLOP/s",
        "",
        "| GPU memory (MiB) | reserved | allocated | max allocated | budget | card free | card total |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, gpu in (
        ("worker at ready", worker["gpu_at_ready"]),
        ("worker under load", worker["gpu_under_load"]),
    ):
        if gpu:
            lines.append(
                f"| {label} | {gpu['reserved'] / MIB:.0f} | {gpu['allocated'] / MIB:.0f} | "
                f"{gpu['max_allocated'] / MIB:.0f} | {gpu.get('budget', 0) / MIB:.0f} | {gpu['free'] / MIB:.0f} | "
                f"{gpu['total'] / MIB:.0f} |"
            )
    main = report["embed"]["main_gpu_work"]
    lines.append(
        f"| main process (numpy 2) | {main.get('main_reserved_mib', 0):.0f} | "
        f"{main.get('main_allocated_mib', 0):.0f} | | | | |"
    )
    lines += [
        "",
        f"- suggested vLLM `gpu_memory_utilization` beside this worker: "
        f"**{report['vllm_gpu_memory_utilization']}**",
        "",
    ]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
