"""The job runner: queued retrain jobs (dataengine/triggers.py) run through models/stack.py,
and the promotion gate that decides whether what they made replaces the current version.

A job records what it measured before and after on the failures that fired it; a new
version is promoted only if it is no worse than the current one on its own held-out
evaluation and fixes at least `min_fixed` of those failures, otherwise it stays a
candidate with the reason. Kinds without a runner here stay queued and say so.

- retrain-dit (knowledge): ingest the approved patches' shards (split `patches`), embed
  them, grow the training index (train + patches) and its coverage, re-measure each
  remedy's concept (a failure is fixed when its concept is no longer below the triage's
  knowledge line nor a gap), then fine-tune the promoted DiT on the patched mix and gate it.
- retrain-reward (rl): fine-tune the promoted reward version on the approved recalibration
  pairs with a replay of its own training pairs; fixed and gated on held-out failures
  (models/recalibrate.py).
- retrain-enhancer (prompt): fine-tune the promoted enhancer on the workspace's pairs plus
  the approved corrected pairs; fixed and gated on how often it loses the user's words
  (models/enhancer_fix.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from dataengine.catalog import Catalog
from dataengine.schema import JOBS, MODEL_VERSIONS
from dataengine.triage import RuleTriager
from dataengine.versions import promoted
from dataengine.workspace import Workspace

from .clip import load_clip
from .enhancer_fix import EnhancerFixConfig
from .recalibrate import RecalibrationConfig


WS_SCORED = "ws:"  # triage's prefix for heads of the workspace's own reward (dataengine/triage_run.py)


@dataclass(frozen=True)
class JobConfig:
    min_fixed: float = 0.5  # share of the firing failures a new version must fix
    dit_steps: int = 40  # fine-tune steps (0: apply the data, train nothing)
    dit_overrides: tuple[tuple[str, Any], ...] = (("eval_prompts", 6), ("sample_steps", 20), ("batch_size", 8))
    tolerance: float = 0.02  # held-out loss may rise this share and still count as no worse
    recalibration: RecalibrationConfig = RecalibrationConfig()
    enhancer: EnhancerFixConfig = EnhancerFixConfig()


def _update(catalog: Catalog, job: dict, **fields) -> dict:
    job = job | fields | {"updated_at": datetime.now(timezone.utc)}
    if isinstance(job.get("result"), dict):
        job["result"] = json.dumps(job["result"], default=str)
    catalog.upsert("jobs", pa.Table.from_pylist([job], schema=JOBS))
    return job


def _uncovered(ws: Workspace, concepts: list[str], prompts: list[str], knowledge_below: float
               ) -> tuple[list[bool], list[bool]]:
    """Per concept and per prompt: below the triage rules' coverage line or a gap (what made
    it knowledge), from one load of the workspace's searcher."""
    from dataengine.gaps import GapSearcher

    texts = concepts + prompts
    reports, _ = GapSearcher(ws, load_encoder=load_clip).prompts(texts, record=False) if texts else ([], None)
    flags = [r.is_gap or r.percentile < knowledge_below for r in reports]
    return flags[:len(concepts)], flags[len(concepts):]


def gate(new_loss: float | None, current_loss: float | None, fixed: float, cfg: JobConfig) -> tuple[bool, str]:
    """Promote only a version no worse on held-out data that fixes enough failures."""
    if fixed < cfg.min_fixed:
        return False, f"fixes {fixed:.0%} of its failures (< {cfg.min_fixed:.0%})"
    if new_loss is None:
        return False, "no held-out evaluation to compare"
    if current_loss is not None and new_loss > current_loss * (1 + cfg.tolerance):
        return False, f"held-out loss {new_loss:.4f} worse than the current {current_loss:.4f}"
    vs = f"current {current_loss:.4f}" if current_loss is not None else "no current version"
    return True, f"fixes {fixed:.0%} of its failures; held-out loss {new_loss:.4f} ({vs})"


