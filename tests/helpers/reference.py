"""Reference results, computed in-process in infinity_env (no bridge involved).

    python reference.py JOBS.json OUT_DIR

JOBS.json is ``{"jobs": [job, ...]}``; each job is one of

* ``{"kind": "sentence_transformers", "model": PATH, "texts": [...]}``:
  ``SentenceTransformer(PATH).encode(texts)``;
* ``{"kind": "infinity", "model": PATH, "engine": "torch", "embedding_dtype":
  "float32", "op": OP, "requests": [request, ...]}``: one in-process
  ``AsyncEngineArray`` with the worker's own settings (BetterTransformer off,
  embed's defaults), each request awaited as one call, all concurrently.
  A request is ``{"texts": [...]}``, ``{"query": q, "texts": [...],
  "raw_scores": bool}``, or ``{"files": [...]}`` for images/audio.

Writes OUT_DIR/result.json; arrays go to OUT_DIR/<job>_<request>.npy
(numpy's file format reads the same in numpy 1 and 2).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np


def sentence_transformers_job(job: dict[str, Any], out: Path, index: int) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(job["model"], device="cpu")
    array = model.encode(
        job["texts"], batch_size=32, convert_to_numpy=True, show_progress_bar=False
    )
    path = out / f"{index}_0.npy"
    np.save(path, np.asarray(array))
    return {"arrays": [str(path)]}


async def infinity_job(job: dict[str, Any], out: Path, index: int) -> dict[str, Any]:
    from infinity_emb import AsyncEngineArray, EngineArgs
    from PIL import Image

    args = EngineArgs(
        model_name_or_path=job["model"],
        engine=job.get("engine", "torch"),
        device="cpu",
        embedding_dtype=job.get("embedding_dtype", "float32"),
        batch_size=32,
        bettertransformer=False,
        lengths_via_tokenize=True,
        model_warmup=False,
        trust_remote_code=True,
    )
    array = AsyncEngineArray.from_args([args])
    await array.astart()
    engine = array[0]
    op = job["op"]

    async def run(request: dict[str, Any]) -> Any:
        if op == "embed":
            return await engine.embed(request["texts"])
        if op == "rerank":
            return await engine.rerank(
                query=request["query"],
                docs=request["texts"],
                raw_scores=request.get("raw_scores", False),
            )
        if op == "classify":
            return await engine.classify(
                sentences=request["texts"], raw_scores=request.get("raw_scores", False)
            )
        if op == "image_embed":
            images = []
            for name in request["files"]:
                image = Image.open(name)
                image.load()
                images.append(image)
            return await engine.image_embed(images=images)
        if op == "audio_embed":
            return await engine.audio_embed(
                audios=[Path(name).read_bytes() for name in request["files"]]
            )
        raise ValueError(op)

    try:
        results = await asyncio.gather(*(run(r) for r in job["requests"]))
    finally:
        await array.astop()
    answer: dict[str, Any] = {"usage": [], "arrays": [], "values": []}
    for number, (value, usage) in enumerate(results):
        answer["usage"].append(int(usage))
        if op in ("embed", "image_embed", "audio_embed"):
            path = out / f"{index}_{number}.npy"
            np.save(path, np.stack([np.asarray(row) for row in value]))
            answer["arrays"].append(str(path))
        else:
            answer["values"].append(value)
    return answer


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())["jobs"]
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    answers = []
    for index, job in enumerate(jobs):
        if job["kind"] == "sentence_transformers":
            answers.append(sentence_transformers_job(job, out, index))
        else:
            answers.append(asyncio.run(infinity_job(job, out, index)))
    # rerank(raw_scores=True) gives torch scalars in infinity 0.0.58: store them as floats.
    (out / "result.json").write_text(json.dumps(answers, default=float))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # infinity's thread pools must not keep a finished run alive
