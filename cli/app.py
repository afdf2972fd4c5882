"""The `dataengine` command line: a thin edge that builds config and calls the library."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()  # before Ray, Prefect or a hub client is imported below

from dataengine.catalog import Catalog, CatalogMissing, LockRetry  # noqa: E402
from dataengine.config import ConfigError, EngineConfig, load_config  # noqa: E402
from dataengine.workspace import Workspace  # noqa: E402

app = typer.Typer(
    help=(
        "dataengine: a data engine for text-to-image model development.\n\n"
        "Start with `dataengine demo` (makes ./workspace, writes the scene world's shards, "
        "ingests them and prints what is there). Then `dataengine ingest` your own "
        "WebDataset shards and `dataengine status` to see samples and quarantine."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
# soft_wrap: a path or record id printed at the edge of an 80-column pipe stays one copyable line.
console = Console(soft_wrap=True)

WorkspaceOpt = typer.Option(
    Path("workspace"), "--workspace", "-w", envvar="DATAENGINE_WORKSPACE",
    help="Workspace folder (shards/, lake/, indexes/, models/, catalog.duckdb).",
)
ConfigOpt = typer.Option(
    None, "--config", "-c", help="TOML config; default: WORKSPACE/dataengine.toml if present."
)


def _setup(workspace: Path, config: Optional[Path], **overrides) -> tuple[Workspace, EngineConfig, Catalog]:
    ws = Workspace.at(workspace)
    try:
        cfg = load_config(config or ws.config_path, optional=config is None, **overrides)
    except ConfigError as e:
        console.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2)
    return ws, cfg, Catalog(ws, LockRetry(timeout_s=cfg.engine.lock_timeout_s))


@app.command()
def init(workspace: Path = WorkspaceOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Create a workspace (or bring an existing one's catalog up to date)."""
    ws, _, catalog = _setup(workspace, config)
    version = catalog.migrate()
    console.print(f"workspace ready at [bold]{ws.root}[/bold] (catalog schema v{version})")


@app.command()
def ingest(
    shards: List[str] = typer.Argument(..., help="Shards: paths, globs, folders or fsspec URLs."),
    workspace: Path = WorkspaceOpt,
    config: Optional[Path] = ConfigOpt,
    split: Optional[str] = typer.Option(None, help="Split to file them under; default: from shards/<split>/, else train."),
    key_prefix: Optional[str] = typer.Option(None, help="Prefix for keys (for tools that reuse keys across runs)."),
    ray: Optional[bool] = typer.Option(None, "--ray/--no-ray", help="Scan shards as Ray tasks (default) or in this process."),
    ray_address: Optional[str] = typer.Option(None, help="Join a Ray cluster ('auto', 'ray://host:10001')."),
    force: bool = typer.Option(False, help="Re-scan shards that were already ingested unchanged."),
) -> None:
    """Validate WebDataset shards into the catalog; bad samples go to quarantine with a reason."""
    from dataengine.ingest import expand_shards

    ws, cfg, catalog = _setup(
        workspace, config,
        ingest=dict(split=split, key_prefix=key_prefix, use_ray=ray, force=force or None),
        engine=dict(ray_address=ray_address),
    )
    try:
        urls = expand_shards(shards)
    except FileNotFoundError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    catalog.migrate()
    report = ingest_with_progress(ws, urls, cfg, catalog)
    console.print(
        f"ingested {report.shards} shard(s) ({report.skipped_unchanged} unchanged, skipped): "
        f"read {report.read} = accepted {report.accepted} + quarantined {report.quarantined} "
        f"in {report.seconds:.1f}s"
    )
    for url, err in report.damaged_shards:
        console.print(f"[yellow]damaged:[/yellow] {url}: {err}")


def ingest_with_progress(ws: Workspace, urls: list[str], cfg: EngineConfig, catalog: Catalog):
    from dataengine.ingest import ingest as run_ingest

    with _progress() as progress:
        task = progress.add_task("ingest", total=len(urls))
        return run_ingest(ws, urls, cfg.ingest, catalog, on_result=lambda r: progress.advance(task),
                          ray_address=cfg.engine.ray_address, num_cpus=cfg.engine.num_cpus)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


@app.command()
def status(workspace: Path = WorkspaceOpt) -> None:
    """Show what the workspace holds: tables, row counts, accounting and quarantine reasons."""
    from dataengine.status import summarize

    ws = Workspace.at(workspace)
    try:
        summary = summarize(Catalog(ws))
    except CatalogMissing as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    print_summary(summary)
    if not summary.exact:
        raise typer.Exit(1)


@app.command()
def requeue(
    workspace: Path = WorkspaceOpt,
    stage: Optional[str] = typer.Option(None, help="Only this stage's quarantine: ingest or embed (default: both)."),
    reason: Optional[str] = typer.Option(None, help="Only rows whose reason matches this regular expression "
                                                    "(case-insensitive), e.g. 'undecodable'."),
    model: str = typer.Option("default", "--model", "-m", help="Embed rows: the model to retry them with "
                                                                "(rows of other models are left alone)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would be requeued, change nothing."),
) -> None:
    """Re-run only the quarantined samples (after mending a shard or adding a decoder);
    nothing else is touched, and the accounting stays exact."""
    from dataengine.requeue import requeue as run_requeue
    from dataengine.requeue import select
    from dataengine.status import summarize

    ws = _existing(workspace)
    catalog = Catalog(ws)
    try:
        rows = select(catalog, stage, reason)
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    if dry_run or rows.num_rows == 0:
        by = {}
        for st, why in zip(rows["stage"].to_pylist(), rows["reason"].to_pylist()):
            k = (st or "ingest", why.split(":")[0])
            by[k] = by.get(k, 0) + 1
        for (st, why), n in sorted(by.items()):
            console.print(f"{st:7s} {n:6d}  {why}")
        console.print(f"{rows.num_rows} quarantined sample(s) match" + (" (dry run: nothing changed)" if dry_run else ""))
        return
    embed_keys, model_id = None, None
    if "embed" in {s or "ingest" for s in rows["stage"].to_pylist()}:
        from dataengine.embed import EmbedConfig, model_id_of
        from dataengine.embed import embed as run_embed

        from models.clip import load_clip

        model_id = model_id_of(ws, model, load_clip)

        def embed_keys(keys, kind):
            rep = run_embed(ws.root, EmbedConfig(model=model, kinds=(kind,)), keys=keys, load_encoder=load_clip)
            return rep.embedded.get(kind, 0), rep.failed.get(kind, 0)

    report = run_requeue(ws, stage, reason, catalog, embed_keys, model_id)
    console.print(report.summary())
    for why, n in sorted(report.reasons.items(), key=lambda x: -x[1]):
        console.print(f"  still failing: {n} x {why}")
    summary = summarize(catalog)
    if not summary.exact:
        for p in summary.problems:
            console.print(f"[red]accounting problem:[/red] {p}")
        raise typer.Exit(1)


