"""The one training loop of the model stack: schedule, progress, checkpoints, resume, versions.

Each model (vae, dit, reward, distill, rl, enhancer, enhancer-rl, clip) describes one step
as a `TrainJob`; `train(job, models_root, loop)` runs it. Every `ckpt_every` steps the
loop writes a resumable checkpoint (modules, optimisers, step, torch RNG, loss history)
under `models/<name>/runs/<config hash>/last.pt`; a rerun with the same config picks it
up, so a crash costs at most `ckpt_every` steps. At the end the exported modules go to
`models/<name>/vNNNN/` (safetensors + config.json + metrics.json) and a row in the
catalog's `model_versions`, and the run folder is removed.

Jobs draw their data from `CurriculumSampler.batch(step)`, which depends only on
(seed, step), and their noise from torch's global RNG, which the checkpoint carries:
a resumed run therefore takes exactly the steps the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from dataengine import versions as _versions

from . import profiling

__all__ = ["LoopConfig", "TrainJob", "TrainingInterrupted", "train", "load_weights", "latest",
           "versions", "device_of", "lr_scale"]

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = _versions.CONFIG_FILE
METRICS_FILE = _versions.METRICS_FILE
CHECKPOINT_FILE = "last.pt"


class TrainingInterrupted(RuntimeError):
    """Raised by `train(..., stop_after=k)` after k steps, as a crash would stop a run."""


@dataclass
class LoopConfig:
    """The knobs every training run shares."""

    steps: int = 200
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 50  # steps between resumable checkpoints (and one at the end)
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:1 ...
    num_threads: int | None = None  # torch CPU threads for the run; None: all cores
    progress: bool = True
    resume: bool = True  # pick up a checkpointed run of the same config (not part of its identity)
    init_from: str | None = None  # a saved version whose weights the run starts from (a fine-tune)
    profile_steps: int = 0  # profile the run's last this-many steps: metrics["profile"] (models/profiling.py)

    def __post_init__(self) -> None:
        for name in ("steps", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.profile_steps < 0:
            raise ValueError(f"profile_steps must be >= 0, got {self.profile_steps}")


def device_of(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TrainJob:
    """One model's training, as the loop sees it. Subclasses set `name` and define the
    methods below; `self.loop` and `self.device` are set by `train` before `setup()`."""

    name: str = "model"
    loop: LoopConfig
    device: torch.device

    def setup(self) -> None:
        """Build models, optimisers and data (called once, before any step or resume)."""

    def config(self) -> dict:
        """JSON-able config that identifies the run: a rerun resumes only when it is equal."""
        raise NotImplementedError

    def modules(self) -> dict[str, torch.nn.Module]:
        """Modules whose state the checkpoint carries."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimisers whose state the checkpoint carries; the loop schedules their lr."""
        raise NotImplementedError

    def step(self, step: int) -> dict[str, float]:
        """One optimisation step; returns scalars to log, including "loss"."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, Any]:
        """Held-out metrics after the last step (JSON-able)."""
        return {}

    def exported(self) -> dict[str, torch.nn.Module]:
        """The modules a saved version keeps (default: all of them)."""
        return self.modules()

    def save(self, folder: Path) -> None:
        """Write the version's model files into `folder` (default: the exported modules as
        one safetensors file, read back by `load_weights`)."""
        save_modules(folder, self.exported())

    def summary(self, metrics: dict[str, Any], history: list[dict[str, float]]) -> dict[str, Any]:
        """The version's metrics from the loop's own (and every step's logged scalars)."""
        return metrics

    def clip(self, params: Iterable[torch.nn.Parameter]) -> float:
        """Clip gradients to loop.grad_clip; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(list(params), self.loop.grad_clip))


def lr_scale(step: int, loop: LoopConfig) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio."""
    warm = min(loop.warmup_steps, max(loop.steps - 1, 0))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, loop.steps - warm)
    return loop.min_lr_ratio + (1 - loop.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------------------------------
# Versions on disk
# ---------------------------------------------------------------------------------------


def versions(models_root: str | Path, name: str) -> list[str]:
    """Saved versions of `name`, oldest first (`models.versions`, shared by every model)."""
    return _versions.versions(models_root, name)


def latest(models_root: str | Path, name: str) -> Path | None:
    """The newest version folder of `name`, or None."""
    return _versions.latest(models_root, name)


def save_modules(folder: Path, modules: dict[str, torch.nn.Module]) -> None:
    """`modules`' state dicts as one safetensors file in `folder` (read by `load_weights`)."""
    tensors = {f"{m}.{k}": v.detach().cpu().contiguous()
               for m, mod in modules.items() for k, v in mod.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"modules": json.dumps(sorted(modules))})


