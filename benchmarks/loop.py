"""The loop's failures per cause before and after one and two turns, on injected faults.

Builds (or reuses) the scene-world workspace of benchmarks/triage.py and injects one fault
per cause into its serving stack, each with a truth this script measures:

- rl: the promoted reward version is retrained with its aesthetics preferences on blur
  reversed (`RewardTrainConfig.flip`): it prefers blurred outputs, as a generator RL-tuned
  on it would learn to make. Truth: the promoted reward's held-out pairwise accuracy on
  blur pairs.
- knowledge: ten (colour, shape) concepts are held out of train and present in the pool.
  Truth: the failures' concepts no longer uncovered after patch, ingest and re-index.
- prompt: the promoted enhancer is trained on pairs whose targets swap the user's colour
  for another (a fixed permutation): it contradicts the user. Truth: its rate of dropped
  or contradicted attributes (`enhance_eval`, ground truth) on the failing prompts and on
  held-out terse prompts.

Failures go in through the feedback contract (the cause rides along as the extra field
`injected_cause`), scored by the serving (miscalibrated) reward. `flows.loop.loop_turn`
runs twice with every remedy auto-approved and triggers that fire on one approved remedy;
a failure counts as failing after a turn while `models.jobs.still_failing` says so.

    python benchmarks/loop.py --workdir /tmp/tfull        # reuse the triage benchmark's workspace
    python benchmarks/loop.py --n-per-cause 100 --dit-steps 40

On 2 CPU cores the knowledge jobs apply their patches (ingest, embed, re-index) and, with
--dit-steps > 0 and a promoted DiT in the workspace, fine-tune it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gaps import draw_held_out  # noqa: E402
from triage import build_workspace, log_scores  # noqa: E402

from dataengine.sceneworld.failures import (  # noqa: E402
    CAUSES, Injected, draw, named_groups, terse_and_rich, word_re, write_feedback,
)

from dataengine.catalog import Catalog  # noqa: E402


def fresh_copy(template, dest: Path):
    """The template workspace copied, without any feedback, triage, remedy, patch or job:
    each run starts from the same un-patched training set (the template stays untouched)."""
    import shutil

    from dataengine.workspace import Workspace

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(template.root, dest, ignore=shutil.ignore_patterns("patches"))
    ws = Workspace.at(dest)
    for table in ("feedback", "triage", "gaps", "patches"):
        for part in (ws.lake / table).glob("*.parquet"):
            if part.name != "_schema.parquet":
                part.unlink()
    (ws.shards / "patches").mkdir(parents=True, exist_ok=True)
    cat = Catalog(ws)
    cat.migrate()  # the copy's views point at its own lake (paths are workspace-relative)
    with cat.transaction() as con:
        for table in ("remedies", "jobs", "reviews"):
            con.execute(f"DELETE FROM {table}")
        # Version paths are absolute: point the copy's rows at its own folders.
        con.execute("UPDATE model_versions SET path = replace(path, ?, ?)", [str(template.root), str(ws.root)])
    return ws


# ---------------------------------------------------------------------------------------
# Injected faults (the truth side: the scene world's vocabulary lives here)
# ---------------------------------------------------------------------------------------


def _promote(ws, model: str, version: str) -> None:
    with Catalog(ws).transaction() as con:
        con.execute("UPDATE model_versions SET status = 'retired' WHERE model = ? AND status = 'promoted'", [model])
        con.execute("UPDATE model_versions SET status = 'promoted' WHERE model = ? AND version = ?", [model, version])


def _injected_version(ws, model: str, **job) -> str | None:
    """A version of `model` in the workspace whose saved job config has these values."""
    for r in Catalog(ws).query("SELECT version, path FROM model_versions WHERE model = ? ORDER BY version",
                               [model]).to_pylist():
        cfg = json.loads((Path(r["path"]) / "config.json").read_text())["job"]
        cfg = cfg.get("train", cfg)  # the reward's fields sit under "train"
        if all(cfg.get(k) == v for k, v in job.items()):
            return r["version"]
    return None


def miscalibrated_reward(ws, seed: int, steps: int) -> str:
    """A reward version trained with blur preferences reversed (made once per workspace)."""
    from models.stack import default_loop, train_model

    if (v := _injected_version(ws, "reward", flip=["blur"])) is None:
        v = train_model("reward", ws.root, {"heads": ("fidelity", "aesthetics"), "n_train": 500, "n_eval": 100,
                                            "flip": ("blur",)},
                        default_loop("reward", steps=steps, progress=False, seed=seed), progress=False)["version"]
    return v


def blur_accuracy(ws) -> dict:
    """The promoted reward's held-out aesthetics accuracy, overall and on blur pairs."""
    row = Catalog(ws).query("SELECT version, metrics FROM model_versions WHERE model = 'reward' AND "
                            "status = 'promoted' ORDER BY created_at DESC LIMIT 1").to_pylist()[0]
    head = json.loads(row["metrics"])["eval"]["heldout"]["aesthetics"]
    return {"version": row["version"], "aesthetics": head["accuracy"], "blur": head["by_kind"]["blur"]}


