"""Triage accuracy on injected failures whose cause is known, and its speed.

A scene-world workspace whose train split never shows a few (colour, shape) concepts is
built and indexed as the engine does it (default CLIP, embeddings, FAISS, coverage), and a
small reward version is trained on it: the "serving stack" whose scores are logged.
Failures are then made from fresh scenes, one cause each:

- knowledge: the prompt names a held-out concept; the enhanced prompt is faithful; the
  output draws that object wrong (the generator never learnt it);
- prompt: a covered prompt; the enhanced prompt changes or drops one of the user's
  attributes; the output follows the enhanced prompt;
- rl: a covered prompt, a faithful enhanced prompt, an output with one attribute wrong
  (colour, shape, count or position) that the reward let through.

Enhanced prompts are the rich captions the terse prompts were degraded from (what the
engine's insertion enhancer writes); `--paraphrase` also runs every failure again with
enhanced prompts worded independently of the user's prompt (a paraphrasing enhancer).
Well-rated outputs (4-5) are mixed in: they calibrate the logged scores and must not be
triaged. Every record goes in through the feedback contract (a JSONL file).

    python benchmarks/triage.py                        # 400 failures per cause
    python benchmarks/triage.py --seed 1               # other held-out concepts, other scenes
    python benchmarks/triage.py --workdir /tmp/t       # keep the workspace; reused next time

The triage code never names the scene world's vocabulary; only this script (the truth
side) does. Rules were written before this script ran; seeds other than 0 are data
nothing was tuned on.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gaps import draw_held_out  # noqa: E402  (the gap benchmark's held-out draw)

from dataengine.sceneworld.failures import CAUSES, draw  # noqa: E402

from dataengine.catalog import Catalog  # noqa: E402
from dataengine.workspace import Workspace  # noqa: E402
from models.clip import load_clip  # noqa: E402
from models.feedback_rewards import WorkspaceRewards  # noqa: E402


def build_workspace(root: Path, held: tuple, seed: int, n_train: int, n_pool: int, reward_steps: int) -> Workspace:
    """Scene world -> ingest -> default CLIP -> embeddings -> indexes -> a reward version (once)."""
    from dataengine.cluster import ensure_ray
    from dataengine.embed import EmbedConfig, embed
    from dataengine.gaps import GapConfig, build_workspace_indexes
    from dataengine.ingest import IngestConfig, ingest
    from dataengine.sceneworld import SceneWorldConfig, write_scene_world
    from models.stack import default_loop, train_model
    from models.train_clip import ClipTrainConfig, train_default_clip

    ws = Workspace.at(root)
    cat = Catalog(ws)
    fresh = not ws.catalog_path.exists()
    cat.migrate()
    if fresh:
        world = SceneWorldConfig(seed=seed, n_train=n_train, n_pool=n_pool, n_eval=200, resolution=128,
                                 holdout=held, holdout_pool_fraction=0.4, holdout_eval_fraction=0.0)
        ensure_ray()
        write_scene_world(ws.shards, world, progress=False, use_ray=True)
        ingest(ws, [str(ws.shards)], IngestConfig(use_ray=True), cat)
    train_default_clip(ws.root, ClipTrainConfig(seed=seed), progress=False, reuse=True)
    embed(ws.root, EmbedConfig(use_ray=fresh), progress=False, load_encoder=load_clip)
    build_workspace_indexes(ws, "default", ("train", "pool"), gap_cfg=GapConfig(seed=seed), progress=False, load_encoder=load_clip)
    if not cat.query("SELECT 1 FROM model_versions WHERE model = 'reward' AND status = 'promoted'").num_rows:
        train_model("reward", ws.root, {"heads": ("fidelity", "aesthetics"), "n_train": 500, "n_eval": 100},
                    default_loop("reward", steps=reward_steps, progress=False, seed=seed), progress=False)
    return ws


# ---------------------------------------------------------------------------------------
# Injected failures (the truth side: dataengine/sceneworld/failures.py makes them)
# ---------------------------------------------------------------------------------------


def paraphrase_of(prompt: str, scene, corrupt: bool, rng: random.Random, tries: int = 20) -> str | None:
    """A rich caption of `scene` worded independently of the prompt that still states every
    fact the prompt states (judged on the scene world's own vocabulary), or, for a prompt
    failure (`corrupt`: the scene is the corrupted one), one that contradicts or drops one."""
    from dataengine.enhance_eval import extract_attributes
    from dataengine.sceneworld import caption_for

    asked = extract_attributes(prompt)
    for _ in range(tries):
        text = caption_for(scene, rng, detail="rich")
        kept = asked <= extract_attributes(text)
        if kept != corrupt:
            return text
    return None


def write_feedback(out: Path, held: tuple, n_per_cause: int, n_good: int, seed: int, size: int,
                   paraphrase: bool) -> tuple[list[dict], dict[str, str]]:
    """Render every output, write the records (scores added later), return them and the truth."""
    from dataengine.sceneworld import render

    out.mkdir(parents=True, exist_ok=True)
    records, truth = [], {}
    rng = random.Random(f"triage/{seed}/{paraphrase}")
    # Ids unique per run: a reused workspace keeps earlier runs' feedback, and triage only takes new ids.
    tag = f"{time.strftime('%H%M%S')}-{'para' if paraphrase else 'ins'}"
    jobs = [(c, i) for i in range(n_per_cause) for c in CAUSES] + [("good", i) for i in range(n_good)]
    for cause, i in jobs:
        while True:
            made = draw(cause, held, rng, size)
            scene, prompt, enhanced, shown = made.scene, made.prompt, made.enhanced, made.shown
            if not paraphrase:
                break
            enhanced = paraphrase_of(prompt, shown if cause == "prompt" else scene, cause == "prompt", rng)
            if enhanced is not None:
                break  # else no faithful rewording in a few draws: draw another failure
        fid = f"{tag}-{cause}-{i:04d}"
        path = out / f"{fid}.png"
        render(shown).save(path)
        records.append({"id": fid, "time": "2026-12-06T00:00:00Z", "prompt": prompt, "enhanced_prompt": enhanced,
                        # Another enhancer is another serving stack: drift is judged per version.
                        "model_version": "dit/v0007" + ("+rewording-enhancer" if paraphrase else ""),
                        "image": path.name, "task": "gen",
                        "rating": rng.choice((4, 5)) if cause == "good" else rng.choice((1, 1, 2, None)),
                        "comment": None})
        if cause != "good":
            truth[fid] = cause
    return records, truth


def log_scores(ws: Workspace, records: list[dict], folder: Path) -> str:
    """Scores the serving stack logged: the workspace's reward heads on each output against
    the prompt the generator was given (the enhanced one)."""
    from dataengine.images import to_square
    from models.feedback_rewards import WorkspaceRewards

    heads = WorkspaceRewards(ws)
    trained = json.loads((heads.path / "config.json").read_text())["job"]["train"]["heads"]
    imgs = [to_square((folder / r["image"]).read_bytes(), heads.size) for r in records]
    got = heads.score(imgs, [r["enhanced_prompt"] or r["prompt"] for r in records])
    got = {h: v for h, v in got.items() if h in trained}  # a stack logs the heads it serves
    for k, r in enumerate(records):
        r["scores"] = {h: round(float(v[k]), 5) for h, v in got.items()}
    return heads.version


# ---------------------------------------------------------------------------------------
# Measures
# ---------------------------------------------------------------------------------------


def score_triage(ws: Workspace, truth: dict[str, str], label: str) -> dict:
    from dataengine.triage import Decision, accuracy, compare, confusion, per_cause, table_from_evidence

    rows = Catalog(ws).query("""SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY feedback_id
        ORDER BY triaged_at DESC) n FROM triage) WHERE n = 1 ORDER BY feedback_id""").to_pylist()
    rows = [r for r in rows if r["feedback_id"] in truth]
    t = [truth[r["feedback_id"]] for r in rows]
    d = Decision([r["cause"] for r in rows], np.array([r["confidence"] for r in rows]), rows[0]["triager"])
    acc = accuracy(d, t)
    pc = per_cause(d, t)
    conf = confusion(d, t)
    print(f"\n[{label}] rules ({d.triager}) on {len(rows)} injected failures: accuracy {acc:.3f}")
    print(f"  {'cause':<10}{'precision':>10}{'recall':>8}{'n':>6}   confusion (truth -> rl / knowledge / prompt)")
    for c in CAUSES:
        print(f"  {c:<10}{pc[c]['precision']:>10.3f}{pc[c]['recall']:>8.3f}{pc[c]['n']:>6}   "
              + " / ".join(str(conf[c][p]) for p in CAUSES))
    table = table_from_evidence(rows)
    _, m = compare(table, t)
    print(f"  learned (logistic regression on 70% as reviews): {m['why']}")
    wrong = [(r, x) for r, x in zip(rows, t) if r["cause"] != x][:4]
    for r, x in wrong:
        print(f"  miss ({x}): {json.loads(r['evidence'])['text'][:230]}")
    return {"accuracy": acc, "per_cause": pc, "learned": m}


def stored_rate(ws: Workspace, records: list[dict], folder: Path,
                profile: Path | None = None) -> tuple[float, float, float]:
    """Failures/s on one core: signals + decision from stored vectors (embedding excluded),
    the embedding of texts and images that end to end adds, and the exact-search floor:
    the rate if nothing ran but one fp32 matmul of the distinct phrase units against both
    phrase indexes' distinct texts (the least any exact search of them computes)."""
    import faiss
    import torch

    from dataengine.gaps import GapSearcher, _phrase_vectors, search_gaps
    from dataengine.images import to_square
    from dataengine.signals import drift, parse_scores, reference_from_feedback
    from dataengine.triage import RuleTriager, gather

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    s = GapSearcher(ws, load_encoder=load_clip)
    fails = [r for r in records if r["rating"] is None or r["rating"] <= 2]
    prompts = [r["prompt"] for r in fails]
    enh = [r["enhanced_prompt"] for r in fails]
    t0 = time.perf_counter()
    pv = s.encoder.encode_texts(prompts)
    texts = [s.coverage.query_texts(p) for p in prompts]
    phv = _phrase_vectors(s.encoder, texts)
    ev = s.encoder.encode_texts(enh)
    iv = s.encoder.encode_images(np.stack([to_square((folder / r["image"]).read_bytes(), s.encoder.image_size)
                                           for r in fails]))
    embed_s = time.perf_counter() - t0
    scores = [r["scores"] for r in records]
    ref = reference_from_feedback([parse_scores(json.dumps(x)) for x in scores], [r["rating"] for r in records])
    good = [r for r in records if r["rating"] is not None and r["rating"] >= 4]
    drift_ref = np.array([drift(r["prompt"], r["enhanced_prompt"]).share for r in good])
    rules = RuleTriager()

    def once() -> None:
        reports = search_gaps(s.coverage, s.index, s.reference, prompts, pv, "text", s.evidence, None, s.phrases, phv, texts)
        table = gather([r["id"] for r in fails], prompts, enh, [r["rating"] for r in fails],
                       [r["scores"] for r in fails], ref, reports, iv, pv, ev, [drift_ref] * len(fails))
        rules.decide(table)

    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    by_text = {t: v for q, vs in zip(texts, phv) for t, v in zip(q, np.asarray(vs, np.float32))}
    units = torch.from_numpy(np.stack(list(by_text.values())))  # one row per distinct unit, as searched
    corpora = [torch.from_numpy(d.index.reconstruct_n(0, d.index.ntotal)) for d in (p.distinct() for p in s.phrases)]
    floor = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for c in corpora:
            units @ c.T
        floor = min(floor, time.perf_counter() - t0)
    print(f"  exact-search floor: {len(units)} distinct phrase units x {' + '.join(str(len(c)) for c in corpora)} "
          f"distinct texts, one matmul {floor:.3f} s -> {len(fails) / floor:,.0f} failures/s at most")
    if profile:
        import cProfile
        import pstats

        cProfile.runctx("once()", globals(), {"once": once}, str(profile))
        pstats.Stats(str(profile)).sort_stats("cumulative").print_stats(30)
    return len(fails) / best, len(fails) / (best + embed_s), len(fails) / floor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-per-cause", type=int, default=400)
    ap.add_argument("--n-good", type=int, default=300, help="well-rated outputs mixed in (not failures)")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-pool", type=int, default=600)
    ap.add_argument("--held-out", type=int, default=10)
    ap.add_argument("--reward-steps", type=int, default=400)
    ap.add_argument("--paraphrase", action=argparse.BooleanOptionalAction, default=True,
                    help="also run with enhanced prompts worded independently of the user's")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from connectors.feedback import ingest_files
    from dataengine.triage_run import triage_workspace

    held = draw_held_out(args.held_out, args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-triage-"))
    t0 = time.perf_counter()
    ws = build_workspace(work / f"ws-{args.seed}", held, args.seed, args.n_train, args.n_pool, args.reward_steps)
    print(f"workspace {ws.root}: set-up {time.perf_counter() - t0:.0f} s; held-out concepts: "
          + ", ".join(f"{c} {s}" for c, s in held))
    results = {}
    for paraphrase in ((False, True) if args.paraphrase else (False,)):
        label = "paraphrasing enhancer" if paraphrase else "insertion enhancer"
        folder = work / f"feedback-{args.seed}-{'para' if paraphrase else 'ins'}"
        t0 = time.perf_counter()
        records, truth = write_feedback(folder, held, args.n_per_cause, args.n_good, args.seed, 128, paraphrase)
        version = log_scores(ws, records, folder)
        with open(folder / "feedback.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        make_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        intake = ingest_files(ws, [folder / "feedback.jsonl"])
        intake_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = triage_workspace(ws, retriage=False, load_encoder=load_clip, scorer=WorkspaceRewards)
        triage_s = time.perf_counter() - t0
        print(f"\n[{label}] {len(records)} records ({len(truth)} failures) made and scored by {version} in "
              f"{make_s:.0f} s; intake {intake.accepted} stored / {intake.duplicates} dup / {intake.quarantined} "
              f"quarantined in {intake_s:.1f} s; triage end to end {rep.triaged} in {triage_s:.1f} s "
              f"({rep.triaged / triage_s:.0f}/s on this machine's threads)")
        results[label] = score_triage(ws, truth, label)
        if not paraphrase:
            stored, e2e, floor = stored_rate(ws, records, folder)
            print(f"  speed on one core: {stored:,.0f} failures/s from stored embeddings; "
                  f"{e2e:,.0f} failures/s with text and image embedding")
            results[label] |= {"stored_per_s": stored, "end_to_end_per_s": e2e, "exact_search_floor_per_s": floor}
    (work / f"triage-{args.seed}.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
