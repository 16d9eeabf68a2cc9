"""embed's whole API through the bridge, against in-process infinity on the same local models.

rerank, classify, image_embed, audio_embed, every embedding_dtype, several
models in one worker, and the asyncio client. Labels and shapes must match
exactly, floats within 1e-5.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import http.server
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _support
import numpy as np
import pytest

from bridge import (
    AsyncBatchedInference,
    BatchedInference,
    InvalidInputError,
    UnsupportedOperationError,
    WorkerInputError,
)

ATOL = 1e-5
DOCS = [
    "paris is in france",
    "the cat sat on the mat",
    "巴黎在法国",
    "where is paris",
    "hello world",
]
SENTENCES = ["good movie", "bad movie", "一部好电影", "the cat sat on the mat", "hello"]


@pytest.fixture(scope="module")
def trio(tiny_models: dict[str, dict[str, Any]]) -> Iterator[BatchedInference]:
    """One worker, three models: a classifier, a cross-encoder and a CLIP."""
    ids = [tiny_models[name]["path"] for name in ("classifier", "reranker", "clip")]
    client = BatchedInference(model_id=ids, engine="torch")
    yield client
    client.stop()


@pytest.fixture(scope="module")
def clap(tiny_models: dict[str, dict[str, Any]]) -> Iterator[BatchedInference]:
    client = BatchedInference(model_id=tiny_models["clap"]["path"], engine="torch")
    yield client
    client.stop()


@pytest.fixture(scope="module")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A local HTTP server, so URL inputs are exercised without a network."""
    root = tmp_path_factory.mktemp("www")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------- several models


def test_one_worker_serves_three_models(
    trio: BatchedInference, tiny_models: dict[str, dict[str, Any]]
) -> None:
    names = [m["name"] for m in trio.models]
    assert names == [
        f"{Path(tiny_models[n]['path']).parent.name}/{n}"
        for n in ("classifier", "reranker", "clip")
    ]
    assert [m["capabilities"] for m in trio.models] == [
        ["classify"],
        ["rerank"],
        ["embed", "image_embed"],
    ]
    assert trio.models[0]["labels"] == ["negative", "neutral", "positive"]
    assert trio.models[2]["dim"] == 16


def test_wrong_method_names_the_model_and_what_it_supports(trio: BatchedInference) -> None:
    with pytest.raises(
        UnsupportedOperationError, match=r"classifier'? cannot rerank; it supports: classify"
    ):
        trio.rerank(query="q", docs=["d"], model_id=0)
    with pytest.raises(UnsupportedOperationError, match="cannot embed; it supports: rerank"):
        trio.embed(sentences=["x"], model_id=1)
    with pytest.raises(
        UnsupportedOperationError, match="cannot audio_embed; it supports: embed, image_embed"
    ):
        trio.audio_embed(audios=[b"RIFF"], model_id=2)


# ----------------------------------------------------------------- rerank/classify


@pytest.mark.parametrize("raw_scores", [False, True])
def test_rerank_equals_in_process_infinity(
    trio: BatchedInference, tiny_models: dict[str, dict[str, Any]], raw_scores: bool
) -> None:
    path = tiny_models["reranker"]["path"]
    queries = ["where is paris", "猫在哪里"]
    results = [
        trio.rerank(query=q, docs=DOCS, model_id=path, raw_scores=raw_scores).result(timeout=60)
        for q in queries
    ]
    [expected] = _support.reference(
        [
            {
                "kind": "infinity",
                "model": path,
                "op": "rerank",
                "requests": [
                    {"query": q, "texts": DOCS, "raw_scores": raw_scores} for q in queries
                ],
            }
        ]
    )
    for (scores, usage), want, want_usage in zip(
        results, expected["values"], expected["usage"], strict=True
    ):
        assert isinstance(scores, list) and len(scores) == len(DOCS)
        np.testing.assert_allclose(scores, want, atol=ATOL, rtol=0)
        assert usage == want_usage
    if not raw_scores:
        assert all(0.0 < score < 1.0 for score in results[0][0])  # infinity's sigmoid