def colour_shift() -> dict[str, str]:
    from dataengine.sceneworld.scene import COLOURS

    names = list(COLOURS)
    return {c: names[(i + 3) % len(names)] for i, c in enumerate(names)}


def corrupted_enhancer(ws, steps: int, seed: int) -> str:
    """Degradation pairs for the workspace, then an enhancer trained on them with every
    colour word of each target shifted to another colour (made once per workspace)."""
    import pyarrow as pa

    from dataengine.degrade import DegradeConfig
    from dataengine.degrade.run import captions_from_samples, degrade_to_lake
    from dataengine.schema import MODEL_VERSIONS
    from models.train_enhancer import EnhancerTrainConfig, train

    cat = Catalog(ws)
    if not cat.query("SELECT 1 FROM pairs LIMIT 1").num_rows:
        degrade_to_lake(cat, captions_from_samples(cat, "train"), DegradeConfig(seed=seed), use_ray=False)
    if (v := _injected_version(ws, "enhancer", copy_markers=False)) is not None:
        return v
    pairs = cat.query("SELECT source_id, step, less, more FROM pairs ORDER BY pair_id")
    shift = colour_shift()
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, shift)) + r")(?![\w-])", re.I)
    more = [pattern.sub(lambda m: shift[m.group(1).lower()], t) for t in pairs.column("more").to_pylist()]
    bad = pairs.set_column(pairs.column_names.index("more"), "more", pa.array(more))
    rec = train(bad, ws.models, EnhancerTrainConfig(steps=steps, batch_size=16, copy_markers=False, seed=seed,
                                                    progress=False))
    cat.upsert("model_versions", pa.Table.from_pylist([rec], schema=MODEL_VERSIONS))
    return rec["version"]


def _enhancer_path(ws) -> str:
    return Catalog(ws).query("SELECT path FROM model_versions WHERE model = 'enhancer' AND status = 'promoted' "
                             "ORDER BY created_at DESC LIMIT 1").to_pylist()[0]["path"]


def _free_outputs(path: str, prompts: list[str]) -> list[str]:
    from models.enhancer import enhance, load_version

    model, tok = load_version(path)
    return enhance(model, tok, prompts, max_new_tokens=192, keep_words=False)


def enhancer_truth(ws, failing: list[tuple[str, dict]], held: list[tuple[str, dict]]) -> dict:
    """The promoted enhancer's share of prompts with an attribute dropped or contradicted."""
    from dataengine.enhance_eval import evaluate

    path = _enhancer_path(ws)
    out = {}
    for name, items in (("failing", failing), ("held-out", held)):
        prompts = [p for p, _ in items]
        r = evaluate(prompts, _free_outputs(path, prompts), [sc for _, sc in items])
        out[name] = {"lost": round(1 - r["fully_preserved"], 4), "contradicted": r["intent_contradicted"]}
    return out


