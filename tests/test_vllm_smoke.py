"""CI smoke test: a real vLLM LLM and the bridge, together in one numpy-2 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _support
import numpy as np
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_vllm_generates_and_bridge_embeds_in_one_process(tmp_path: Path, minilm_path: str) -> None:
    pytest.importorskip("vllm", reason="main_env was built with VLLM=none")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, str(_support.HELPERS / "vllm_smoke.py"), str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    report = json.loads((tmp_path / "smoke.json").read_text())

    assert tuple(int(x) for x in report["numpy"].split(".")[:2]) >= (2, 2)
    assert report["worker_numpy"].startswith("1.")
    assert len(report["generated_token_ids"]) == 8
    assert report["embedding_dtype"] == "float32" and report["embedding_shape"] == [384]
    assert report["modules_loaded"] == []  # nothing of infinity leaked into the vLLM process

    # The embeddings made beside vLLM are the real ones.
    embeddings = np.load(tmp_path / "embedding.npy")
    sentence = "vLLM and Infinity share one process: 向量检索"
    [expected] = _support.reference(
        [{"kind": "sentence_transformers", "model": minilm_path, "texts": [sentence]}]
    )
    np.testing.assert_allclose(embeddings[0], expected["arrays"][0][0], atol=1e-5, rtol=0)