def print_summary(summary) -> None:
    console.print(f"[bold]workspace[/bold] {summary.root}")
    t = Table(title="tables", show_edge=False)
    t.add_column("table")
    t.add_column("rows", justify="right")
    for name, n in summary.counts.items():
        t.add_row(name, str(n))
    console.print(t)
    s = Table(title="samples by split (read = accepted + quarantined)", show_edge=False)
    for col in ("split", "shards", "read", "accepted", "quarantined"):
        s.add_column(col, justify="left" if col == "split" else "right")
    for sp in summary.splits:
        s.add_row(sp.split, str(sp.shards), str(sp.read), str(sp.accepted), str(sp.quarantined))
    console.print(s)
    if summary.sources:
        src = Table(title="accepted samples by source and task", show_edge=False)
        for col in ("source", "task", "samples"):
            src.add_column(col, justify="right" if col == "samples" else "left")
        for source, task, n in summary.sources:
            src.add_row(source, task, str(n))
        console.print(src)
    if summary.reasons:
        q = Table(title="quarantine reasons", show_edge=False)
        q.add_column("reason")
        q.add_column("samples", justify="right")
        for reason, n in summary.reasons:
            q.add_row(reason, str(n))
        console.print(q)
    for url, err in summary.damaged_shards:
        console.print(f"[yellow]damaged shard[/yellow] {url}: {err}")
    if summary.exact:
        console.print("accounting: [green]exact[/green] (every sample read is accepted or quarantined)")
    else:
        for p in summary.problems:
            console.print(f"[red]accounting problem:[/red] {p}")


@app.command()
def sceneworld(
    workspace: Path = WorkspaceOpt,
    config: Optional[Path] = ConfigOpt,
    seed: Optional[int] = typer.Option(None, help="Seed (same seed, same bytes)."),
    n_train: Optional[int] = typer.Option(None, help="Samples in train/."),
    n_pool: Optional[int] = typer.Option(None, help="Samples in pool/ (holds the held-out concepts)."),
    n_eval: Optional[int] = typer.Option(None, help="Samples in eval/."),
    resolution: Optional[int] = typer.Option(None, help="Render every image at this size (default: a mix, 64-1024 px)."),
) -> None:
    """Write the scene world's shards (synthetic scenes with ground truth) into WORKSPACE/shards."""
    from dataengine.sceneworld import SceneWorldConfig, write_scene_world

    ws, cfg, catalog = _setup(workspace, config, sceneworld=dict(
        seed=seed, n_train=n_train, n_pool=n_pool, n_eval=n_eval, resolution=resolution))
    catalog.migrate()
    written = write_scene_world(ws.shards, SceneWorldConfig(**cfg.sceneworld))
    for split, paths in written.items():
        console.print(f"{split}: {len(paths)} shard(s) in {ws.shards / split}")


@app.command("import-real")
def import_real(
    workspace: Path = WorkspaceOpt,
    split: str = typer.Option("train", help="Split folder to write the shards into."),
    stamps: Optional[Path] = typer.Option(None, help="Tux Paint stamps folder (default: searched)."),
) -> None:
    """Write real captioned photographs that install offline (Tux Paint stamps, scikit-image) as shards."""
    from connectors import skimage_samples, tuxpaint

    ws = Workspace.at(workspace)
    ws.create_dirs()
    out = ws.shards / split
    root = tuxpaint.find_stamps_root(stamps)
    if root is None:
        console.print("[yellow]no Tux Paint stamps found[/yellow] (run scripts/fetch_tuxpaint.sh)")
    else:
        console.print(f"tuxpaint: {tuxpaint.write_shards(root, out).summary()}")
    console.print(f"scikit-image: {skimage_samples.write_shards(out).summary()}")


