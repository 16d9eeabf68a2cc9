"""Helpers shared by the tests (main_env side).

The references the tests compare against are computed in infinity_env, by
running tests/helpers/*.py with the worker venv's interpreter: main_env has
no infinity, embed or sentence-transformers, by design.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

HELPERS = Path(__file__).resolve().parent / "helpers"
REPO = Path(__file__).resolve().parent.parent


def worker_python() -> Path:
    from bridge._supervisor import find_worker_python

    return find_worker_python()


def run_helper(script: str, *args: str, timeout: float = 600) -> str:
    """Run tests/helpers/SCRIPT (or scripts/SCRIPT) in infinity_env; return its stdout."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [
            str(worker_python()),
            str(HELPERS / script if (HELPERS / script).exists() else REPO / "scripts" / script),
            *args,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc.stdout


def reference(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Compute reference results in-process in infinity_env (see helpers/reference.py)."""
    with tempfile.TemporaryDirectory(prefix="bridge-ref-") as tmp:
        spec = Path(tmp) / "jobs.json"
        spec.write_text(json.dumps({"jobs": jobs}))
        run_helper("reference.py", str(spec), tmp)
        answers: list[dict[str, Any]] = json.loads((Path(tmp) / "result.json").read_text())
        for answer in answers:
            answer["arrays"] = [np.load(path) for path in answer.get("arrays", [])]
        return answers


def mixed_texts(count: int, seed: int = 0) -> list[str]:
    """English, Chinese, mixed, short and long (beyond 256 tokens) texts."""
    rng = np.random.default_rng(seed)
    english = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "the",
        "cat",
        "sleeps",
        "on",
        "a",
        "warm",
        "mat",
        "and",
        "markets",
        "rise",
        "as",
        "engineers",
        "ship",
        "embeddings",
        "through",
        "sockets",
    ]
    chinese = list("我们今天在公园里散步天气很好小猫坐在垫子上股市大幅下跌机器学习模型向量检索")
    texts = []
    for i in range(count):
        kind = i % 4
        length = int(rng.integers(1, 40)) if i % 10 else int(rng.integers(300, 900))
        if kind == 0:
            text = " ".join(rng.choice(english, size=length))
        elif kind == 1:
            text = "".join(rng.choice(chinese, size=length))
        elif kind == 2:
            text = (
                " ".join(rng.choice(english, size=length // 2 + 1))
                + " "
                + "".join(rng.choice(chinese, size=length))
            )
        else:
            text = "".join(rng.choice(english + chinese, size=length))
        texts.append(text)
    return texts


def sine_wav(path: Path, sampling_rate: int, seconds: float, frequency: float) -> Path:
    t = np.arange(int(sampling_rate * seconds)) / sampling_rate
    samples = (0.3 * np.sin(2 * np.pi * frequency * t) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sampling_rate)
        out.writeframes(samples.tobytes())
    path.write_bytes(buffer.getvalue())
    return path


def worker_pids_of(parent: int) -> list[int]:
    """PIDs of live bridge workers started by ``parent`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if b"bridge.worker" in cmdline and b"--parent-pid" in cmdline:
            index = cmdline.index(b"--parent-pid")
            state = stat.rsplit(")", 1)[1].split()[0]
            if cmdline[index + 1] == str(parent).encode() and state != "Z":
                found.append(int(entry.name))
    return found


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
