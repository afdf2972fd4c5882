"""One turn of the loop's knowledge leg on a scene world, and the promotion gate:
failures naming a concept train lacks -> triage -> a patch remedy -> a trigger -> the job
ingests the patch, re-indexes, fixes the failures' coverage and fine-tunes the DiT."""

from __future__ import annotations

import json

import pytest

from dataengine.catalog import Catalog
from dataengine.workspace import Workspace
from models.jobs import JobConfig, gate, run_queued
from models.clip import load_clip


def test_the_gate_promotes_only_a_version_that_fixes_enough_and_is_no_worse():
    cfg = JobConfig(min_fixed=0.5, tolerance=0.02)
    assert gate(1.0, 1.0, 0.8, cfg)[0]
    assert gate(1.01, 1.0, 0.8, cfg)[0]  # within tolerance
    ok, why = gate(1.1, 1.0, 0.8, cfg)
    assert not ok and "worse than the current" in why
    ok, why = gate(0.5, 1.0, 0.4, cfg)
    assert not ok and "fixes 40%" in why
    assert gate(0.5, None, 0.6, cfg)[0] and not gate(None, 1.0, 0.9, cfg)[0]


def _child_flows(parent_id) -> list[str]:
    """The names of the flows Prefect recorded as sub-flows of the flow run `parent_id`."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        names = []
        for run in client.read_flow_runs():
            if run.parent_task_run_id and client.read_task_run(run.parent_task_run_id).flow_run_id == parent_id:
                names.append(client.read_flow(run.flow_id).name)
    return sorted(names)


@pytest.mark.slow
def test_knowledge_failures_are_patched_reindexed_and_fixed_by_one_turn(tmp_path):
    from connectors.feedback import ingest_files
    from dataengine.embed import EmbedConfig, embed
    from dataengine.gaps import build_workspace_indexes
    from dataengine.ingest import IngestConfig, ingest
    from dataengine.sceneworld import SceneWorldConfig, render, sample_scene, write_scene_world
    from dataengine.triggers import TriggerConfig, TriggerPolicy
    from models.stack import default_loop, train_model
    from models.train_clip import ClipTrainConfig, train_default_clip
    import random

    ws = Workspace.at(tmp_path / "ws")
    cat = Catalog(ws)
    cat.migrate()
    held = ("purple", "triangle")
    write_scene_world(ws.shards, SceneWorldConfig(n_train=300, n_pool=160, n_eval=30, resolution=64, holdout=(held,),
                                                  holdout_pool_fraction=0.3, samples_per_shard=100), progress=False)
    ingest(ws, [str(ws.shards)], IngestConfig(use_ray=False), cat)
    train_default_clip(ws.root, ClipTrainConfig(steps=120, baseline=False), progress=False, reuse=True)
    embed(ws.root, EmbedConfig(use_ray=False), progress=False, load_encoder=load_clip)
    build_workspace_indexes(ws, "default", ("train", "pool"), progress=False, load_encoder=load_clip)
    train_model("vae", ws.root, {"eval_images": 4, "batch_size": 8}, default_loop("vae", steps=5, progress=False),
                progress=False)
    train_model("dit", ws.root, {"eval_prompts": 2, "sample_steps": 4, "batch_size": 8, "fidelity": False},
                default_loop("dit", steps=10, progress=False), progress=False)

    rng = random.Random(0)
    (tmp_path / "out").mkdir()
    recs = []
    for i, prompt in enumerate(["a purple triangle", "two purple triangles on grass", "a small purple triangle",
                                "a purple triangle and a red circle", "a red circle", "a blue square",
                                "a green heart", "a yellow star"]):
        path = tmp_path / "out" / f"{i}.png"
        render(sample_scene(rng, 64, 64)).save(path)
        recs.append({"id": f"f{i}", "time": "2026-12-06T00:00:00Z", "prompt": prompt, "enhanced_prompt": None,
                     "model_version": "dit/v0001", "image": str(path), "task": "gen", "rating": 1,
                     "injected_cause": "knowledge" if i < 4 else "rl"})
    (tmp_path / "fb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ingest_files(ws, [tmp_path / "fb.jsonl"])

    from flows.loop import loop_turn

    jobs = JobConfig(dit_steps=5, dit_overrides=(("eval_prompts", 2), ("sample_steps", 4), ("batch_size", 8),
                                                 ("fidelity", False)))
    state = loop_turn(str(ws.root), auto_approve=True, triggers=TriggerConfig(knowledge=TriggerPolicy(min_approved=1)),
                      jobs=jobs, return_state=True)
    turn = state.result()
    assert _child_flows(state.state_details.flow_run_id) == ["dataengine-evaluate", "dataengine-jobs",
                                                             "dataengine-remedies", "dataengine-triage"]
    first = {r["feedback_id"]: r["cause"] for r in cat.query(
        "SELECT feedback_id, arg_min(cause, triaged_at) AS cause FROM triage GROUP BY 1").to_pylist()}
    assert [first[f"f{i}"] for i in range(4)] == ["knowledge"] * 4, first
    assert sum(first[f"f{i}"] == "knowledge" for i in range(4, 8)) <= 1  # covered concepts, mostly not
    assert turn.confusion["knowledge"]["knowledge"] == 4  # the records say what was injected

    knowledge = [json.loads(x["proposal"]) for x in cat.query("SELECT proposal FROM remedies WHERE cause = 'knowledge'").to_pylist()]
    top = max(knowledge, key=lambda p: len(p["failures"]))
    assert "purple" in top["concept"] and "triangle" in top["concept"] and top["patch"]["written"] > 0
    assert turn.approved >= 1 and [f.split(":")[0] for f in turn.fired] == ["knowledge"]
    done = [j for j in cat.query("SELECT * FROM jobs").to_pylist() if j["kind"] == "retrain-dit"]
    assert len(done) == 1 and done[0]["status"] == "done", done
    # After the turn the patched concept's failures are no longer knowledge failures.
    assert turn.after["knowledge"] <= turn.before["knowledge"] - 2, turn
    result = json.loads(done[0]["result"])
    assert result["ingested"]["accepted"] == top["patch"]["written"] or result["ingested"]["accepted"] > 0
    purple = next(v for c, v in result["concepts"].items() if "purple" in c)
    assert purple == {"failures": 4, "uncovered_before": True, "uncovered_after": False}, result
    assert result["fixed_share"] >= 0.5 and result["prompts_uncovered_after"] < result["prompts_uncovered_before"]
    dit = result["dit"]
    assert dit["fine_tuned_from"] == "v0001" and dit["version"] == "v0002"
    rows = {x["version"]: x for x in cat.query("SELECT * FROM model_versions WHERE model = 'dit'").to_pylist()}
    assert rows["v0002"]["status"] == ("promoted" if dit["promoted"] else "candidate")
    assert rows["v0001"]["status"] == ("retired" if dit["promoted"] else "promoted")
    assert json.loads(rows["v0002"]["metrics"])["gate"]["why"] == dit["gate"]
    # The patched concept is now covered: asked again, it is not a gap.
    from dataengine.gaps import GapSearcher

    assert not GapSearcher(ws, load_encoder=load_clip).prompts(["a purple triangle"], record=False)[0][0].is_gap


@pytest.mark.slow
def test_rl_and_prompt_jobs_retrain_measure_on_held_out_failures_and_gate(tmp_path):
    """The rl job recalibrates the promoted reward on approved pairs and the prompt job
    fine-tunes the promoted enhancer on corrected pairs; each measures its fix on failures
    it did not train on, and the catalog's status follows its gate."""
    import random
    from dataclasses import replace
    from datetime import datetime, timezone

    import pyarrow as pa

    from connectors.feedback import ingest_files
    from dataengine.degrade import DegradeConfig
    from dataengine.degrade.run import captions_from_samples, degrade_to_lake
    from dataengine.remedies import approve_all, prompt_remedies, _row
    from dataengine.schema import MODEL_VERSIONS, REMEDIES
    from dataengine.sceneworld import caption_for, render, sample_scene
    from dataengine.triggers import TriggerConfig, TriggerPolicy, check
    from models.enhancer_fix import EnhancerFixConfig
    from models.jobs import still_failing
    from models.recalibrate import RecalibrationConfig, in_check
    from models.stack import default_loop, train_model
    from models.train_enhancer import EnhancerTrainConfig, train
    from tests.conftest import make_scene_workspace

    ws = make_scene_workspace(tmp_path / "ws", n_train=48, n_eval=16)
    cat = Catalog(ws)
    train_model("reward", ws.root, {"heads": ("fidelity",), "n_train": 48, "n_eval": 16, "spatial": (), "hidden": 64,
                                    "flip": ("colour",)}, default_loop("reward", steps=30, progress=False),
                progress=False)
    degrade_to_lake(cat, captions_from_samples(cat, "train"), DegradeConfig(seed=0), use_ray=False)
    rec = train(cat.query("SELECT * FROM pairs"), ws.models, EnhancerTrainConfig(steps=20, batch_size=8,
                                                                                copy_markers=False, progress=False))
    cat.upsert("model_versions", pa.Table.from_pylist([rec], schema=MODEL_VERSIONS))

    rng = random.Random(0)
    out = tmp_path / "out"
    out.mkdir()
    recs, good, rl, prompt = [], [], [], []
    for i in range(40):
        scene = sample_scene(rng, 64, 64)
        kind = ("good", "rl", "prompt")[i % 3]
        rich = caption_for(scene, rng, detail="rich")
        shown, enhanced, prompt_text = scene, rich, caption_for(scene, rng, detail="terse")
        g = scene.groups[0]
        if kind == "rl":
            other = next(c for c in ("red", "blue", "green") if c != g.colour)
            shown = replace(scene, groups=(replace(g, colour=other),) + scene.groups[1:])
        if kind == "prompt":
            enhanced = f"a detailed scene of {'blue' if g.colour != 'blue' else 'red'} things"
        fid = f"{kind}-{i:02d}"
        render(shown).save(out / f"{fid}.png")
        recs.append({"id": fid, "time": "2026-12-06T00:00:00Z", "prompt": prompt_text, "enhanced_prompt": enhanced,
                     "model_version": "dit/v0001", "image": f"{fid}.png", "task": "gen",
                     "rating": 5 if kind == "good" else 1})
        {"good": good, "rl": rl, "prompt": prompt}[kind].append(fid)
    (out / "fb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ingest_files(ws, [out / "fb.jsonl"])

    # The remedies a curator approved: recalibration pairs for fidelity, corrected enhancer pairs.
    now = datetime.now(timezone.utc)
    by_id = {r["id"]: r for r in recs}
    rows = [_row("rl", "fidelity", "fidelity", rl, {"head": "fidelity", "failures": rl,
                 "pairs": [{"win": g, "lose": f} for f in rl for g in good]}, now)]
    rows += prompt_remedies([{"feedback_id": i, "prompt": by_id[i]["prompt"],
                              "enhanced_prompt": by_id[i]["prompt"] + ", " + by_id[i]["enhanced_prompt"]}
                             for i in prompt], now)
    cat.upsert("remedies", pa.Table.from_pylist(rows, schema=REMEDIES))
    assert approve_all(ws) == len(rows)
    one = TriggerPolicy(min_approved=1)
    fired = check(ws, TriggerConfig(rl=one, knowledge=one, prompt=one))
    assert sorted(v.cause for v in fired if v.fire) == ["prompt", "rl"]
    jobs = JobConfig(recalibration=RecalibrationConfig(steps=15),
                     enhancer=EnhancerFixConfig(steps=10, fresh_steps=20, batch_size=8, heldout_prompts=8))
    done = {j["kind"]: j for j in run_queued(ws, jobs)}
    assert done["retrain-reward"]["status"] == "done", done["retrain-reward"]["result"]
    assert done["retrain-enhancer"]["status"] == "done", done["retrain-enhancer"]["result"]

    reward = json.loads(done["retrain-reward"]["result"])
    checked = [f for f in rl if in_check(f, 0.3)]
    assert reward["recalibrated_from"] == "v0001" and reward["version"] == "v0002"
    assert reward["heads"]["fidelity"]["check_failures"] == len(checked) > 0
    # Only pairs of failures outside the check share trained: 7 well-rated x the rest.
    fit_good = [g for g in good if not in_check(g, 0.3)]
    assert reward["train_pairs"] == {"fidelity": len(fit_good) * (len(rl) - len(checked))}
    enh = json.loads(done["retrain-enhancer"]["result"])
    assert enh["replaces"] == "v0001" and enh["how"] == "retrained in the insertion format" and enh["check_failures"] == sum(in_check(f, 0.3) for f in prompt) > 0
    assert 0 < enh["heldout_prompts"] <= 8 and enh["train_pairs"] == len(prompt) - enh["check_failures"]
    for model, result in (("reward", reward), ("enhancer", enh)):
        vs = {r["version"]: r for r in cat.query("SELECT * FROM model_versions WHERE model = ?", [model]).to_pylist()}
        assert vs["v0002"]["status"] == ("promoted" if result["promoted"] else "candidate")
        assert vs["v0001"]["status"] == ("retired" if result["promoted"] else "promoted")
        assert json.loads(vs["v0002"]["metrics"])["gate"]["why"] == result["gate"]
        if result["promoted"]:
            assert result["fixed_share"] >= 0.5 and "no worse" in result["gate"]
    still = still_failing(ws, {i: "rl" for i in rl} | {i: "prompt" for i in prompt})
    assert set(still) == set(rl) | set(prompt) and all(isinstance(v, bool) for v in still.values())