@app.command()
def degrade(
    files: List[Path] = typer.Argument(None, help="Caption files: text (one a line) or JSONL (a `caption` field). Default: the workspace's samples."),
    workspace: Path = WorkspaceOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write pairs to this JSONL file instead of the workspace's lake."),
    split: Optional[str] = typer.Option("train", help="With no files: the samples split to read ('' for all)."),
    policy: str = typer.Option("random", help="Order of removal: random (seeded) or fixed."),
    seed: int = typer.Option(0, help="Seed of the random policy."),
    granularity: str = typer.Option("category", help="Remove one category (category) or one span (span) per step."),
    ray: bool = typer.Option(False, "--ray/--no-ray", help="Run the batches as Ray Data tasks."),
    batch_size: int = typer.Option(2048, help="Captions per batch."),
    rewriter: Optional[str] = typer.Option(None, help="A local causal LM folder that paraphrases each chain's terse end (off by default)."),
) -> None:
    """Degrade rich captions step by step into terse prompts; every step is an enhancer pair."""
    from dataengine.degrade import DegradeConfig
    from dataengine.degrade.run import captions_from_samples, degrade_to_jsonl, degrade_to_lake, read_caption_files

    try:
        cfg = DegradeConfig(policy=policy, seed=seed, granularity=granularity)
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    ws = Workspace.at(workspace)
    catalog = Catalog(ws)
    if files:
        try:
            captions, bad = read_caption_files(files)
        except (FileNotFoundError, ValueError) as e:
            console.print(f"[red]{e}[/red]")
            raise typer.Exit(2)
        for where, reason in bad[:10]:
            console.print(f"[yellow]skipped[/yellow] {where}: {reason}")
        if bad:
            console.print(f"[yellow]{len(bad)} line(s) skipped[/yellow]")
    else:
        if not ws.exists():
            console.print(f"[red]no catalog at {ws.catalog_path}[/red]; pass caption files or run `dataengine demo`")
            raise typer.Exit(2)
        captions = captions_from_samples(catalog, split or None)
    with _progress() as progress:
        task = progress.add_task("degrade", total=captions.num_rows)
        run = dict(use_ray=ray, batch_size=batch_size, on_batch=lambda n: progress.advance(task, n),
                   rewriter_path=rewriter)
        if out:
            report = degrade_to_jsonl(out, captions, cfg, **run)
        else:
            catalog.migrate()
            report = degrade_to_lake(catalog, captions, cfg, **run)
    console.print(
        f"{report.captions} caption(s) -> {report.pairs_made} pair(s) "
        f"({report.pairs_per_caption:.2f} per caption; {report.no_detail} with no detail to remove), "
        f"{report.duplicates} duplicate(s) dropped, {report.pairs_written} written to "
        f"{out or 'the lake (pairs)'} in {report.seconds:.1f}s"
    )
    if rewriter:
        chains = report.captions - report.no_detail
        console.print(f"rewriter: {report.rewrites} of {chains} chain ends paraphrased, "
                      f"{chains - report.rewrites} rewrites rejected (subject lost or longer)")


@app.command("train-enhancer")
def train_enhancer(
    workspace: Path = WorkspaceOpt,
    size: str = typer.Option("nano", help="Model size: nano, tiny or small (see models/enhancer.py)."),
    steps: int = typer.Option(600, help="Optimiser steps."),
    batch_size: int = typer.Option(32, help="Pairs per step."),
    lr: float = typer.Option(3e-3, help="Peak learning rate."),
    base: Optional[str] = typer.Option(None, help="Fine-tune this model instead (a saved version or a local causal LM folder)."),
    seed: int = typer.Option(0),
) -> None:
    """Train the prompt enhancer on the workspace's pairs; saves a new version under models/."""
    import pyarrow as pa

    from dataengine.schema import MODEL_VERSIONS
    from models.train_enhancer import EnhancerTrainConfig, train

    ws = Workspace.at(workspace)
    catalog = Catalog(ws)
    if not ws.exists() or catalog.query("SELECT count(*) n FROM pairs")["n"][0].as_py() == 0:
        console.print("[red]no pairs in the workspace[/red]; run `dataengine degrade` first")
        raise typer.Exit(2)
    pairs = catalog.query("SELECT * FROM pairs ORDER BY pair_id")
    record = train(pairs, ws.models, EnhancerTrainConfig(size=size, steps=steps, batch_size=batch_size, lr=lr,
                                                         seed=seed, num_threads=os.cpu_count()), base=base)
    catalog.upsert("model_versions", pa.Table.from_pylist([record], schema=MODEL_VERSIONS))
    console.print(f"enhancer {record['version']} saved at {record['path']}")
    console.print(record["metrics"])


@app.command()
def enhance(
    prompts: List[str] = typer.Argument(..., help="Terse prompts to enrich."),
    workspace: Path = WorkspaceOpt,
    model: Optional[str] = typer.Option(None, help="A saved version folder (phase one or two) or local causal LM; "
                                                   "default: the workspace's newest promoted enhancer, phase two included."),
    max_new_tokens: int = typer.Option(160),
    keep_words: bool = typer.Option(True, help="Keep the prompt's words in order and only insert detail."),
    guard: bool = typer.Option(True, help="Cut inserted styles, lights and backgrounds the prompt already gives."),
) -> None:
    """Print the enhanced (rich) prompt for each terse prompt."""
    from models.enhancer import enhance as run_enhance
    from models.enhancer_rl import load_enhancer, resolve_enhancer

    path = model
    if path is None:
        try:
            found, name, status = resolve_enhancer(workspace)
        except FileNotFoundError:
            console.print("[red]no enhancer in the workspace[/red]; run `dataengine train-enhancer` or pass --model")
            raise typer.Exit(2)
        console.print(f"[dim]{name} {found.name} ({status})[/dim]")
        path = str(found)
    lm, tok = load_enhancer(path)
    for prompt, rich in zip(prompts, run_enhance(lm, tok, list(prompts), max_new_tokens=max_new_tokens,
                                                 keep_words=keep_words, guard=guard)):
        console.print(f"[bold]{prompt}[/bold]\n  -> {rich}")


@app.command("train-clip")
def train_clip(
    workspace: Path = WorkspaceOpt,
    steps: Optional[int] = typer.Option(None, help="Optimiser steps (default: models/train_clip.py's)."),
    retrain: bool = typer.Option(False, help="Train a new version even if one exists."),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Pick up a crashed run of the same config."),
) -> None:
    """Train the embedded default embedding model on the workspace's images and captions (once)."""
    from models.train_clip import ClipTrainConfig, train_default_clip

    ws = _existing(workspace)
    cfg = ClipTrainConfig(seed=seed, **({"steps": steps} if steps else {}))
    record = train_default_clip(ws.root, cfg, progress=True, reuse=not retrain, resume=resume)
    console.print(f"clip {record['version']} at {record['path']}")
    _print_recall(record.get("metrics", {}))


def _print_recall(metrics: dict) -> None:
    """The held-out text->image recall table that train_default_clip measured."""
    from models.train_clip import format_table

    if isinstance(metrics, dict) and metrics.get("heldout"):
        console.print(format_table(metrics), markup=False)


