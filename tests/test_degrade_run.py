"""The degradation stage over a workspace: lake writes, dedup, files, Ray Data, the CLI."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from cli.app import app
from dataengine.degrade import DegradeConfig
from dataengine.degrade.run import degrade_to_lake, read_caption_files

CAPTIONS = [
    "A red bicycle leaning against a brick wall under warm afternoon light.",
    "Three ceramic mugs on a wooden table, shot from above with a 50mm lens.",
    "A cat.",  # nothing to remove: counted, no pairs
    "An old lighthouse on a rocky coast at dusk, painted in watercolor, with a calm and lonely mood.",
]


def _captions(n_copies: int = 1) -> pa.Table:
    ids = [f"c{i}-{k}" for k in range(n_copies) for i in range(len(CAPTIONS))]
    return pa.table({"source_id": ids, "caption": CAPTIONS * n_copies})


def test_lake_pairs_are_deduplicated_and_every_caption_counted(ws, catalog):
    r1 = degrade_to_lake(catalog, _captions(), DegradeConfig(seed=1), batch_size=2)
    assert r1.captions == 4 and r1.no_detail >= 1
    assert r1.pairs_written == r1.pairs_made - r1.duplicates > 0
    stored = catalog.query("SELECT source_id, step, category, less, more FROM pairs").to_pylist()
    assert len(stored) == r1.pairs_written
    assert all(len(p["less"]) < len(p["more"]) for p in stored)
    # A re-run (other batching, same seed) makes the same pairs: nothing new is written.
    r2 = degrade_to_lake(catalog, _captions(), DegradeConfig(seed=1), batch_size=3)
    assert r2.captions == 4 and r2.pairs_written == 0 and r2.duplicates == r2.pairs_made == r1.pairs_made


def test_caption_files_keep_good_lines_and_name_bad_ones(tmp_path):
    (tmp_path / "a.txt").write_text("A blue door.\n\nA green field under a stormy sky.\n")
    (tmp_path / "b.jsonl").write_text('{"id": "x", "caption": "A dog"}\n{oops\n{"id": "y"}\n{"caption": 3}\n')
    table, bad = read_caption_files([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    assert table["source_id"].to_pylist() == ["a.txt:1", "a.txt:3", "x"]
    assert [w for w, _ in bad] == ["b.jsonl:2", "b.jsonl:3", "b.jsonl:4"]
    assert bad[0][1].startswith("bad JSON")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_caption_files([tmp_path / "missing.txt"])


def test_cli_degrade_writes_jsonl_pairs(tmp_path):
    src = tmp_path / "caps.txt"
    src.write_text("\n".join(CAPTIONS) + "\n")
    out = tmp_path / "pairs.jsonl"
    res = CliRunner().invoke(app, ["degrade", str(src), "--out", str(out), "--seed", "3"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(set(r) == {"source_id", "step", "category", "less", "more", "removed"} for r in rows)
    assert {r["source_id"] for r in rows} <= {f"caps.txt:{i}" for i in range(1, 5)}


@pytest.mark.slow
def test_ray_data_batches_make_the_same_pairs(tmp_path):
    from dataengine.catalog import Catalog
    from dataengine.workspace import Workspace

    got = {}
    for use_ray in (False, True):
        cat = Catalog(Workspace.at(tmp_path / f"ws{use_ray}"))
        cat.migrate()
        rep = degrade_to_lake(cat, _captions(3), DegradeConfig(seed=2), use_ray=use_ray, batch_size=3)
        got[use_ray] = (rep.captions, rep.no_detail, rep.pairs_made,
                        sorted(cat.query("SELECT pair_id FROM pairs")["pair_id"].to_pylist()))
    assert got[True] == got[False] and got[True][0] == 12


def test_cli_workspace_degrade_train_enhance(tmp_path):
    runner = CliRunner()
    ws = tmp_path / "ws"
    res = runner.invoke(app, ["enhance", "a cat", "-w", str(ws)])
    assert res.exit_code == 2 and "no enhancer" in res.output
    src = tmp_path / "caps.txt"
    src.write_text("\n".join(CAPTIONS * 3) + "\n")
    assert runner.invoke(app, ["init", "-w", str(ws)]).exit_code == 0
    res = runner.invoke(app, ["train-enhancer", "-w", str(ws)])
    assert res.exit_code == 2 and "no pairs" in res.output
    assert runner.invoke(app, ["degrade", str(src), "-w", str(ws)]).exit_code == 0
    res = runner.invoke(app, ["train-enhancer", "-w", str(ws), "--steps", "5", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert "enhancer v0001 saved" in res.output
    from dataengine.catalog import Catalog
    from dataengine.workspace import Workspace

    rows = Catalog(Workspace.at(ws)).query("SELECT model, version, status FROM model_versions").to_pylist()
    assert rows == [{"model": "enhancer", "version": "v0001", "status": "promoted"}]
    res = runner.invoke(app, ["enhance", "a cat on a sofa", "-w", str(ws), "--max-new-tokens", "24"],
                        terminal_width=400)
    assert res.exit_code == 0, res.output
    assert "enhancer v0001 (promoted)" in res.output
    [rich] = [line.split("->", 1)[1].strip() for line in res.output.splitlines() if "->" in line]
    # Five steps teach nothing, yet the user's words come out, in order, within the budget.
    from models.keep_words import kept_in_order

    assert kept_in_order("a cat on a sofa", rich), rich


def test_rewrite_check_keeps_the_subject_and_is_shorter():
    from dataengine.degrade.rewrite import ChainEndRewriter, subject_words

    assert subject_words("A little square on a table.") == {"square"}
    check = ChainEndRewriter.accept
    assert check("A little square on a table.", "little square on table")
    assert not check("A little square on a table.", "a small shape")  # subject lost
    assert not check("A little square.", "a little square sitting on a big wooden table")  # longer
    assert not check("A little square.", "a little square.")  # no paraphrase at all


@pytest.mark.slow
def test_rewriter_from_a_local_lm_adds_only_checked_pairs(tmp_path):
    """A local causal LM (here a freshly trained nano enhancer's HF folder) as the rewriter."""
    from dataengine.catalog import Catalog
    from dataengine.degrade.rewrite import ChainEndRewriter
    from dataengine.workspace import Workspace
    from models.train_enhancer import EnhancerTrainConfig, train

    cat = Catalog(Workspace.at(tmp_path / "ws"))
    cat.migrate()
    degrade_to_lake(cat, _captions(), DegradeConfig(seed=1))
    record = train(cat.query("SELECT * FROM pairs"), tmp_path / "models",
                   EnhancerTrainConfig(steps=3, batch_size=4, progress=False))
    lm = f"{record['path']}/model"
    rep = degrade_to_lake(cat, _captions(), DegradeConfig(seed=9), rewriter_path=lm)
    chains = rep.captions - rep.no_detail
    rewrites = cat.query("SELECT less, more FROM pairs WHERE category = 'rewrite'").to_pylist()
    assert len(rewrites) == rep.rewrites <= chains
    assert all(ChainEndRewriter.accept(r["more"], r["less"]) for r in rewrites)


@pytest.mark.slow
def test_a_rewriter_that_paraphrases_adds_one_pair_per_chain(tmp_path):
    """A causal LM taught the rewrite template (each chain end -> itself lower-cased without
    its article and full stop): every chain gets its rewrite pair, and only those."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dataengine.catalog import Catalog
    from dataengine.degrade.rewrite import TEMPLATE
    from dataengine.workspace import Workspace
    from models.enhancer import train_tokenizer

    cat = Catalog(Workspace.at(tmp_path / "ws"))
    cat.migrate()
    degrade_to_lake(cat, _captions(), DegradeConfig(seed=1))
    ends = {r["source_id"]: r["less"] for r in cat.query(
        "SELECT source_id, less FROM pairs QUALIFY row_number() OVER (PARTITION BY source_id ORDER BY step DESC) = 1"
    ).to_pylist()}
    casual = {e: " ".join(w for w in e.rstrip(".").lower().split() if w not in ("a", "an", "the")) for e in ends.values()}
    texts = [f"{TEMPLATE.format(text=e)} {c}\n" for e, c in casual.items()]
    tok = train_tokenizer(texts, vocab_size=300, copy=False)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(150):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")

    rep = degrade_to_lake(cat, _captions(), DegradeConfig(seed=1), rewriter_path=str(tmp_path / "lm"))
    rewrites = cat.query("SELECT source_id, less, more FROM pairs WHERE category = 'rewrite'").to_pylist()
    assert rep.rewrites == len(rewrites) == len(ends)
    assert {r["source_id"]: (r["less"], r["more"]) for r in rewrites} == {s: (casual[e], e) for s, e in ends.items()}