def test_classify_equals_in_process_infinity(
    trio: BatchedInference, tiny_models: dict[str, dict[str, Any]]
) -> None:
    path = tiny_models["classifier"]["path"]
    served = trio.models[0]["name"]
    labels, usage = trio.classify(sentences=SENTENCES, model_id=served).result(timeout=60)
    [expected] = _support.reference(
        [{"kind": "infinity", "model": path, "op": "classify", "requests": [{"texts": SENTENCES}]}]
    )
    assert usage == expected["usage"][0]
    want = expected["values"][0]
    assert len(labels) == len(want) == len(SENTENCES)
    for got_item, want_item in zip(labels, want, strict=True):
        assert [c["label"] for c in got_item] == [c["label"] for c in want_item]  # exact, in order
        np.testing.assert_allclose(
            [c["score"] for c in got_item], [c["score"] for c in want_item], atol=ATOL
        )


# -------------------------------------------------------------------------- images


def test_image_embed_equals_in_process_infinity(
    trio: BatchedInference,
    tiny_models: dict[str, dict[str, Any]],
    sample_files: dict[str, list[Path]],
    http_root: tuple[Path, str],
) -> None:
    from PIL import Image

    path = tiny_models["clip"]["path"]
    files = sample_files["images"]
    root, base = http_root
    shutil.copy(files[2], root / "served.png")
    pil = Image.open(files[1])
    pil.load()
    # Every accepted form: str path, Path, bytes, PIL image (raw pixels), URL.
    inputs = [str(files[0]), files[1], files[2].read_bytes(), pil, f"{base}/served.png"]
    rows, usage = trio.image_embed(images=inputs, model_id=2).result(timeout=60)
    same_files = [files[0], files[1], files[2], files[1], files[2]]
    [expected] = _support.reference(
        [
            {
                "kind": "infinity",
                "model": path,
                "op": "image_embed",
                "requests": [{"files": [str(f) for f in same_files]}],
            }
        ]
    )
    assert all(r.dtype == np.float32 and r.shape == (16,) for r in rows)
    np.testing.assert_allclose(np.stack(rows), expected["arrays"][0], atol=ATOL, rtol=0)
    assert usage == expected["usage"][0]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1", "I;16"])
def test_pil_images_of_any_mode_match_their_png(
    trio: BatchedInference, tmp_path: Path, mode: str
) -> None:
    """Raw pixels for common modes, lossless PNG otherwise: same embedding as the file."""
    from PIL import Image

    image = Image.linear_gradient("L").resize((40, 30)).convert(mode)
    file = tmp_path / "image.png"
    image.save(file)
    from_pil, _ = trio.image_embed(images=[image], model_id=2).result(timeout=60)
    from_file, _ = trio.image_embed(images=[str(file)], model_id=2).result(timeout=60)
    np.testing.assert_array_equal(from_pil[0], from_file[0])