def _existing(workspace: Path) -> Workspace:
    ws = Workspace.at(workspace)
    if not ws.exists():
        console.print(f"[red]no workspace at {ws.root}[/red]; run `dataengine init` and `dataengine ingest` first")
        raise typer.Exit(2)
    Catalog(ws).migrate()
    return ws


ModelOpt = typer.Option("default", "--model", "-m", help=(
    "Embedding model: 'default' (the workspace's own, trained on first use), an open_clip "
    "architecture, 'ARCH:pretrained_tag', 'hf-hub:org/name', a saved folder, or 'ARCH@/path/ckpt'."))


@app.command()
def embed(
    workspace: Path = WorkspaceOpt,
    model: str = ModelOpt,
    kinds: List[str] = typer.Option(["image", "text"], "--kind", help="image and/or text (captions)."),
    splits: List[str] = typer.Option([], "--split", help="Only these splits (default: all)."),
    batch_size: int = typer.Option(64, help="Images or captions per model call."),
    ray: bool = typer.Option(True, "--ray/--no-ray", help="Ray Data actor pool (default) or this process."),
    ray_min_rows: int = typer.Option(1000, help="A kind with fewer rows to embed runs in this process "
                                                "(an actor pool takes ~20 s to start); 0: always Ray."),
    ray_address: Optional[str] = typer.Option(None, help="Join a Ray cluster ('auto', 'ray://host:10001')."),
    actors: Optional[int] = typer.Option(None, help="Model replicas (default: one per GPU, else CPUs - 1)."),
) -> None:
    """Embed images and captions that have no vector yet for this model into the lake."""
    from dataengine.embed import EmbedConfig
    from dataengine.embed import embed as run_embed
    from models.clip import load_clip

    ws = _existing(workspace)
    if model == "default":
        _ensure_default_clip(ws)
    try:
        cfg = EmbedConfig(model=model, kinds=tuple(kinds), splits=tuple(splits) or None, batch_size=batch_size,
                          use_ray=ray, ray_min_rows=ray_min_rows, ray_address=ray_address, actors=actors)
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    report = run_embed(ws.root, cfg, load_encoder=load_clip)
    console.print(report.summary())


def _ensure_default_clip(ws: Workspace) -> None:
    from dataengine.embed import resolve_model

    try:
        resolve_model(ws, "default")
    except FileNotFoundError:
        console.print("no default embedding model in this workspace yet: training it once")
        from models.train_clip import ClipTrainConfig, train_default_clip

        record = train_default_clip(ws.root, ClipTrainConfig(), progress=True, reuse=True)
        _print_recall(record.get("metrics", {}))


@app.command()
def index(
    workspace: Path = WorkspaceOpt,
    model: str = ModelOpt,
    splits: List[str] = typer.Option(["train", "pool"], "--split", help="Splits to index (image vectors)."),
    kind: str = typer.Option("auto", help="auto (Flat when small, IVF family when large) or a faiss factory string."),
    target_recall: float = typer.Option(0.95, help="recall@10 against exact search that tuning must reach."),
    ray: bool = typer.Option(False, "--ray/--no-ray", help="Add vectors in parallel Ray tasks (large sets)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Build afresh instead of growing the saved index."),
    memory_budget_mb: Optional[int] = typer.Option(None, help="Bound on the memory building takes (vectors stream in chunks)."),
) -> None:
    """Grow each split's FAISS index by its new vectors (or build it), and the training split's coverage statistics."""
    from dataengine.gaps import build_workspace_indexes
    from models.clip import load_clip
    from dataengine.index import IndexConfig

    ws = _existing(workspace)
    try:
        cfg = IndexConfig(kind=kind, target_recall=target_recall, memory_budget_mb=memory_budget_mb)
        built = build_workspace_indexes(ws, model, tuple(splits), cfg, use_ray=ray, rebuild=rebuild,
                                        load_encoder=load_clip)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    t = Table(title="indexes", show_edge=False)
    for col in ("split", "vectors", "update", "index", "params", "recall@10", "seconds"):
        t.add_column(col)
    for split, b in built.items():
        m = b.meta
        last = (m.get("history") or [{}])[-1]
        recall = "-" if m.get("recall_at_k") is None else f"{m['recall_at_k']:.3f}"
        seconds = "-" if m.get("update") == "up to date" else f"{last.get('seconds', m['build_seconds']):.1f}"
        t.add_row(split, str(m["count"]), m.get("update", "built"), m["factory"], str(m.get("params", {})),
                  recall, seconds)
    console.print(t)
    for split, b in built.items():
        if b.meta.get("rebuild_proposed"):
            console.print(f"[yellow]{split}: rebuild proposed: {b.meta['rebuild_reason']} "
                          "(`dataengine index --rebuild`)[/yellow]")


@app.command()
def gaps(
    prompts: List[str] = typer.Argument(None, help="Failing prompts or concepts, e.g. \"a purple triangle\"."),
    workspace: Path = WorkspaceOpt,
    model: str = ModelOpt,
    image: List[Path] = typer.Option([], "--image", help="Images of failed outputs (instead of or besides prompts)."),
    evidence: int = typer.Option(5, help="Nearest training samples to show per query."),
) -> None:
    """How well does the training set cover each prompt or image? Prints the gap score and evidence."""
    from dataengine.gaps import GapSearcher
    from models.clip import load_clip

    ws = _existing(workspace)
    if not prompts and not image:
        console.print("[red]give at least one prompt or --image[/red]")
        raise typer.Exit(2)
    try:
        searcher = GapSearcher(ws, model, evidence=evidence, load_encoder=load_clip)
        reports = (searcher.prompts(prompts)[0] if prompts else []) + (searcher.images(image)[0] if image else [])
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    for r in reports:
        _print_gap(r)


