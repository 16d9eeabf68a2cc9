"""The lock files agree with the pins they were resolved from.

Provisioning installs the locks with ``--no-deps``, so a pin edited in an
``.in`` file without regenerating its lock would silently not take effect.
No network, no venv: the files alone.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s#;]+)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file (comments and -r lines skipped)."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            found[normalize(match.group(1))] = match.group(2)
    return found


def public_version(version: str) -> str:
    # torch 2.13.0+cpu satisfies the pin torch==2.13.0 (PEP 440 ignores the
    # local label when the pin has none).
    return version.split("+", 1)[0]


LOCKS = [
    ("infinity_env/requirements.lock", ["infinity_env/requirements.in"]),
    ("main_env/lock-none.txt", ["main_env/requirements.in"]),
    ("main_env/lock-cpu.txt", ["main_env/requirements.in", "main_env/requirements-vllm-cpu.in"]),
    ("main_env/lock-cuda.txt", ["main_env/requirements.in", "main_env/requirements-vllm-cuda.in"]),
]


@pytest.mark.parametrize(("lock", "sources"), LOCKS, ids=[lock for lock, _ in LOCKS])
def test_every_pin_is_in_its_lock_at_the_same_version(lock: str, sources: list[str]) -> None:
    locked = pins(REPO / lock)
    wanted: dict[str, str] = {}
    for source in sources:
        wanted.update(pins(REPO / source))
    assert wanted, f"no pins read from {sources}"
    wrong = {
        name: (version, locked.get(name))
        for name, version in wanted.items()
        if locked.get(name) is None or public_version(locked[name]) != version
    }
    assert not wrong, f"{lock} disagrees with its pins (pin, lock): {wrong}; regenerate it"


def test_main_env_locks_keep_infinity_out() -> None:
    for lock, _ in LOCKS[1:]:
        locked = pins(REPO / lock)
        assert not {"infinity-emb", "embed", "optimum"} & locked.keys(), lock
        major, minor = (int(part) for part in locked["numpy"].split(".")[:2])
        assert (major, minor) >= (2, 2), f"{lock}: vLLM needs numpy >= 2.2"


def test_cuda_lock_takes_the_cuda_torch_and_the_cpu_lock_the_cpu_one() -> None:
    # lock-cuda.txt is resolved against PyPI alone; a local +cpu wheel in it
    # would make every GPU user's vLLM fail at its first model.
    assert "+" not in pins(REPO / "main_env/lock-cuda.txt")["torch"]
    assert any(name.startswith("nvidia-cudnn") for name in pins(REPO / "main_env/lock-cuda.txt"))
    assert pins(REPO / "main_env/lock-cpu.txt")["torch"].endswith("+cpu")