def run_knowledge_job(ws: Workspace, job: dict, cfg: JobConfig) -> dict:
    from dataengine.embed import EmbedConfig, embed
    from dataengine.gaps import build_workspace_indexes
    from dataengine.ingest import IngestConfig, ingest

    catalog = Catalog(ws)
    params = json.loads(job["params"])
    proposals = [json.loads(r["proposal"]) for r in catalog.query(
        "SELECT proposal FROM remedies WHERE list_contains(?, remedy_id)", [params["remedies"]]).to_pylist()]
    shards = sorted({p["patch"]["shard"] for p in proposals if p.get("patch") and p["patch"].get("shard")})
    concepts = [p["concept"] for p in proposals]
    prompts = [f["prompt"] for f in catalog.query(
        "SELECT prompt FROM feedback WHERE list_contains(?, feedback_id) ORDER BY feedback_id",
        [params["failures"]]).to_pylist()]
    line = RuleTriager().knowledge_below
    # Fixed, as the loop defines it for knowledge: the concept a failure misses is no longer
    # below coverage after the patch is ingested and the index rebuilt. The failures' own
    # prompts are re-measured too (other phrases of a prompt may still be rare).
    before_c, before_p = _uncovered(ws, concepts, prompts, line)
    result: dict[str, Any] = {"patch_shards": shards}
    if shards:
        rep = ingest(ws, shards, IngestConfig(use_ray=False), catalog)
        result["ingested"] = {"accepted": rep.accepted, "quarantined": rep.quarantined}
        embed(ws.root, EmbedConfig(use_ray=False), progress=False, load_encoder=load_clip)
        build_workspace_indexes(ws, "default", ("train", "pool"), progress=False, load_encoder=load_clip)
    after_c, after_p = _uncovered(ws, concepts, prompts, line)
    weights = [len(p["failures"]) for p in proposals]
    missing = sum(w for w, b in zip(weights, before_c) if b)
    fixed = sum(w for w, b, a in zip(weights, before_c, after_c) if b and not a) / missing if missing else 0.0
    result |= {"concepts": {c: {"failures": w, "uncovered_before": b, "uncovered_after": a}
                            for c, w, b, a in zip(concepts, weights, before_c, after_c)},
               "failures": sum(weights), "fixed_share": round(fixed, 4),
               "prompts_uncovered_before": sum(before_p), "prompts_uncovered_after": sum(after_p)}
    current = promoted(catalog, "dit")
    if cfg.dit_steps <= 0 or current is None:
        result["dit"] = "not trained: " + ("dit_steps is 0" if cfg.dit_steps <= 0 else "no promoted DiT to fine-tune")
        return result
    from models.stack import default_loop, train_model

    rec = train_model("dit", ws.root, dict(cfg.dit_overrides),
                      default_loop("dit", steps=cfg.dit_steps, progress=False, init_from=current["path"]),
                      progress=False)
    new_loss = rec["metrics"].get("eval", {}).get("eval_loss")
    cur_loss = json.loads(current["metrics"] or "{}").get("eval", {}).get("eval_loss")
    ok, why = gate(new_loss, cur_loss, fixed, cfg)
    _set_status(catalog, "dit", rec["version"], "promoted" if ok else "candidate", job["job_id"], why,
                retire=current["version"] if ok else None)
    result["dit"] = {"version": rec["version"], "fine_tuned_from": current["version"], "promoted": ok, "gate": why,
                     "eval_loss": new_loss, "current_eval_loss": cur_loss}
    return result


def _set_status(catalog: Catalog, model: str, version: str, status: str, job_id: str, why: str,
                retire: str | None) -> None:
    rows = catalog.query("SELECT * FROM model_versions WHERE model = ? AND (version = ? OR version = ?)",
                         [model, version, retire or version]).to_pylist()
    for r in rows:
        if r["version"] == version:
            m = json.loads(r["metrics"] or "{}") | {"gate": {"status": status, "why": why, "job_id": job_id}}
            r.update(status=status, job_id=job_id, metrics=json.dumps(m, default=str))
        elif retire and r["version"] == retire:
            r["status"] = "retired"
    catalog.upsert("model_versions", pa.Table.from_pylist(rows, schema=MODEL_VERSIONS))


def _approved_proposals(catalog: Catalog, job: dict) -> list[dict]:
    """The proposals of the remedies that fired `job`, each with `feedback_ids` added."""
    params = json.loads(job["params"])
    return [json.loads(r["proposal"]) | {"feedback_ids": r["feedback_ids"]} for r in catalog.query(
        "SELECT proposal, feedback_ids FROM remedies WHERE list_contains(?, remedy_id) ORDER BY remedy_id",
        [params["remedies"]]).to_pylist()]


def run_reward_job(ws: Workspace, job: dict, cfg: JobConfig) -> dict:
    from .recalibrate import recalibrate

    catalog = Catalog(ws)
    pairs: dict[str, list[tuple[str, str]]] = {}
    unscored: dict[str, list[str]] = {}
    for p in _approved_proposals(catalog, job):
        head = p["head"].removeprefix(WS_SCORED)
        if p["head"].startswith(WS_SCORED):  # scored by the workspace's heads at triage, not logged
            unscored.setdefault(head, []).extend(p["failures"])
        else:
            pairs.setdefault(head, []).extend((x["win"], x["lose"]) for x in p.get("pairs", []))
    result = recalibrate(ws, pairs, cfg.recalibration, job_id=job["job_id"], unscored=unscored)
    _set_status(catalog, "reward", result["version"], "promoted" if result["promoted"] else "candidate",
                job["job_id"], result["gate"], retire=result["recalibrated_from"] if result["promoted"] else None)
    return result