def _print_gap(r) -> None:
    verdict = "[red]GAP[/red]" if r.is_gap else "[green]covered[/green]"
    console.print(f"\n[bold]{r.concept}[/bold] ({r.kind}): {verdict}  gap score {r.gap_score:.3f} "
                  f"(covered better than {r.percentile:.1%} of the set's own queries; a gap below "
                  f"{r.threshold:.1%})")
    console.print(f"  coverage against the pool: {r.explain()}")
    c = r.cluster
    console.print(f"  nearest cluster #{c['id']}: {c['size']} images ({c['relative_size']:.2f}x the median "
                  f"{c['median_size']:.0f}), similarity {c['similarity']:.3f}")
    for n in r.neighbours:
        console.print(f"  {n.similarity:.3f}  {n.key}  {n.caption[:90]}")


@app.command()
def patch(
    prompts: List[str] = typer.Argument(..., help="Failing prompts or concepts to patch when they are gaps."),
    workspace: Path = WorkspaceOpt,
    model: str = ModelOpt,
    size: int = typer.Option(32, help="At most this many pool samples per gap."),
    min_similarity: Optional[float] = typer.Option(None, help="Similarity cut-off (default: the query's mean similarity to its nearest train images)."),
    duplicate_similarity: float = typer.Option(0.97, help="Image cosine at or above which a candidate duplicates train."),
    force: bool = typer.Option(False, help="Patch even prompts that are not gaps."),
    feedback_id: Optional[str] = typer.Option(None, help="The failure this patch answers (provenance)."),
) -> None:
    """Gap search, then a patch shard of pool samples for each gap (shards/patches/), recorded in the lake."""
    from dataengine.gaps import GapSearcher
    from models.clip import load_clip
    from dataengine.patch import PatchConfig, patch_found_gap

    ws = _existing(workspace)
    try:
        cfg = PatchConfig(size=size, min_similarity=min_similarity, duplicate_similarity=duplicate_similarity)
        searcher = GapSearcher(ws, model, load_encoder=load_clip)
        reports, vecs = searcher.prompts(prompts, [feedback_id] * len(prompts) if feedback_id else None)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    for r, v in zip(reports, vecs):
        _print_gap(r)
        if not (r.is_gap or force):
            console.print("  not a gap: nothing to patch (--force to patch anyway)")
            continue
        console.print("  patch: " + patch_found_gap(searcher, r, v, cfg).summary())


feedback_app = typer.Typer(
    help="Take in failure and rating records (README: 'Feedback records'): from files, a watched "
         "folder or an HTTP endpoint on 127.0.0.1. Each id is stored once; a bad record is "
         "quarantined with its line and field.",
    no_args_is_help=True,
)
app.add_typer(feedback_app, name="feedback")


def _print_intake(r, label: str = "") -> None:
    console.print(f"{label}received {r.received}: stored {r.accepted}, duplicates {r.duplicates}, "
                  f"quarantined {r.quarantined}")
    for line in r.errors[:20]:
        console.print(f"  [yellow]quarantined[/yellow] {line}")
    if len(r.errors) > 20:
        console.print(f"  ... and {len(r.errors) - 20} more (dataengine status; the quarantine table, stage 'feedback')")


def _feedback_ws(workspace: Path) -> Workspace:
    ws, _, catalog = _setup(workspace, None)
    catalog.migrate()  # the feedback table may be newer than the workspace
    return ws


@feedback_app.command("ingest")
def feedback_ingest(
    files: List[Path] = typer.Argument(..., help="JSONL or Parquet files of feedback records."),
    workspace: Path = WorkspaceOpt,
) -> None:
    """Store the records of FILES (relative image paths resolve against each file's folder)."""
    from connectors.feedback import ingest_files

    ws = _feedback_ws(workspace)
    try:
        report = ingest_files(ws, [str(f) for f in files])
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    _print_intake(report)


@feedback_app.command("watch")
def feedback_watch(
    folder: Path = typer.Argument(..., help="Folder to watch for new .jsonl/.parquet files."),
    workspace: Path = WorkspaceOpt,
    interval: float = typer.Option(2.0, help="Seconds between looks at the folder."),
    once: bool = typer.Option(False, help="Look twice (a file must stop growing), ingest, and exit."),
) -> None:
    """Ingest each feedback file that appears in FOLDER, once it has stopped growing."""
    from connectors.feedback import FolderWatcher

    ws = _feedback_ws(workspace)
    try:
        watcher = FolderWatcher(ws, folder)
    except NotADirectoryError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    if once:
        watcher.poll()
        _print_intake(watcher.poll())
        return
    console.print(f"watching {folder} every {interval:g}s (Ctrl-C to stop)")
    try:
        watcher.run(interval, on_report=lambda r: _print_intake(r, "new files: "))
    except KeyboardInterrupt:
        pass


