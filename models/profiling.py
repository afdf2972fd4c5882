"""Where a training step's time goes: torch.profiler's ops (CPU) or CUDA kernels, grouped.

Used by the training loop (`LoopConfig.profile_steps`, into the version's metrics) and by
`benchmarks/dit.py --profile`. Groups are read off op and kernel names, first match wins:
attention and norms come before matmul and elementwise because their fused kernels' names
also contain "gemm" or "elementwise". A job marks its data loading with
`torch.profiler.record_function("data")`; that label's inclusive CPU time is reported beside
the groups (on a GPU it is the time the host spends feeding the step).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PROFILE_GROUPS", "LABELS", "profile_group", "start", "stop", "summarise", "render"]

PROFILE_GROUPS = (
    ("attention", ("scaled_dot_product", "flash", "attention", "fmha", "sdpa")),
    ("optimiser", ("adam", "foreach", "multi_tensor", "optimizer")),
    ("norm", ("norm",)),
    ("matmul", ("mm", "gemm", "matmul", "linear", "cutlass", "xmma", "nvjet")),
    ("elementwise (gates, activations, residuals)", ("elementwise", "mul", "add", "silu", "gelu", "sigmoid", "sub",
                                                     "div", "copy", "fill", "cat", "reduce", "sum", "mean", "exp",
                                                     "pow", "neg", "sqrt", "clone", "where", "_to_copy")),
)
LABELS = ("data",)  # record_function labels a job sets, reported by their inclusive CPU time


def profile_group(name: str) -> str:
    low = name.lower()
    return next((group for group, keys in PROFILE_GROUPS if any(k in low for k in keys)), "other")


def start(device) -> tuple[Any, float]:
    """A started torch.profiler (CPU, and CUDA on a GPU) and the wall clock it started at."""
    import time

    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))
    prof.start()
    return prof, time.perf_counter()


def stop(started: tuple[Any, float], steps: int, device) -> dict[str, Any]:
    """Stop what `start` began over `steps` steps (waiting for the GPU first): the summary."""
    import time

    import torch

    prof, t0 = started
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    prof.stop()
    return summarise(prof, steps, device.type == "cuda", wall_ms)


def summarise(prof, steps: int, cuda: bool, wall_ms: float, top: int = 12) -> dict[str, Any]:
    """A finished torch.profiler.profile over `steps` steps -> ms per step: busy (the kernels'
    device time on a GPU, the ops' self CPU time on a CPU), by group, the top ops or kernels,
    and the job's labels (inclusive CPU time)."""
    from torch.autograd import DeviceType

    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    events = prof.key_averages()
    rows = sorted(((e.key, (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps)
                   for e in events if e.device_type == kind), key=lambda r: -r[1])
    rows = [r for r in rows if r[1] > 0 and r[0] not in LABELS]
    groups: dict[str, float] = {}
    for op, ms in rows:
        groups[profile_group(op)] = groups.get(profile_group(op), 0.0) + ms
    labels = {e.key: e.cpu_time_total / 1e3 / steps for e in events if e.key in LABELS and e.device_type == DeviceType.CPU}
    r4 = lambda x: round(x, 4)  # noqa: E731
    return {"steps": steps, "device": "cuda" if cuda else "cpu", "wall_ms": r4(wall_ms),
            "busy_ms": r4(sum(ms for _, ms in rows)),
            "groups": {g: r4(ms) for g, ms in sorted(groups.items(), key=lambda g: -g[1])},
            "labels": {k: r4(v) for k, v in labels.items()}, "top": [[op, r4(ms)] for op, ms in rows[:top]]}


def render(summary: dict[str, Any], name: str = "step") -> str:
    """The summary as the lines a person reads."""
    wall, busy = summary["wall_ms"], max(summary["busy_ms"], 1e-9)
    out = [f"profile of {name} over {summary['steps']} steps: {wall:.2f} ms/step wall (under the profiler), "
           f"{busy:.2f} ms/step busy on the {summary['device']} ({busy / max(wall, 1e-9):.0%})"]
    out += [f"  {g:46s}{ms:>9.3f} ms{ms / busy:>7.1%}" for g, ms in summary["groups"].items()]
    out += [f"  label '{k}' (inclusive CPU time){'':13s}{ms:>9.3f} ms{ms / max(wall, 1e-9):>7.1%} of wall"
            for k, ms in summary["labels"].items()]
    out.append(f"  top {len(summary['top'])} {'kernels' if summary['device'] == 'cuda' else 'ops'}:")
    out += [f"  {ms:>9.3f} ms{ms / busy:>7.1%}  {op[:110]}" for op, ms in summary["top"]]
    return "\n".join(out)