def _save_version(models_root: Path, name: str, modules: dict[str, torch.nn.Module], config: dict,
                  metrics: dict) -> Path:
    """Save `modules` in the next version of `name` (atomically)."""
    return _versions.save_version(models_root, name, lambda folder: save_modules(folder, modules), config, metrics)[1]


def load_weights(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """A saved version's state dicts per module name, its config and its metrics."""
    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a saved model version: no {WEIGHTS_FILE}")
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path / WEIGHTS_FILE)).items():
        module, _, param = key.partition(".")
        states.setdefault(module, {})[param] = tensor
    config = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
    metrics = json.loads((path / METRICS_FILE).read_text()) if (path / METRICS_FILE).is_file() else {}
    return states, config, metrics


def _register(catalog, record: dict[str, Any]) -> None:
    from dataengine.schema import MODEL_VERSIONS

    row = record | {"metrics": json.dumps(record["metrics"], sort_keys=True, default=str)}
    catalog.upsert("model_versions", pa.Table.from_pylist([row], schema=MODEL_VERSIONS))


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def _run_dir(models_root: Path, name: str, config: dict) -> Path:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return models_root / name / "runs" / digest


def _save_checkpoint(run_dir: Path, job: TrainJob, step: int, history: list[dict], seconds: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "modules": {k: m.state_dict() for k, m in job.modules().items()},
        "optimizers": {k: o.state_dict() for k, o in job.optimizers().items()},
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "history": history,
        "seconds": seconds,
        "config": job.config(),
    }
    tmp = run_dir / f"{CHECKPOINT_FILE}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / CHECKPOINT_FILE)


def _restore(run_dir: Path, job: TrainJob) -> tuple[int, list[dict], float] | None:
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("config") != job.config():  # a hash collision or a hand-edited file
        return None
    for k, m in job.modules().items():
        m.load_state_dict(state["modules"][k])
    for k, o in job.optimizers().items():
        o.load_state_dict(state["optimizers"][k])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["history"], state["seconds"]


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def _curve(history: list[dict], key: str = "loss", points: int = 20) -> list[list[float]]:
    """[step, mean of `key` over its window] pairs, `points` of them."""
    values = [h[key] for h in history if key in h]
    if not values:
        return []
    size = max(1, math.ceil(len(values) / points))
    return [[min(i + size, len(values)), round(sum(values[i: i + size]) / len(values[i: i + size]), 5)]
            for i in range(0, len(values), size)]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def train(job: TrainJob, models_root: str | Path, loop: LoopConfig | None = None, catalog=None,
          stop_after: int | None = None, job_id: str | None = None) -> dict[str, Any]:
    """Run `job` for loop.steps steps (resuming a checkpointed run of the same config unless
    `loop.resume` is False),
    save its exported modules as the next version of `job.name` and register it in
    `catalog` (the first version of a model is promoted, later ones are candidates).
    Returns the version's record with `metrics` as a dict and `resumed_from`."""
    loop = loop or LoopConfig()
    models_root = Path(models_root)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(loop.num_threads or os.cpu_count() or 1)
    try:
        with torch.random.fork_rng(devices=[]):
            return _train(job, models_root, loop, catalog, stop_after, job_id)
    finally:
        torch.set_num_threads(threads_before)


