"""Side A of `make bench`: in-process infinity, the ceiling. Runs in infinity_env.

Speaks JSON lines: one command per stdin line, one answer per stdout line.

    {"cmd": "load", "models": [{"model_id": ..., "engine": ..., "device": ..., "dtype": ...}], "batch_size": 32}
    {"cmd": "latency", "model": 0, "texts": [...]}        -> {"seconds": [per request]}
    {"cmd": "throughput", "model": 0, "requests": [[...]]} -> {"seconds": wall, "rows": n, "dim": d}
    {"cmd": "quit"}

The engines use the worker's own settings (BetterTransformer off, embed's
defaults, batch_delay measured by the worker's own `tune_batch_delay`), so A
and B differ by the bridge alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


async def serve(out: Any) -> None:
    from infinity_emb import AsyncEngineArray, EngineArgs

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bridge._engine import tune_batch_delay

    engines: list[Any] = []
    array = None
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        command = json.loads(line)
        answer: dict[str, Any] = {}
        if command["cmd"] == "load":
            args = [
                EngineArgs(
                    model_name_or_path=m["model_id"],
                    engine=m.get("engine", "torch"),
                    device=m.get("device", "cpu"),
                    dtype=m.get("dtype", "auto"),
                    batch_size=command.get("batch_size", 32),
                    bettertransformer=False,
                    lengths_via_tokenize=True,
                    model_warmup=False,
                    trust_remote_code=True,
                )
                for m in command["models"]
            ]
            array = AsyncEngineArray.from_args(args)
            await array.astart()
            engines = list(array)
            for engine in engines:
                tune_batch_delay(engine, None)
        elif command["cmd"] == "latency":
            engine = engines[command["model"]]
            seconds = []
            for text in command["texts"]:
                started = time.perf_counter()
                await engine.embed([text])
                seconds.append(time.perf_counter() - started)
            answer = {"seconds": seconds}
        elif command["cmd"] == "throughput":
            engine = engines[command["model"]]
            started = time.perf_counter()
            results = await asyncio.gather(*(engine.embed(r) for r in command["requests"]))
            wall = time.perf_counter() - started
            answer = {
                "seconds": wall,
                "rows": sum(len(r[0]) for r in results),
                "dim": len(results[0][0][0]),
            }
        elif command["cmd"] == "quit":
            break
        out.write(json.dumps(answer) + "\n")
        out.flush()
    if array is not None:
        await array.astop()


def main() -> None:
    # Keep stdout for the protocol; everything else (infinity's logs) goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    asyncio.run(serve(out))
    out.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