@feedback_app.command("serve")
def feedback_serve(
    workspace: Path = WorkspaceOpt,
    host: str = typer.Option("127.0.0.1", help="Address to bind; loopback only unless --allow-remote."),
    port: int = typer.Option(8765),
    allow_remote: bool = typer.Option(False, help="Allow a non-loopback bind (no authentication: put it behind one)."),
    base: Optional[Path] = typer.Option(None, help="Folder that relative image paths resolve against (default: refuse them)."),
) -> None:
    """Serve POST /feedback (a record, a JSON array, or JSON lines) and GET /health."""
    from connectors.feedback import NonLoopbackBind, make_server

    ws = _feedback_ws(workspace)
    try:
        server = make_server(ws, host, port, allow_remote, base.resolve() if base else None)
    except (NonLoopbackBind, OSError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    console.print(f"feedback endpoint: http://{host}:{server.server_address[1]}/feedback (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@app.command()
def triage(
    workspace: Path = WorkspaceOpt,
    model: str = typer.Option("default", "--model", "-m", help="Embedding model whose indexes gap search reads."),
    retriage: bool = typer.Option(False, help="Triage every failure again, not only the new ones."),
    limit: Optional[int] = typer.Option(None, help="At most this many failures (oldest first)."),
    score: bool = typer.Option(True, help="Score failures without logged scores with the workspace's reward heads."),
) -> None:
    """Bin each untriaged failure (rating 1-2, or none) into rl / knowledge / prompt, with evidence."""
    from dataengine.triage_run import triage_workspace
    from models.clip import load_clip
    from models.feedback_rewards import WorkspaceRewards

    ws = _existing(workspace)
    r = triage_workspace(ws, model, retriage=retriage, limit=limit, load_encoder=load_clip,
                         scorer=WorkspaceRewards if score else None)
    if not r.failures:
        console.print("no untriaged failures (dataengine feedback ingest FILE; --retriage to redo)")
        return
    console.print(f"triaged {r.triaged} failures with {r.triager}: "
                  + ", ".join(f"{c} {n}" for c, n in r.by_cause.items()))
    for name, how in r.signals.items():
        console.print(f"  {name}: {how}")
    for line in r.examples:
        console.print(f"  {line}")


@app.command("triage-learn")
def triage_learn(
    workspace: Path = WorkspaceOpt,
    min_reviews: int = typer.Option(30, help="Reviews needed to train on (a third as many more are held out)."),
) -> None:
    """Train a triager on curators' reviews; it replaces the rules only if it beats them on held-out reviews."""
    from dataengine.triage_run import learn_triager

    ws = _existing(workspace)
    m = learn_triager(ws, min_reviews)
    if m["version"] is None:
        console.print(f"no triager trained: {m['why']}")
        return
    console.print(f"triager {m['version']} ({m['status']}): {m['why']}")


AutoApproveOpt = typer.Option(False, help="Approve every remedy that needs no edit (stands in for a curator).")
DitStepsOpt = typer.Option(40, help="Fine-tune steps of a knowledge job's DiT (0: apply the patches only).")


@app.command()
def remedies(
    workspace: Path = WorkspaceOpt,
    auto_approve: bool = AutoApproveOpt,
    patch_size: int = typer.Option(32, help="At most this many pool samples per missing concept's patch."),
) -> None:
    """Queue a remedy for each triaged failure none answers yet (review them with `dataengine review`)."""
    from dataengine.remedies import approve_all, propose
    from models.clip import load_clip

    ws = _existing(workspace)
    try:
        r = propose(ws, patch_size=patch_size, load_encoder=load_clip)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    console.print("queued: " + ", ".join(f"{c} {r.made[c]} ({r.failures[c]} failures)" for c in r.made))
    for t in r.titles[:15]:
        console.print(f"  {t}")
    if auto_approve:
        console.print(f"auto-approved {approve_all(ws)} remedies")


@app.command()
def review(
    remedy_id: str = typer.Argument(..., help="The remedy (dataengine status lists the queue's size)."),
    verdict: str = typer.Argument(..., help="approve | reject | edit"),
    workspace: Path = WorkspaceOpt,
    curator: str = typer.Option(os.environ.get("USER", "curator"), help="Who decided."),
    note: Optional[str] = typer.Option(None),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="edit: proposal FIELD=VALUE (e.g. more='...')."),
) -> None:
    """A curator's verdict on one queued remedy."""
    from dataengine.remedies import RemedyError, decide

    ws = _existing(workspace)
    edit = dict(item.split("=", 1) for item in set_ or [])
    try:
        row = decide(ws, remedy_id, verdict, curator, note, edit or None)
    except RemedyError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    console.print(f"{remedy_id}: {row['status']} ({row['title']})")


@app.command()
def triggers(
    workspace: Path = WorkspaceOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what each policy would fire and why; fire nothing."),
) -> None:
    """Evaluate the retrain policies (approved remedies, failure rate over a window, cooldown); queue jobs."""
    from dataengine.triggers import check

    ws = _existing(workspace)
    for v in check(ws, dry_run=dry_run):
        state = ("[green]FIRES[/green]" if dry_run else f"[green]fired {v.job_id}[/green]") if v.fire else "waits"
        console.print(f"{v.cause:<10} {state}: {v.why}")


@app.command("run-jobs")
def run_jobs(
    workspace: Path = WorkspaceOpt,
    dit_steps: int = DitStepsOpt,
    min_fixed: float = typer.Option(0.5, help="Share of its failures a new version must fix to be promoted."),
) -> None:
    """Run the queued retrain jobs the triggers fired; a new version is promoted only through the gate."""
    from models.jobs import JobConfig, run_queued

    ws = _existing(workspace)
    jobs = run_queued(ws, JobConfig(min_fixed=min_fixed, dit_steps=dit_steps))
    if not jobs:
        console.print("no queued jobs (dataengine triggers fires them)")
    for j in jobs:
        console.print(f"{j['job_id']}: {j['status']}" + (f" ({j['note']})" if j.get("note") else ""))
        if j.get("result"):
            console.print(f"  {j['result']}")


@app.command()
def loop(
    workspace: Path = WorkspaceOpt,
    auto_approve: bool = AutoApproveOpt,
    min_approved: int = typer.Option(20, help="Approved remedies of a cause that fire its retrain job."),
    dit_steps: int = DitStepsOpt,
) -> None:
    """One turn: triage -> remedies -> triggers -> jobs -> the failures triaged again; counts per cause."""
    from dataengine.triage import CAUSES
    from dataengine.triggers import TriggerConfig, TriggerPolicy
    from flows.loop import loop_turn
    from models.jobs import JobConfig

    ws = _existing(workspace)
    policy = TriggerPolicy(min_approved=min_approved)
    r = loop_turn(str(ws.root), auto_approve, TriggerConfig(policy, policy, policy), JobConfig(dit_steps=dit_steps))
    console.print(f"triaged {sum(r.triaged.values())} new failures; remedies queued "
                  + ", ".join(f"{c} {n}" for c, n in r.remedies.items()) + f"; approved {r.approved}")
    for line in r.fired or ["no trigger fired"]:
        console.print(f"  fired {line}" if r.fired else f"  {line}")
    for j in r.jobs:
        res = j["result"] or {}
        made = res["dit"] if isinstance(res.get("dit"), dict) else res  # a knowledge job's model is its DiT
        console.print(f"  job {j['job_id']}: {j['status']} {j['note'] or ''}"
                      + (f"; fixed {res['fixed_share']:.0%} of its measured failures" if "fixed_share" in res else "")
                      + (f"; {made.get('version')} {'promoted' if made.get('promoted') else 'not promoted'}: "
                         f"{made['gate']}" if made.get("gate") else ""))
    if r.confusion:
        console.print("injected cause -> triaged (rl / knowledge / prompt):")
        for t in CAUSES:
            console.print(f"  {t:<10} " + " / ".join(str(r.confusion[t][p]) for p in CAUSES))
    console.print("failures per cause, before -> after the turn: "
                  + ", ".join(f"{c} {r.before[c]} -> {r.after[c]}" for c in CAUSES))


train_app = typer.Typer(
    help="Train a model of the stack on the workspace; each run saves a versioned checkpoint to "
         "models/<name>/vNNNN, registers it in model_versions and resumes after a crash.",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")


def _print_record(record: dict) -> None:
    """A saved version's path, its loss at start and end, and its held-out metrics."""
    m = record["metrics"]
    console.print(f"{record['model']} {record['version']} ({record['status']}) at {record['path']}"
                  + (f", resumed from step {record['resumed_from']}" if record.get("resumed_from") else ""))
    table = Table("metric", "value")
    table.add_row("steps", f"{m['steps']} in {m['train_seconds']} s ({m['steps_per_s']} steps/s)")
    for key in m.get("first", {}):
        table.add_row(f"train {key}", f"{m['first'][key]:.4g} -> {m['last'].get(key, float('nan')):.4g}")
    for key, value in _flatten(m.get("eval", {})).items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def _train_command(name: str, what: str):
    def command(
        workspace: Path = WorkspaceOpt,
        steps: Optional[int] = typer.Option(None, help="Optimiser steps (default: the model's own)."),
        lr: Optional[float] = typer.Option(None, help="Peak learning rate, warmup then cosine (default: the model's)."),
        seed: int = typer.Option(0),
        ckpt_every: int = typer.Option(50, help="Steps between resumable checkpoints."),
        device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
        resume: bool = typer.Option(True, "--resume/--no-resume", help="Pick up a crashed run of the same config."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="Config override KEY=VALUE (repeatable)."),
        show_config: bool = typer.Option(False, "--show-config", help="Print the config's fields and exit."),
        profile: int = typer.Option(0, "--profile", min=0, metavar="STEPS",
                                    help="Profile the run's last STEPS steps: where a step's time goes "
                                         "(printed, and kept in the version's metrics)."),
    ) -> None:
        import dataclasses

        from models.stack import ConfigError, config_for, default_loop, parse_overrides, train_model

        try:
            overrides = parse_overrides(set_)
            cfg = config_for(name, overrides)
        except ConfigError as e:
            console.print(f"[red]{e}[/red]")
            raise typer.Exit(2)
        if show_config:
            for f in dataclasses.fields(cfg):
                console.print(f"{f.name} = {getattr(cfg, f.name)!r}")
            return
        ws = _existing(workspace)
        loop = default_loop(name, **{k: v for k, v in dict(steps=steps, lr=lr).items() if v is not None},
                            seed=seed, ckpt_every=ckpt_every, device=device, resume=resume, profile_steps=profile)
        try:
            record = train_model(name, ws.root, overrides, loop)
        except (FileNotFoundError, ValueError) as e:  # a missing prerequisite version or bad data
            console.print(f"[red]{name}:[/red] {e}")
            raise typer.Exit(2)
        _print_record(record)
        if record["metrics"].get("profile"):
            from models.profiling import render

            console.print(render(record["metrics"]["profile"], name), markup=False, highlight=False)

    command.__doc__ = f"Train {what}."
    return command


def _register_train_commands() -> None:
    from models.stack import TRAINERS

    for name, (*_, what) in TRAINERS.items():
        train_app.command(name)(_train_command(name, what))
    train_app.command("clip", help="Train the default embedding model (same as train-clip).")(train_clip)
    train_app.command("enhancer", help="Train enhancer phase one on the pairs (same as train-enhancer).")(
        train_enhancer)


_register_train_commands()


@app.command()
def demo(
    workspace: Path = WorkspaceOpt,
    config: Optional[Path] = ConfigOpt,
    fresh: bool = typer.Option(False, help="Delete the workspace first."),
    ray: bool = typer.Option(True, "--ray/--no-ray", help="Scan shards on Ray (default) or in-process."),
    loop: bool = typer.Option(True, "--loop/--no-loop",
                              help="Run one turn of the self-correcting loop on injected failures."),
    stack: bool = typer.Option(False, "--stack/--no-stack",
                               help="Also train each model of the stack briefly (VAE, DiT, rewards, distill, RL, "
                                    "enhancer phase two) and print its figures (about 2 more minutes)."),
) -> None:
    """The main job: a workspace from nothing through ingest, enhancer pairs, embeddings,
    gap search and patching, and one turn of the self-correcting loop (--stack: a brief run
    of each model of the stack too)."""
    ws, cfg, _ = _setup(workspace, config, ingest=dict(use_ray=ray))
    if fresh and ws.root.exists():
        if not ws.exists() and any(ws.root.iterdir()):
            # --fresh deletes a workspace, never a folder that merely got named by mistake.
            console.print(f"[red]--fresh refuses to delete {ws.root}: it is not a dataengine workspace "
                          f"(no {ws.catalog_path.name}) and not empty[/red]")
            raise typer.Exit(2)
        shutil.rmtree(ws.root)
    from flows.demo import demo_flow

    summary = demo_flow(str(ws.root), cfg, train_stack=stack, loop=loop)
    print_summary(summary)
    if not summary.exact:
        raise typer.Exit(1)


users_app = typer.Typer(help="Dashboard users: who may sign in, as viewer, curator or admin.", no_args_is_help=True)
app.add_typer(users_app, name="users")


@users_app.command("add")
def users_add(
    username: str = typer.Argument(...),
    role: str = typer.Option("curator", help="viewer (reads) | curator (reviews) | admin (users, triggers)."),
    workspace: Path = WorkspaceOpt,
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from stdin (scripts)."),
    replace: bool = typer.Option(False, help="Reset an existing user's password and role."),
) -> None:
    """Add a user; the password is asked for (twice) unless --password-stdin, and stored as an argon2id hash."""
    import sys

    from dataengine.accounts import AccountError, add_user

    ws = _existing(workspace)
    password = (sys.stdin.readline().rstrip("\n") if password_stdin
                else typer.prompt("Password", hide_input=True, confirmation_prompt=True))
    try:
        user = add_user(Catalog(ws), username, password, role, created_by=os.environ.get("USER", "cli"),
                        replace=replace)
    except AccountError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    console.print(f"{user.username}: {user.role}")


@users_app.command("remove")
def users_remove(username: str = typer.Argument(...), workspace: Path = WorkspaceOpt) -> None:
    """Remove a user; their open sessions can do nothing more, their claims are freed."""
    from dataengine.accounts import AccountError, remove_user

    try:
        remove_user(Catalog(_existing(workspace)), username)
    except AccountError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    console.print(f"removed {username}")


@users_app.command("list")
def users_list(workspace: Path = WorkspaceOpt) -> None:
    from dataengine.accounts import list_users

    for u in list_users(Catalog(_existing(workspace))):
        console.print(f"{u['username']:<24} {u['role']:<8} added by {u['created_by']} {u['created_at']:%Y-%m-%d}")


@app.command()
def dashboard(
    workspace: Path = WorkspaceOpt,
    host: str = typer.Option("127.0.0.1", help="Listen address (loopback unless --allow-remote)."),
    port: int = typer.Option(8501),
    allow_remote: bool = typer.Option(False, help="Allow a non-loopback --host (put TLS in front of it)."),
) -> None:
    """The curators' dashboard (Streamlit) over the workspace's catalog; sign in with a `dataengine users` account."""
    import subprocess
    import sys

    from dataengine.accounts import list_users

    ws = _existing(workspace)
    Catalog(ws).migrate()
    if host not in ("127.0.0.1", "localhost", "::1") and not allow_remote:
        console.print(f"[red]{host} is not loopback: pass --allow-remote to listen there[/red]")
        raise typer.Exit(2)
    if not list_users(Catalog(ws)):
        console.print("[yellow]no users yet: add one with `dataengine users add NAME --role admin`[/yellow]")
    app_path = Path(__file__).resolve().parents[1] / "dashboards" / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path), "--server.address", host,
           "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal"]
    console.print(f"dashboard on http://{host}:{port} (Ctrl-C stops it)")
    try:
        raise typer.Exit(subprocess.call(cmd, env=dict(os.environ, DATAENGINE_WORKSPACE=str(ws.root))))
    except KeyboardInterrupt:
        pass