def run_enhancer_job(ws: Workspace, job: dict, cfg: JobConfig) -> dict:
    from .enhancer_fix import retrain_enhancer

    catalog = Catalog(ws)
    corrected = [{"feedback_id": p["feedback_ids"][0], "less": p["less"], "more": p["more"]}
                 for p in _approved_proposals(catalog, job) if p.get("less") and p.get("more")]
    result = retrain_enhancer(ws, corrected, cfg.enhancer, job_id=job["job_id"])
    _set_status(catalog, "enhancer", result["version"], "promoted" if result["promoted"] else "candidate",
                job["job_id"], result["gate"], retire=result["replaces"] if result["promoted"] else None)
    return result


RUNNERS = {"retrain-dit": run_knowledge_job, "retrain-reward": run_reward_job, "retrain-enhancer": run_enhancer_job}


def run_queued(ws: Workspace, cfg: JobConfig = JobConfig(), kinds: Sequence[str] | None = None) -> list[dict]:
    """Run every queued job (of `kinds`, default all) a runner exists for, oldest first; each
    ends done or failed with its result. Jobs of other kinds stay queued and are reported
    as waiting."""
    catalog = Catalog(ws)
    catalog.migrate()
    out = []
    for job in catalog.query("SELECT * FROM jobs WHERE status = 'queued' ORDER BY created_at").to_pylist():
        if kinds is not None and job["kind"] not in kinds:
            continue
        runner = RUNNERS.get(job["kind"])
        if runner is None:
            out.append(job | {"note": f"no runner for {job['kind']} yet: stays queued"})
            continue
        job = _update(catalog, job, status="running")
        try:
            result = runner(ws, job, cfg)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            out.append(_update(catalog, job, status="failed", result={"error": f"{type(e).__name__}: {e}"}))
            continue
        out.append(_update(catalog, job, status="done", result=result))
    return out


def still_failing(ws: Workspace, causes: dict[str, str]) -> dict[str, bool]:
    """Per failure (feedback id -> the cause it is binned to now): does it still fail for
    that cause on the workspace's current versions? knowledge: it is binned knowledge (its
    concept is still uncovered); rl: the promoted reward version's head that overrated it
    still scores it at or above the median well-rated output; prompt: the promoted
    enhancer's own output for its prompt still loses a word of it (without a promoted
    enhancer: it is binned prompt)."""
    from .enhancer_fix import loses_words
    from .recalibrate import _head_scores, _outputs, _train_cfg, overrated

    catalog = Catalog(ws)
    out = {i: c == "knowledge" for i, c in causes.items() if c == "knowledge"}
    rl = [i for i, c in causes.items() if c == "rl"]
    if rl:
        reward = promoted(catalog, "reward")
        rows = catalog.query("""SELECT feedback_id, json_extract_string(evidence, '$.reward_top') AS head FROM
            (SELECT *, row_number() OVER (PARTITION BY feedback_id ORDER BY triaged_at) n FROM triage)
            WHERE n = 1 AND list_contains(?, feedback_id)""", [rl]).to_pylist()
        first_head = {r["feedback_id"]: (r["head"] or "").removeprefix(WS_SCORED) or None for r in rows}
        good = [r["feedback_id"] for r in catalog.query(
            "SELECT feedback_id FROM feedback WHERE rating >= 4 ORDER BY feedback_id LIMIT 500").to_pylist()]
        outputs = _outputs(catalog, rl + good, _train_cfg(Path(reward["path"])).resolution) if reward else {}
        good = [g for g in good if g in outputs]
        for head in sorted({h for h in first_head.values() if h}):
            ids = [i for i in rl if first_head.get(i) == head and i in outputs]
            if not ids or not good:
                continue
            s = _head_scores(reward["path"], head, [outputs[i] for i in ids + good])
            out |= dict(zip(ids, overrated(s[:len(ids)], s[len(ids):]).tolist()))
        out |= {i: True for i in rl if i not in out}  # no head named or no image: nothing shows it fixed
    prompt = [i for i, c in causes.items() if c == "prompt"]
    if prompt:
        enhancer = promoted(catalog, "enhancer")
        if enhancer is None:
            out |= {i: True for i in prompt}
        else:
            rows = catalog.query("SELECT feedback_id, prompt FROM feedback WHERE list_contains(?, feedback_id) "
                                 "ORDER BY feedback_id", [prompt]).to_pylist()
            out |= dict(zip([r["feedback_id"] for r in rows], loses_words(enhancer["path"], [r["prompt"] for r in rows])))
    return out
