"""Shared fixtures. Every worker here is a real process in the real infinity_env venv."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# No hub, ever: models are the bundled MiniLM or built by the tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# infinity writes a cache directory at import; keep it out of the checkout.
os.environ.setdefault("INFINITY_HOME", tempfile.mkdtemp(prefix="bridge-tests-infinity-"))

import _support

from bridge import BatchedInference, bundled_model_path


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return bundled_model_path()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """conan, poison, classifier, reranker, clip, clap: random weights, built once per session."""
    out = tmp_path_factory.mktemp("models")
    lines = _support.run_helper("tiny_models.py", str(out)).strip().splitlines()
    return {info["name"]: info for info in map(json.loads, lines)}


@pytest.fixture(scope="session")
def minilm(minilm_path: str) -> Iterator[BatchedInference]:
    """One MiniLM worker shared by the tests that only read from it."""
    client = BatchedInference(model_id=minilm_path, engine="torch")
    yield client
    client.stop()


@pytest.fixture(scope="session", autouse=True)
def no_worker_left_behind() -> Iterator[None]:
    yield
    leftovers = _support.worker_pids_of(os.getpid())
    ok = _support.wait_until(lambda: not _support.worker_pids_of(os.getpid()), timeout=10)
    assert ok, f"workers left running after the session: {leftovers}"


@pytest.fixture()
def sample_files(tmp_path: Path) -> dict[str, list[Path]]:
    """PNGs drawn here and WAVs synthesised here (PIL comes with vLLM's deps)."""
    from PIL import Image, ImageDraw

    images = []
    for index, (size, color) in enumerate(
        [((64, 48), (200, 30, 30)), ((33, 77), (20, 180, 90)), ((128, 128), (10, 10, 240))]
    ):
        image = Image.new("RGB", size, color)
        draw = ImageDraw.Draw(image)
        draw.ellipse((4, 4, size[0] - 5, size[1] - 5), outline=(255, 255, 255), width=3)
        draw.line((0, 0, size[0], size[1]), fill=(0, 0, 0), width=2)
        path = tmp_path / f"image{index}.png"
        image.save(path)
        images.append(path)
    audios = [
        _support.sine_wav(tmp_path / f"tone{index}.wav", 48000, seconds, frequency)
        for index, (seconds, frequency) in enumerate([(1.0, 440.0), (0.5, 880.0), (0.25, 220.0)])
    ]
    return {"images": images, "audios": audios}
