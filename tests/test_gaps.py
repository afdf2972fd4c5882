"""Gap search and patching on a scene world whose training split never shows a purple triangle.

One workspace for the module: scene world -> default embedding model (trained briefly)
-> embeddings -> train and pool indexes with coverage statistics. Slow (a minute or
two on 2 cores), so marked; CI runs it.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter

import numpy as np
import pytest

from dataengine.catalog import Catalog
from dataengine.embed import EmbedConfig, embed, load_vectors
from dataengine.gaps import GapConfig, GapSearcher, build_workspace_indexes
from dataengine.ingest import IngestConfig, ingest
from dataengine.patch import PatchConfig, patch_found_gap, patch_gap
from dataengine.sceneworld import SceneWorldConfig, write_scene_world
from dataengine.shards import iter_raw_samples, write_shard
from dataengine.status import summarize
from dataengine.workspace import Workspace
from models.clip import load_clip

pytestmark = pytest.mark.slow

HELD_OUT = ("purple", "triangle")


def _concepts(meta: dict) -> set[tuple[str, str]]:
    scenes = [meta["scene"]] + ([meta["source_scene"]] if "source_scene" in meta else [])
    return {(g["colour"], g["shape"]) for sc in scenes for g in sc["groups"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from models.train_clip import ClipTrainConfig, train_default_clip

    ws = Workspace.at(tmp_path_factory.mktemp("gaps") / "ws")
    catalog = Catalog(ws)
    catalog.migrate()
    cfg = SceneWorldConfig(n_train=400, n_pool=160, n_eval=40, resolution=128, holdout=(HELD_OUT,),
                           holdout_pool_fraction=0.2, samples_per_shard=100)
    write_scene_world(ws.shards, cfg, progress=False)
    # Copies of training images in the pool under new keys: patching must never take them.
    train_shard = sorted((ws.shards / "train").glob("*.tar"))[0]
    copies = []
    for raw in list(iter_raw_samples(str(train_shard)))[:20]:
        fields = {k: v for k, v in raw.fields.items()}
        copies.append({"__key__": f"copy-{raw.key}", **fields})
    write_shard(copies, ws.shards / "pool" / "copies-000000.tar")
    ingest(ws, [str(ws.shards)], IngestConfig(use_ray=False), catalog)
    record = train_default_clip(ws.root, ClipTrainConfig(), progress=False, reuse=True)
    embed(ws.root, EmbedConfig(use_ray=False), progress=False, load_encoder=load_clip)
    build_workspace_indexes(ws, "default", ("train", "pool"), progress=False, load_encoder=load_clip)
    train_counts = Counter()
    for row in catalog.query("SELECT meta FROM samples WHERE split = 'train'").to_pylist():
        train_counts.update(_concepts(json.loads(row["meta"])))
    return ws, record, train_counts


def test_held_out_concept_is_a_gap_and_a_common_one_is_not(world):
    ws, _, train_counts = world
    assert train_counts[HELD_OUT] == 0
    common = [c for c, _ in train_counts.most_common(3)]
    searcher = GapSearcher(ws, load_encoder=load_clip)
    prompts = [f"a {c} {s}" for c, s in [HELD_OUT, *common]]
    reports, _ = searcher.prompts(prompts)
    held, *covered = reports
    assert held.is_gap, held.explain()
    assert not any(r.is_gap for r in covered), [(r.concept, r.explain()) for r in covered]
    assert held.gap_score > max(r.gap_score for r in covered)
    # Both sides are measured and kept as evidence; the caption side names the phrase
    # train lacks and where the pool says it.
    assert set(held.sides) == {"image", "caption"}
    weak = min(held.phrases, key=lambda m: m.margin)
    assert weak.phrase == "purple triangle" and weak.margin < held.sides["caption"]["threshold"]
    assert "triangle" in weak.reference_phrase and "purple" in weak.reference_phrase
    assert "purple triangle" not in weak.train_phrase
    # Evidence: the nearest training samples with their similarities, and the cluster.
    assert len(held.neighbours) == 5 and all(n.key.startswith("train-") for n in held.neighbours)
    sims = [n.similarity for n in held.neighbours]
    assert sims == sorted(sims, reverse=True)
    assert held.cluster["size"] >= 1 and held.cluster["median_size"] > 0
    # Every search is recorded in the catalog.
    rows = Catalog(ws).query("SELECT concept, is_gap, evidence FROM gaps").to_pylist()
    assert {r["concept"] for r in rows} >= set(prompts)
    assert json.loads(rows[0]["evidence"])["neighbours"]


def test_threshold_comes_from_the_data(world):
    ws, _, _ = world
    searcher = GapSearcher(ws, load_encoder=load_clip)
    cov = searcher.coverage
    # The alpha quantile of the set's own reference coverage, not a constant.
    assert cov.threshold("text") == pytest.approx(np.quantile(cov.ref_text, cov.alpha))
    assert np.mean(cov.ref_text < cov.threshold("text")) <= cov.alpha + 1e-9
    stricter = GapConfig(alpha=0.01)
    assert np.quantile(cov.ref_text, stricter.alpha) <= cov.threshold("text")
    # The two sides combine into one percentile, thresholded at the references' own alpha
    # quantile: about alpha of the training set's own prompts fall under it.
    assert cov.has_captions and len(cov.ref_combined) == len(cov.ref_text)
    assert np.mean(cov.ref_combined < cov.threshold("combined")) <= cov.alpha + 1e-9
    assert cov.combined(float(cov.ref_text[0]) - 1, float(cov.ref_caption[-1])) == 0.0  # either side alone can


def test_patch_takes_only_pool_samples_with_provenance_and_no_train_duplicates(world):
    ws, _, _ = world
    searcher = GapSearcher(ws, load_encoder=load_clip)
    pool = searcher.reference  # the pool: the corpus coverage compares train with
    (report,), vecs = searcher.prompts(["a purple triangle"], feedback_ids=["fb-001"])
    assert report.is_gap
    cfg = PatchConfig(size=16)
    result = patch_found_gap(searcher, report, vecs[0], cfg)
    assert result.side == "caption" and 0 < result.written <= 16

    catalog = Catalog(ws)
    pool_keys = set(catalog.query("SELECT key FROM samples WHERE split = 'pool'")["key"].to_pylist())
    with tarfile.open(result.shard) as tf:
        metas = {m.name.split(".")[0]: json.load(tf.extractfile(m)) for m in tf if m.name.endswith(".json")}
    assert len(metas) == result.written
    hits = 0
    for key, meta in metas.items():
        prov = meta["patch"]
        assert prov["pool_key"] in pool_keys, prov
        assert not prov["pool_key"].startswith("copy-")  # the copies of train images were left out
        assert prov["gap_id"] == report.gap_id and prov["feedback_id"] == "fb-001"
        assert prov["pool_shard"].endswith(".tar") and "/pool/" in prov["pool_shard"]
        hits += HELD_OUT in _concepts(meta)
        assert prov["similarity"] > result.cutoff  # closer to the missing phrase than any training caption
    # The patch is the missing concept (ground truth from the json), not its neighbourhood.
    assert hits / len(metas) >= 0.8, (hits, len(metas))

    # No patch sample is a near-duplicate of a training image.
    model_id = searcher.encoder.model_id
    pkeys, pvecs = load_vectors(catalog, model_id, "image", splits=["pool"])
    _, tvecs = load_vectors(catalog, model_id, "image", splits=["train"])
    chosen = np.stack([pvecs[pkeys.index(m["patch"]["pool_key"])] for m in metas.values()])
    assert (chosen @ tvecs.T).max() < cfg.duplicate_similarity

    # Recorded in the lake, one row per sample, and the shard ingests as a new split.
    rows = catalog.query("SELECT * FROM patches WHERE gap_id = ?", [report.gap_id]).to_pylist()
    assert len(rows) == result.written and {r["patch_shard"] for r in rows} == {result.shard}
    rep = ingest(ws, [result.shard], IngestConfig(use_ray=False, split="patches"), catalog)
    assert rep.accepted == result.written and rep.quarantined == 0
    assert summarize(catalog).exact


def test_duplicates_of_train_are_filtered(world):
    ws, _, train_counts = world
    searcher = GapSearcher(ws, load_encoder=load_clip)
    pool = searcher.reference  # the pool: the corpus coverage compares train with
    # A covered concept that the copied training images show: patching it anyway (forced)
    # meets the copies among the nearest pool images, and must refuse every one.
    catalog = Catalog(ws)
    copy_meta = catalog.query("SELECT meta FROM samples WHERE key LIKE 'copy-%' ORDER BY key LIMIT 1")["meta"][0].as_py()
    colour, shape = sorted(_concepts(json.loads(copy_meta)))[0]
    (report,), vecs = searcher.prompts([f"a {colour} {shape}"], record=False)
    result = patch_gap(ws, report, vecs[0], searcher.index, pool,
                       PatchConfig(size=len(pool), candidates=len(pool), min_similarity=-1.0))
    assert result.duplicates_of_train >= 20  # every copy (same bytes, same vector) and any natural near-twin
    assert not any(s["pool_key"].startswith("copy-") for s in result.samples)


def test_bad_patch_config_is_refused():
    with pytest.raises(ValueError, match="size"):
        PatchConfig(size=0)
    with pytest.raises(ValueError, match="duplicate_similarity"):
        PatchConfig(duplicate_similarity=1.5)


def test_cli_gaps_and_patch_print_the_evidence(world):
    from typer.testing import CliRunner

    from cli.app import app

    ws, _, _ = world
    runner = CliRunner()
    out = runner.invoke(app, ["gaps", "a purple triangle", "-w", str(ws.root), "--evidence", "3"])
    assert out.exit_code == 0, out.output
    assert "GAP" in out.output and "nearest cluster" in out.output and out.output.count("train-") >= 3
    out = runner.invoke(app, ["patch", "a purple triangle", "-w", str(ws.root), "--size", "4"])
    assert out.exit_code == 0, out.output
    assert "patch-" in out.output and "samples ->" in out.output
    out = runner.invoke(app, ["gaps", "-w", str(ws.root)])
    assert out.exit_code == 2 and "at least one prompt" in out.output


def test_patch_reads_the_accepted_copy_of_a_prefixed_key(tmp_path):
    """Keys with ingest's key_prefix, and a shard holding a second (quarantined) copy of a
    key: the patch takes exactly the copy the catalog accepted."""
    from types import SimpleNamespace

    from conftest import good_sample
    from dataengine.patch import _collect

    ws = Workspace.at(tmp_path / "ws")
    catalog = Catalog(ws)
    catalog.migrate()
    shard = write_shard([good_sample("d", "the accepted copy"), good_sample("x"),
                         good_sample("d", "the duplicate ingest quarantined")], tmp_path / "pool.tar")
    ingest(ws, [shard], IngestConfig(use_ray=False, key_prefix="pfx-", split="pool"), catalog)
    rows = catalog.query("SELECT key, shard, image_offset FROM samples").to_pylist()
    assert sorted(r["key"] for r in rows) == ["pfx-d", "pfx-x"]
    report = SimpleNamespace(feedback_id="fb", gap_id="g" * 16, concept="c", model_id="m")
    samples, out = _collect({"pfx-d": 0.9, "pfx-x": 0.8}, {r["key"]: r["shard"] for r in rows},
                            {r["key"]: r["image_offset"] for r in rows}, report, tmp_path / "patch.tar")
    assert [s["txt"] for s in samples] == [b"the accepted copy", b"a red rectangle, sample x"]
    assert [r["pool_key"] for r in out] == ["pfx-d", "pfx-x"]


def test_image_side_patch_keeps_its_cut_off_and_provenance(world):
    """Without caption phrases (a pool with no captions), candidates come from the image
    index, closer to the query than its k nearest training images."""
    ws, _, _ = world
    searcher = GapSearcher(ws, load_encoder=load_clip)
    (report,), vecs = searcher.prompts(["a purple triangle"], record=False)
    result = patch_gap(ws, report, vecs[0], searcher.index, searcher.reference, PatchConfig(size=8))
    assert result.side == "image" and result.cutoff == pytest.approx(report.similarity)
    assert result.written + result.below_cutoff + result.duplicates_of_train + result.duplicates_in_patch \
        + result.patched_before <= result.considered
    assert all(x["similarity"] >= report.similarity and not x["pool_key"].startswith("copy-")
               for x in result.samples)
