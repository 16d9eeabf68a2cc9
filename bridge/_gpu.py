"""GPU sharing arithmetic: memory budgets and vLLM's ``gpu_memory_utilization``.

Pure functions, no torch: the client (numpy 2, vLLM) and the worker (numpy 1)
both import this, and the tests run it on machines without a GPU.

How the two processes share one card
------------------------------------
vLLM reserves ``gpu_memory_utilization x total`` at start (0.9 by default)
and refuses to start if that much is not free. The worker holds what its
models and activations need, capped by its budget
(``torch.cuda.set_per_process_memory_fraction``). So, per card::

    vLLM share  = gpu_memory_utilization x total
    worker      = its budget (or, without one, what it holds now + margin)
    vLLM share + worker + headroom (CUDA contexts, other processes) <= total

:func:`suggest_gpu_memory_utilization` solves that for vLLM.
"""

from __future__ import annotations

from bridge._errors import ConfigurationError

__all__ = ["budget_fraction", "parse_device", "suggest_gpu_memory_utilization"]

GIB = 1024**3


def budget_fraction(budget: float | int | None, total_bytes: int) -> float | None:
    """Turn a budget -- a fraction in (0, 1] or a byte count > 1 -- into a fraction of the card."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ConfigurationError(
            f"gpu_memory must be a fraction in (0, 1] or a number of bytes, got {budget!r}"
        )
    if budget <= 1:
        return float(budget)
    if total_bytes <= 0:
        raise ConfigurationError(
            "cannot turn a byte budget into a fraction without the card's size"
        )
    if budget > total_bytes:
        raise ConfigurationError(
            f"gpu_memory={budget} bytes is more than the card has ({total_bytes} bytes)"
        )
    return float(budget) / total_bytes


def check_budget(budget: float | int | None) -> None:
    """Validate a budget before any card is known (client side)."""
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ConfigurationError(
            f"gpu_memory must be a fraction in (0, 1] or a number of bytes, got {budget!r}"
        )


def suggest_gpu_memory_utilization(
    total_bytes: int,
    worker_bytes: int,
    headroom_bytes: int = GIB,
) -> float:
    """The ``gpu_memory_utilization`` to give vLLM so that it fits beside the worker.

    ``worker_bytes`` is the worker's budget when it has one (it may grow up to
    it), else what it holds now. ``headroom_bytes`` covers the CUDA contexts
    and anything else on the card (1 GiB by default). Rounded down to 0.01.
    """
    if total_bytes <= 0:
        raise ConfigurationError("the card's total memory must be positive")
    available = total_bytes - worker_bytes - headroom_bytes
    if available <= 0:
        raise ConfigurationError(
            f"nothing is left for vLLM: the card has {total_bytes / GIB:.1f} GiB, the worker takes "
            f"{worker_bytes / GIB:.1f} GiB and the headroom is {headroom_bytes / GIB:.1f} GiB"
        )
    return max(0.01, int(available / total_bytes * 100) / 100)


def parse_device(device: str) -> tuple[str, str | None]:
    """``"cuda:1"`` -> ``("cuda", "1")``; infinity 0.0.58 knows only plain ``cuda``,
    so the index travels as the worker's own CUDA_VISIBLE_DEVICES."""
    if device.startswith("cuda:"):
        index = device.split(":", 1)[1]
        if not index.isdigit():
            raise ConfigurationError(
                f"device {device!r}: the part after 'cuda:' must be a GPU index"
            )
        return "cuda", index
    return device, None