server_app = typer.Typer(
    help="A Prefect server and a Ray head on this machine (loopback by default), so flows and "
         "workers share one server instead of each starting a temporary one.",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")
HomeOpt = typer.Option(None, "--home", envvar="DATAENGINE_HOME",
                       help="Where the server keeps its database, log and pid (default ~/.dataengine).")


@server_app.command("start")
def server_start(
    host: str = typer.Option("127.0.0.1", help="Listen address (loopback unless --allow-remote)."),
    port: int = typer.Option(4200, help="Prefect API port."),
    ray: bool = typer.Option(True, "--ray/--no-ray", help="Start a Ray head too."),
    ray_port: int = typer.Option(6379, help="Ray head port."),
    allow_remote: bool = typer.Option(False, help="Allow a non-loopback --host."),
    home: Optional[Path] = HomeOpt,
) -> None:
    """Start both, print their addresses, and stop both on Ctrl-C or SIGTERM (or `dataengine server stop`)."""
    import signal
    import time

    from flows import server

    try:
        s = server.start(host, port, ray, ray_port, home, allow_remote)
    except server.ServerError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    console.print(f"prefect  {s.prefect_url}  (pid {s.prefect_pid}, log {s.log})")
    if s.ray_address:
        console.print(f"ray      {s.ray_address}")
    console.print("for flows and workers: " + " ".join(f"{k}={v}" for k, v in s.env().items()))

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)  # also where a shell started us with SIGINT ignored
    try:
        while server._alive(s.prefect_pid):
            time.sleep(1)
        console.print("the server stopped")
    except KeyboardInterrupt:
        server.stop(s.home)
        console.print("stopped")