def loop_feedback(ws, out: Path, held: tuple, n: int, n_good: int, seed: int, size: int = 128):
    """n failures per cause and n_good well-rated outputs written as feedback; returns the
    records, the truth and each failure's scene."""
    from dataengine.enhance_eval import extract_attributes
    from dataengine.sceneworld import sample_scene

    rng = random.Random(f"loop/{seed}")
    made = [draw("knowledge", held, rng, size) for _ in range(n)]
    made += [draw("rl", held, rng, size, rl_kind="blur") for _ in range(n)]  # what the miscalibrated reward prefers
    # prompt: the serving enhancer's own outputs, kept where they lose an attribute the user asked for
    shift = colour_shift()
    cands = []
    for _ in range(3 * n):
        scene = sample_scene(rng, size, size, forbid=held)
        prompt, _ = terse_and_rich(scene, rng)
        if named_groups(prompt, scene):
            cands.append((scene, prompt))
    prompt_failures = []
    for (scene, prompt), enhanced in zip(cands, _free_outputs(_enhancer_path(ws), [p for _, p in cands])):
        if len(prompt_failures) == n:
            break
        if extract_attributes(prompt) <= extract_attributes(enhanced):
            continue  # this output kept the user's attributes: not a prompt failure
        # The generator follows the enhanced prompt: the named groups come out in the shifted colour.
        named = set(named_groups(prompt, scene))
        groups = tuple(replace(g, colour=shift[g.colour]) if i in named and (shift[g.colour], g.shape) not in held
                       and word_re(shift[g.colour]).search(enhanced) else g for i, g in enumerate(scene.groups))
        prompt_failures.append(Injected("prompt", scene, prompt, enhanced, replace(scene, groups=groups)))
    made += prompt_failures + [draw("good", held, rng, size) for _ in range(n_good)]
    records, truth = write_feedback(out, made, rng, tag=time.strftime("%H%M%S"), model_version="dit/v0007")
    scenes = {r["id"]: m.scene.to_json() for r, m in zip(records, made) if m.cause != "good"}
    return records, truth, scenes


