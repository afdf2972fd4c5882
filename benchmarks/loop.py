"""The loop's failure count per cause before and after one and two turns, on injected failures.

Builds (or reuses) the scene-world workspace of benchmarks/triage.py, injects failures of
known cause through the feedback contract (the cause rides along as the extra field
`injected_cause`), and runs `flows.loop.loop_turn` twice with every remedy auto-approved
and triggers that fire on one approved remedy. After each turn the same failures are
triaged again on the corrected workspace; a failure still binned to its injected cause
is still failing for that cause.

    python benchmarks/loop.py --workdir /tmp/tfull        # reuse the triage benchmark's workspace
    python benchmarks/loop.py --n-per-cause 100 --dit-steps 40

On 2 CPU cores the knowledge jobs apply their patches (ingest, embed, re-index) and, with
--dit-steps > 0 and a promoted DiT in the workspace, fine-tune it; reward and enhancer
jobs have no runner yet and stay queued, so rl and prompt failures cannot fall.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from dataengine.runtime import apply_offline_defaults

apply_offline_defaults()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gaps import draw_held_out  # noqa: E402
from triage import CAUSES, build_workspace, log_scores, write_feedback  # noqa: E402

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
    return ws


def still_failing(ws, truth: dict[str, str]) -> dict[str, int]:
    """Per injected cause, how many of its failures are binned to it now."""
    rows = Catalog(ws).query("SELECT feedback_id, arg_max(cause, triaged_at) AS cause FROM triage "
                             "GROUP BY feedback_id").to_pylist()
    now = {r["feedback_id"]: r["cause"] for r in rows}
    return {c: sum(1 for i, t in truth.items() if t == c and now.get(i) == c) for c in CAUSES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-per-cause", type=int, default=200)
    ap.add_argument("--n-good", type=int, default=150)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--dit-steps", type=int, default=0, help="fine-tune steps per knowledge job (0: data only)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from connectors.feedback import ingest_files
    from dataengine.triggers import TriggerConfig, TriggerPolicy
    from flows.loop import loop_turn
    from models.jobs import JobConfig

    held = draw_held_out(10, args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-loop-"))
    template = build_workspace(work / f"ws-{args.seed}", held, args.seed, 1000, 600, 400)
    ws = fresh_copy(template, work / f"loop-ws-{args.seed}")
    folder = work / f"loop-{time.strftime('%H%M%S')}"
    records, truth = write_feedback(folder, held, args.n_per_cause, args.n_good, args.seed, 128, False)
    log_scores(ws, records, folder)
    with open(folder / "feedback.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r | ({"injected_cause": truth[r["id"]]} if r["id"] in truth else {})) + "\n")
    ingest_files(ws, [folder / "feedback.jsonl"])
    policy = TriggerPolicy(min_approved=1, cooldown_h=0)
    counts = []
    for turn in range(1, args.turns + 1):
        t0 = time.perf_counter()
        r = loop_turn(str(ws.root), auto_approve=True, triggers=TriggerConfig(policy, policy, policy),
                      jobs=JobConfig(dit_steps=args.dit_steps))
        if turn == 1:
            counts.append(("injected", {c: sum(t == c for t in truth.values()) for c in CAUSES}, None))
            counts.append(("triaged as its cause", {c: r.confusion[c][c] for c in CAUSES}, None))
            print("injected -> triaged (rl / knowledge / prompt): "
                  + "; ".join(f"{t} " + "/".join(str(r.confusion[t][p]) for p in CAUSES) for t in CAUSES))
        counts.append((f"after turn {turn}", still_failing(ws, truth), time.perf_counter() - t0))
        for j in r.jobs:
            res = j["result"] or {}
            print(f"turn {turn}: job {j['kind']} {j['status']}" + (f" ({j['note']})" if j["note"] else "")
                  + (f": fixed {res.get('fixed_share')}, patch shards {len(res.get('patch_shards', []))}, "
                     f"prompts uncovered {res.get('prompts_uncovered_before')} -> {res.get('prompts_uncovered_after')}"
                     if res else ""))
    print(f"\n{'':<24}" + "".join(f"{c:>11}" for c in CAUSES) + f"{'seconds':>10}")
    for label, row, secs in counts:
        print(f"{label:<24}" + "".join(f"{row[c]:>11}" for c in CAUSES) + (f"{secs:>10.0f}" if secs else ""))


if __name__ == "__main__":
    main()