def _train(job: TrainJob, models_root: Path, loop: LoopConfig, catalog,
           stop_after: int | None, job_id: str | None) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    torch.manual_seed(loop.seed)
    job.loop, job.device = loop, device_of(loop.device)
    job.setup()
    config = {"job": job.config(),
              "loop": {k: v for k, v in asdict(loop).items() if k not in ("progress", "resume", "profile_steps")}}
    run_dir = _run_dir(models_root, job.name, config)
    if loop.init_from:  # a checkpoint of this run, restored below, overrides it
        states, _, _ = load_weights(loop.init_from)
        missing = [name for name in job.modules() if name not in states]
        if missing:
            raise ValueError(f"{job.name}: {loop.init_from} holds no weights for {missing}")
        for name, module in job.modules().items():
            try:
                module.load_state_dict(states[name])
            except RuntimeError as e:
                raise ValueError(f"{job.name}: {loop.init_from} does not fit this config's {name!r}: "
                                 f"{str(e).splitlines()[0]}") from e
    start, history, seconds = 0, [], 0.0
    restored = _restore(run_dir, job) if loop.resume else None
    if restored is not None:
        start, history, seconds = restored
    resumed_from = start if restored is not None else None
    optimizers = job.optimizers()
    base_lr = {(k, i): g.get("initial_lr", g["lr"]) for k, o in optimizers.items()
               for i, g in enumerate(o.param_groups)}
    for (k, i), lr in base_lr.items():
        optimizers[k].param_groups[i]["initial_lr"] = lr

    columns = (TextColumn(f"{job.name} {{task.description}}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stats]}"), TimeRemainingColumn())
    # The profiled window: the run's last profile_steps steps (caches filled, kernels warm).
    n_prof = min(loop.profile_steps, loop.steps - start)
    prof, profile = None, None
    with Progress(*columns, disable=not loop.progress) as bar:
        task = bar.add_task("resumed" if resumed_from else "", total=loop.steps, completed=start, stats="")
        for step in range(start, loop.steps):
            if stop_after is not None and step - start >= stop_after:
                raise TrainingInterrupted(f"{job.name}: stopped after {stop_after} steps at step {step}")
            if n_prof > 0 and step == loop.steps - n_prof:
                prof = profiling.start(job.device)
            scale = lr_scale(step, loop)
            for (k, i), lr in base_lr.items():
                optimizers[k].param_groups[i]["lr"] = lr * scale
            t0 = time.perf_counter()
            stats = job.step(step)
            seconds += time.perf_counter() - t0
            if "loss" not in stats or not math.isfinite(stats["loss"]):
                raise FloatingPointError(f"{job.name}: step {step} gave loss {stats.get('loss')!r}; "
                                         f"the last checkpoint is {run_dir / CHECKPOINT_FILE}")
            history.append({k: float(v) for k, v in stats.items()})
            if prof is not None and step == loop.steps - 1:
                profile, prof = profiling.stop(prof, n_prof, job.device), None
            bar.update(task, advance=1, stats=" ".join(f"{k} {_fmt(v)}" for k, v in list(stats.items())[:3]))
            if (step + 1) % loop.ckpt_every == 0 and step + 1 < loop.steps:
                _save_checkpoint(run_dir, job, step + 1, history, seconds)

    if start < loop.steps:  # the trained weights are safe before evaluation, which can fail
        _save_checkpoint(run_dir, job, loop.steps, history, seconds)
    t0 = time.perf_counter()
    evaluation = job.evaluate()
    tail = history[-max(1, len(history) // 10):]
    keys = sorted({k for h in history for k in h})
    metrics = {
        "steps": loop.steps,
        "train_seconds": round(seconds, 2),
        "steps_per_s": round(loop.steps / max(seconds, 1e-9), 3),
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "first": {k: round(history[0][k], 5) for k in history[0]} if history else {},
        "last": {k: round(sum(h[k] for h in tail if k in h) / max(1, sum(k in h for h in tail)), 5) for k in keys},
        "curves": {k: _curve(history, k) for k in keys},
        "resumed_from": resumed_from,
        "device": str(job.device),
    } | ({"profile": profile} if profile else {}) | {"eval": evaluation}
    metrics = job.summary(metrics, history)
    path = _versions.save_version(models_root, job.name, job.save, config, metrics)[1]
    shutil.rmtree(run_dir, ignore_errors=True)
    status = "promoted" if len(versions(models_root, job.name)) == 1 else "candidate"
    record = {"model": job.name, "version": path.name, "path": str(path), "status": status,
              "metrics": metrics, "job_id": job_id, "created_at": datetime.now(timezone.utc)}
    if catalog is not None:
        _register(catalog, record)
    return record | {"resumed_from": resumed_from}