@server_app.command("stop")
def server_stop(home: Optional[Path] = HomeOpt) -> None:
    """Stop the server (and Ray head) `dataengine server start` started."""
    from flows import server

    try:
        s = server.stop(home)
    except server.ServerError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    console.print(f"stopped prefect (pid {s.prefect_pid})" + (" and the ray head" if s.ray_address else ""))


@app.command()
def deploy(
    workspace: Path = WorkspaceOpt,
    pool: str = typer.Option("dataengine", help="Work pool (created as a process pool if missing)."),
    intake_every: float = typer.Option(300, help="Seconds between runs of the feedback intake and triage."),
    review_window: float = typer.Option(0, help="Seconds a queued retrain job waits before its flow runs."),
) -> None:
    """Register the deployments with the Prefect server PREFECT_API_URL names: intake + triage on
    a schedule; one retrain deployment per job kind, run when a trigger policy queues a job."""
    from prefect.settings import PREFECT_API_URL

    from flows.deploy import deploy_all

    if not PREFECT_API_URL.value():
        console.print("[red]PREFECT_API_URL is not set: start a server (dataengine server start) or point it "
                      "at yours[/red]")
        raise typer.Exit(2)
    ws = _existing(workspace)
    for name, dep_id in deploy_all(str(ws.root), pool, intake_every, review_window).items():
        console.print(f"{name}  {dep_id}")
    console.print(f"run them with a worker: prefect worker start --pool {pool}")


if __name__ == "__main__":
    app()