def failing_now(ws, truth: dict[str, str]) -> dict[str, int]:
    """Per injected cause, how many of its failures are binned to it now and still fail for it."""
    from models.jobs import still_failing

    rows = Catalog(ws).query("SELECT feedback_id, arg_max(cause, triaged_at) AS cause FROM triage "
                             "GROUP BY feedback_id").to_pylist()
    now = {r["feedback_id"]: r["cause"] for r in rows if r["feedback_id"] in truth}
    failing = still_failing(ws, now)
    return {c: sum(1 for i, t in truth.items() if t == c and now.get(i) == c and failing.get(i)) for c in CAUSES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-per-cause", type=int, default=200)
    ap.add_argument("--n-good", type=int, default=150)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--dit-steps", type=int, default=0, help="fine-tune steps per knowledge job (0: data only)")
    ap.add_argument("--reward-steps", type=int, default=400, help="steps of the miscalibrated reward version")
    ap.add_argument("--enhancer-steps", type=int, default=600, help="steps of the corrupted enhancer")
    ap.add_argument("--recalibration-steps", type=int, default=150)
    ap.add_argument("--retrain-steps", type=int, default=150, help="enhancer fine-tune steps per prompt job")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from connectors.feedback import ingest_files
    from dataengine.enhance_eval import heldout_terse_prompts
    from dataengine.triggers import TriggerConfig, TriggerPolicy
    from flows.loop import loop_turn
    from models.enhancer_fix import EnhancerFixConfig
    from models.jobs import JobConfig
    from models.recalibrate import RecalibrationConfig

    held = draw_held_out(10, args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-loop-"))
    t0 = time.perf_counter()
    template = build_workspace(work / f"ws-{args.seed}", held, args.seed, 1000, 600, 400)
    print(f"workspace {template.root} ready in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    bad_reward = miscalibrated_reward(template, args.seed, args.reward_steps)
    bad_enhancer = corrupted_enhancer(template, args.enhancer_steps, args.seed)
    print(f"faults (blur-flipped reward {bad_reward}, colour-shifting enhancer {bad_enhancer}) ready in "
          f"{time.perf_counter() - t0:.0f} s")
    ws = fresh_copy(template, work / f"loop-ws-{args.seed}")
    _promote(ws, "reward", bad_reward)  # the serving stack: both faults in it
    _promote(ws, "enhancer", bad_enhancer)
    heldout = heldout_terse_prompts(200, seed=args.seed)
    print(f"serving reward {blur_accuracy(ws)}")

    folder = work / f"loop-{time.strftime('%H%M%S')}"
    t0 = time.perf_counter()
    records, truth, scenes = loop_feedback(ws, folder, held, args.n_per_cause, args.n_good, args.seed)
    log_scores(ws, records, folder)  # the serving stack's scores, added to the records
    with open(folder / "feedback.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    ingest_files(ws, [folder / "feedback.jsonl"])
    failing_prompts = [(r["prompt"], scenes[r["id"]]) for r in records if truth.get(r["id"]) == "prompt"]
    print(f"{len(records)} records in {time.perf_counter() - t0:.0f} s")

    def truths() -> dict:
        return {"reward": blur_accuracy(ws), "enhancer": enhancer_truth(ws, failing_prompts, heldout)}

    policy = TriggerPolicy(min_approved=1, cooldown_h=0)
    jobs = JobConfig(dit_steps=args.dit_steps, recalibration=RecalibrationConfig(steps=args.recalibration_steps),
                     enhancer=EnhancerFixConfig(steps=args.retrain_steps))
    counts = [("injected", {c: sum(t == c for t in truth.values()) for c in CAUSES}, None, truths())]
    for turn in range(1, args.turns + 1):
        t0 = time.perf_counter()
        r = loop_turn(str(ws.root), auto_approve=True, triggers=TriggerConfig(policy, policy, policy), jobs=jobs)
        if turn == 1:
            counts.append(("triaged as its cause", {c: r.confusion[c][c] for c in CAUSES}, None, None))
            print("injected -> triaged (rl / knowledge / prompt): "
                  + "; ".join(f"{t} " + "/".join(str(r.confusion[t][p]) for p in CAUSES) for t in CAUSES))
        secs = time.perf_counter() - t0
        counts.append((f"after turn {turn}", failing_now(ws, truth), secs, truths()))
        for j in r.jobs:
            res = dict(j["result"] or {})
            res.pop("concepts", None)
            res.pop("heldout_before", None)
            res.pop("heldout_after", None)
            print(f"turn {turn}: job {j['kind']} {j['status']}" + (f" ({j['note']})" if j["note"] else "")
                  + f": {json.dumps(res, default=str)[:600]}")
    print(f"\n{'':<24}" + "".join(f"{c:>11}" for c in CAUSES) + f"{'seconds':>10}")
    for label, row, secs, _ in counts:
        print(f"{label:<24}" + "".join(f"{row[c]:>11}" for c in CAUSES) + (f"{secs:>10.0f}" if secs else ""))
    print("\ntruth: promoted reward's held-out accuracy on blur pairs; promoted enhancer's share of prompts with an "
          "attribute dropped or contradicted (failing prompts / held-out prompts)")
    for label, _, _, t in counts:
        if t:
            e = t["enhancer"]
            print(f"{label:<24} reward {t['reward']['version']} blur {t['reward']['blur']:.3f} "
                  f"(aesthetics {t['reward']['aesthetics']:.3f}); enhancer lost {e['failing']['lost']:.3f} / "
                  f"{e['held-out']['lost']:.3f}, contradicted {e['failing']['contradicted']} / "
                  f"{e['held-out']['contradicted']}")


if __name__ == "__main__":
    main()