def test_clip_text_embed_equals_in_process_infinity(
    trio: BatchedInference, tiny_models: dict[str, dict[str, Any]]
) -> None:
    rows, usage = trio.embed(sentences=SENTENCES, model_id=2).result(timeout=60)
    [expected] = _support.reference(
        [
            {
                "kind": "infinity",
                "model": tiny_models["clip"]["path"],
                "op": "embed",
                "requests": [{"texts": SENTENCES}],
            }
        ]
    )
    np.testing.assert_allclose(np.stack(rows), expected["arrays"][0], atol=ATOL, rtol=0)
    assert usage == expected["usage"][0]


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (["/no/such/file.png"], InvalidInputError, "no such file"),
        ([b""], InvalidInputError, "empty bytes"),
        ([123], InvalidInputError, "URL, path, bytes or PIL image"),
        ([np.zeros((4, 4, 3), dtype=np.uint8)], InvalidInputError, "got ndarray"),
        ([b"definitely not an image"], WorkerInputError, "cannot decode image"),
        (["http://127.0.0.1:9/unreachable.png"], WorkerInputError, "resolve image"),
    ],
)
def test_bad_images_fail_clearly_and_alone(
    trio: BatchedInference, images: list[Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        trio.image_embed(images=images, model_id=2).result(timeout=60)
    assert trio.image_embed(images=[_tiny_png()], model_id=2).result(timeout=60)[0][0].shape == (
        16,
    )


@functools.lru_cache(maxsize=1)
def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- audio


def test_audio_embed_equals_in_process_infinity(
    clap: BatchedInference,
    tiny_models: dict[str, dict[str, Any]],
    sample_files: dict[str, list[Path]],
    http_root: tuple[Path, str],
) -> None:
    files = sample_files["audios"]
    root, base = http_root
    shutil.copy(files[0], root / "tone.wav")
    inputs = [str(files[0]), files[1], files[2].read_bytes(), f"{base}/tone.wav"]
    rows, usage = clap.audio_embed(audios=inputs).result(timeout=60)
    [expected] = _support.reference(
        [
            {
                "kind": "infinity",
                "model": tiny_models["clap"]["path"],
                "op": "audio_embed",
                "requests": [{"files": [str(f) for f in [*files, files[0]]]}],
            }
        ]
    )
    assert all(r.dtype == np.float32 and r.shape == (16,) for r in rows)
    np.testing.assert_allclose(np.stack(rows), expected["arrays"][0], atol=ATOL, rtol=0)
    assert usage == expected["usage"][0]
    text_rows, _ = clap.embed(sentences=["a beep"]).result(timeout=60)
    assert text_rows[0].shape == (16,)


def test_audio_at_the_wrong_sampling_rate_is_an_input_error(
    clap: BatchedInference, tmp_path: Path
) -> None:
    wav = _support.sine_wav(tmp_path / "16k.wav", 16000, 0.5, 440.0)
    with pytest.raises(WorkerInputError, match="sample rate"):
        clap.audio_embed(audios=[wav]).result(timeout=60)


# ---------------------------------------------------------------- embedding dtypes


@pytest.fixture(scope="module")
def calibration_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """int8/uint8 need infinity's calibration sentences, normally downloaded; seed its cache."""
    home = tmp_path_factory.mktemp("infinity-home")
    url = (
        "https://raw.githubusercontent.com/michaelfeil/infinity/2da1f32d610b8edbe4ce58d0c44fc27c963abca6/"
        "docs/assets/multilingual_calibration.utf8"
    )
    target = (
        home / ".infinity_cache" / "calibration_dataset" / hashlib.md5(url.encode()).hexdigest()
    )
    target.mkdir(parents=True)
    (target / "calibration_dataset.txt").write_text(
        "\n".join(_support.mixed_texts(64, seed=5)), encoding="utf-8"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INFINITY_HOME", str(home))
        yield home


DTYPES = {
    "float32": np.float32,
    "int8": np.int8,
    "uint8": np.uint8,
    "binary": np.int8,
    "ubinary": np.uint8,
}


def test_every_embedding_dtype_crosses_as_raw_buffers(
    tiny_models: dict[str, dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
    calibration_home: Path,
) -> None:
    # Five copies of the Conan-shaped model, one per dtype, all in one worker.
    base = tmp_path_factory.mktemp("dtypes")
    paths = []
    for name in DTYPES:
        target = base / f"conan-{name}"
        shutil.copytree(tiny_models["conan"]["path"], target)
        paths.append(str(target))
    texts = _support.mixed_texts(20, seed=3)
    with BatchedInference(model_id=paths, engine="torch", embedding_dtype=list(DTYPES)) as client:
        got = {
            name: client.embed(sentences=texts, model_id=path).result(timeout=120)
            for name, path in zip(DTYPES, paths, strict=True)
        }
    expected = _support.reference(
        [
            {
                "kind": "infinity",
                "model": path,
                "op": "embed",
                "embedding_dtype": name,
                "requests": [{"texts": texts}],
            }
            for name, path in zip(DTYPES, paths, strict=True)
        ]
    )
    for (name, dtype), want in zip(DTYPES.items(), expected, strict=True):
        rows, usage = got[name]
        assert usage == want["usage"][0]
        assert all(row.dtype == dtype for row in rows), name
        width = 1792 // 8 if "binary" in name else 1792
        assert all(row.shape == (width,) for row in rows), name
        if name == "float32":
            np.testing.assert_allclose(np.stack(rows), want["arrays"][0], atol=ATOL, rtol=0)
        else:
            np.testing.assert_array_equal(np.stack(rows), want["arrays"][0])


# ------------------------------------------------------------------------- asyncio


def test_async_client_matches_sync_and_handles_hundreds_of_tasks(
    minilm: BatchedInference, minilm_path: str
) -> None:
    texts = [f"async sentence {i}" for i in range(300)]
    want = np.stack(minilm.embed(sentences=texts).result(timeout=120)[0])

    async def main() -> tuple[list[Any], float]:
        lag = 0.0
        stop = asyncio.Event()

        async def ticker() -> None:  # measures how long the loop is ever blocked
            nonlocal lag
            while not stop.is_set():
                before = time.perf_counter()
                await asyncio.sleep(0.01)
                lag = max(lag, time.perf_counter() - before - 0.01)

        async with AsyncBatchedInference(
            model_id=minilm_path, engine="torch", max_inflight_items=64
        ) as client:
            tick = asyncio.create_task(ticker())
            results = await asyncio.gather(*(client.embed(sentences=[t]) for t in texts))
            stop.set()
            await tick
        return results, lag

    results, lag = asyncio.run(main())
    got = np.stack([rows[0] for rows, _ in results])
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert lag < 0.25, f"the event loop was blocked for {lag:.3f} s"


def test_async_client_every_method(
    tiny_models: dict[str, dict[str, Any]],
    trio: BatchedInference,
    sample_files: dict[str, list[Path]],
) -> None:
    ids = [tiny_models[name]["path"] for name in ("classifier", "reranker", "clip")]
    image = str(sample_files["images"][0])
    sync: dict[str, Any] = {
        "classify": trio.classify(sentences=SENTENCES, model_id=0).result(timeout=60),
        "rerank": trio.rerank(query="where", docs=DOCS, model_id=1).result(timeout=60),
        "image": trio.image_embed(images=[image], model_id=2).result(timeout=60),
        "embed": trio.embed(sentences=SENTENCES, model_id=2).result(timeout=60),
    }

    async def main() -> dict[str, Any]:
        client = AsyncBatchedInference(model_id=ids, engine="torch")
        try:
            return {
                "classify": await client.classify(sentences=SENTENCES, model_id=0),
                "rerank": await client.rerank(query="where", docs=DOCS, model_id=1),
                "image": await client.image_embed(images=[image], model_id=2),
                "embed": await client.embed(sentences=SENTENCES, model_id=2),
            }
        finally:
            await client.aclose()

    got: dict[str, Any] = asyncio.run(main())
    assert got["classify"] == sync["classify"]
    assert got["rerank"] == sync["rerank"]
    for key in ("image", "embed"):
        np.testing.assert_array_equal(np.stack(got[key][0]), np.stack(sync[key][0]))
        assert got[key][1] == sync[key][1]


def test_async_cancellation_cancels_the_request(tiny_models: dict[str, dict[str, Any]]) -> None:
    async def main() -> int:
        async with AsyncBatchedInference(
            model_id=tiny_models["poison"]["path"], engine="torch"
        ) as client:
            task = asyncio.create_task(client.embed(sentences=["slownow"]))
            await asyncio.sleep(0.3)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.1)
            return client.items_in_flight

    assert asyncio.run(main()) == 0
