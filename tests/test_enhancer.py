"""The prompt enhancer (models/enhancer.py, models/train_enhancer.py) and its measures
(dataengine/enhance_eval.py), on scene-world prompts."""

from __future__ import annotations

import dataclasses
import json
import random

import pyarrow as pa
import pytest
import torch

from dataengine.degrade import degrade_chain
from dataengine.enhance_eval import (
    evaluate, extract_attributes, heldout_terse_prompts, reference_enhancements, true_of,
)
from dataengine.schema import MODEL_VERSIONS, conform
from dataengine.sceneworld import Group, Scene, caption_for, sample_scene
from models.enhancer import (
    BOS, EOS, IGNORE, PAD, SEP, all_id, build, collate, encode_pair, enhance, load, load_version,
    copy_id, copy_segments, insertion_target, prompt_ids, save_version, train_tokenizer, uses_special_format, versions,
)
from models.keep_words import kept_in_order, prompt_words
from models.train_enhancer import EnhancerTrainConfig, train


def scene_texts(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(terse, short, rich) captions of `n` scene-world scenes."""
    out = []
    for i in range(n):
        rng = random.Random(seed * 10_000 + i)
        scene = sample_scene(rng, 256, 256)
        out.append((caption_for(scene, rng, "terse"), caption_for(scene, rng, "short"), caption_for(scene, rng, "rich")))
    return out


def pairs_table(less: list[str], more: list[str]) -> pa.Table:
    return pa.table({"source_id": [f"cap-{i}" for i in range(len(less))], "less": less, "more": more})


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------
# Tokenizer and sequence format
# ---------------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_has_special_tokens():
    texts = [t for row in scene_texts(50) for t in row]
    tok = train_tokenizer(texts, vocab_size=4096)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == [BOS, SEP, EOS, PAD]
    assert (tok.bos_token, tok.sep_token, tok.eos_token, tok.pad_token) == (BOS, SEP, EOS, PAD)
    assert uses_special_format(tok)
    for text in texts[:20] + ["Ünïcode ✓ and  two  spaces,\ttabs\nnewlines", "  leading and trailing  "]:
        assert tok.decode(tok.encode(text)) == text
    # Merges were learned: a caption takes far fewer tokens than bytes.
    assert len(tok.encode(texts[2])) < len(texts[2].encode()) / 2
    # The same texts give the same tokenizer.
    assert train_tokenizer(texts).get_vocab() == tok.get_vocab()


def test_loss_masks_exactly_the_prompt_part():
    terse, _, rich = scene_texts(1)[0]
    tok = train_tokenizer([terse, rich])
    p = prompt_ids(tok, terse)
    # Generation asks for every detail (<|all|>); a one-step pair has no marker, nor has a
    # tokenizer saved before the marker existed.
    assert p[0] == tok.bos_token_id and p[-2:] == [tok.sep_token_id, all_id(tok)]
    assert prompt_ids(tok, terse, whole=False) == p[:-1]
    assert encode_pair(tok, terse, rich, 512, whole=False)[0][: len(p) - 1] == p[:-1]
    old = train_tokenizer([terse, rich], whole=False)
    assert all_id(old) is None and prompt_ids(old, terse)[-1] == old.sep_token_id
    ids, labels, truncated = encode_pair(tok, terse, rich, max_len=512)
    assert not truncated
    assert ids[: len(p)] == p
    assert labels[: len(p)] == [IGNORE] * len(p)  # no loss on bos, terse prompt, sep
    assert labels[len(p):] == ids[len(p):]  # loss on every target token ...
    assert ids[-1] == tok.eos_token_id  # ... through eos
    # The insertion format: the target is the rich caption with <|copy|> before each word
    # it takes from the prompt; for a degradation pair (deletions only) exactly the caption.
    assert tok.decode(ids[len(p):-1], skip_special_tokens=True) == insertion_target(terse, rich)
    less = degrade_chain(rich)[-1].less
    ids_d = encode_pair(tok, less, rich, max_len=512)[0]
    assert ids_d[len(prompt_ids(tok, less)):].count(copy_id(tok)) == len(prompt_words(less))
    assert tok.decode(ids_d[len(prompt_ids(tok, less)):-1], skip_special_tokens=True) == rich
    plain = train_tokenizer([terse, rich], copy=False)
    assert copy_id(plain) is None and plain.decode(encode_pair(plain, terse, rich, 512)[0][len(p):-1]) == rich

    # Padding never carries loss; a long target is cut to max_len.
    short = encode_pair(tok, terse, "A star.", max_len=512)
    batch = collate([(ids, labels), short[:2]], pad=tok.pad_token_id)
    n = len(short[0])
    assert batch["labels"][1, n:].eq(IGNORE).all() and batch["attention_mask"][1, n:].eq(0).all()
    assert batch["input_ids"][1, n:].eq(tok.pad_token_id).all()
    cut_ids, cut_labels, cut = encode_pair(tok, terse, rich, max_len=2 * len(p))
    assert cut and len(cut_ids) == 2 * len(p) and cut_labels[: len(p)] == [IGNORE] * len(p)
    assert tok.eos_token_id not in cut_ids  # a cut target does not teach the model to stop


def test_copy_segments_join_back_and_mark_the_prompts_words_in_order():
    rich = "A watercolor painting of a single little black star, at the bottom left."
    segs = copy_segments("A black star at the left", rich)
    assert "".join(t for t, _ in segs) == rich
    assert [t for t, c in segs if c] == ["A", " black", " star", " at", " the", " left"]
    assert [t for t, c in segs if c] == [t for t, c in copy_segments("a BLACK star at the left", rich) if c]
    # A word missing from the caption does not stop the words after it being found; it is
    # put in after the word before it, so the target holds every prompt word in order.
    assert [t for t, c in copy_segments("A tiny black star", rich) if c] == ["A", " tiny", " black", " star"]
    assert insertion_target("A tiny black star", rich) == "A tiny watercolor painting of a single little black star, at the bottom left."
    assert insertion_target("a purple heart", rich).startswith("A purple heart watercolor painting")


def foreign_tokenizer(texts):
    """A tokenizer like a user's pretrained LM's: no <|bos|>/<|sep|>, one end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>")


def test_plain_template_for_a_user_model_without_our_tokens(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = scene_texts(3)
    tok = foreign_tokenizer([t for r in rows for t in r] + ["Prompt: Detailed:"])
    assert not uses_special_format(tok)
    terse, short = rows[0][0], rows[0][1]
    ids, labels, _ = encode_pair(tok, terse, short, max_len=512)
    p = prompt_ids(tok, terse)
    assert tok.decode(p) == f"Prompt: {terse}\nDetailed:"
    assert labels[: len(p)] == [IGNORE] * len(p) and labels[len(p):] == ids[len(p):]

    # A "pretrained" local causal LM folder: load() takes it, train(base=...) fine-tunes it.
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
                      bos_token_id=None, pad_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "user-lm")
    tok.save_pretrained(tmp_path / "user-lm")
    model, loaded = load(tmp_path / "user-lm")
    assert not uses_special_format(loaded)
    rec = train(pairs_table([r[0] for r in rows], [r[1] for r in rows]), tmp_path / "models",
                EnhancerTrainConfig(steps=40, batch_size=3, lr=3e-3, warmup_steps=5, eval_fraction=0,
                                    progress=False), base=str(tmp_path / "user-lm"))
    m = json.loads(rec["metrics"])
    assert m["format"] == "plain" and m["base"] == str(tmp_path / "user-lm")
    assert m["train_loss_last"] < m["train_loss_first"] / 3
    model, loaded = load_version(rec["path"])
    out = enhance(model, loaded, [rows[0][0]], max_new_tokens=20)
    assert len(out) == 1 and "Prompt:" not in out[0] and "\n" not in out[0]


# ---------------------------------------------------------------------------------------
# Training, versions
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """A nano enhancer trained 100 steps on four (terse -> short caption) pairs, plus one
    pair with an empty target that must be skipped and counted."""
    before = torch.get_num_threads()
    rows = scene_texts(4, seed=1)
    less, more = [r[0] for r in rows] + ["a red star"], [r[1] for r in rows] + [""]
    root = tmp_path_factory.mktemp("models")
    cfg = EnhancerTrainConfig(size="nano", steps=100, batch_size=4, lr=3e-3, warmup_steps=10,
                              eval_fraction=0, seed=0, num_threads=1, progress=False)
    rec = train(pairs_table(less, more), root, cfg)
    assert torch.get_num_threads() == before  # the run restores the thread count
    return rec, rows, root


def test_nano_overfits_a_handful_of_pairs_and_reproduces_them(overfit):
    rec, rows, _ = overfit
    m = json.loads(rec["metrics"])
    assert m["train_loss_last"] < m["train_loss_first"] / 20, m["train_loss_curve"]
    assert m["skipped_pairs"] == 1 and m["train_pairs"] == 4 and m["steps"] == 100
    assert m["params"] > 100_000 and m["tokens_per_s"] > 0
    model, tok = load_version(rec["path"])
    # Terse and short captions are written apart (not a deletion), so the target it learns
    # is the short caption with the terse words it lacks put in: every user word kept.
    want = [insertion_target(r[0], r[1]) for r in rows]
    assert enhance(model, tok, [r[0] for r in rows], max_new_tokens=80) == want
    assert all(kept_in_order(r[0], w) for r, w in zip(rows, want))


def test_training_record_is_a_model_versions_row(overfit):
    rec, _, root = overfit
    # The trainer's rule: a first version is promoted, the next ones wait as candidates.
    assert rec["model"] == "enhancer" and rec["version"] == "v0001" and rec["status"] == "promoted"
    table = conform(pa.Table.from_pylist([rec]), MODEL_VERSIONS, "model_versions")
    assert table.num_rows == 1
    saved = root / "enhancer" / "v0001"
    assert {p.name for p in saved.iterdir()} == {"model", "config.json", "metrics.json"}
    assert json.loads((saved / "config.json").read_text())["job"]["steps"] == 100
    assert json.loads((saved / "metrics.json").read_text()) == json.loads(rec["metrics"])


def test_saved_version_loads_back_with_identical_outputs(tmp_path):
    rows = scene_texts(3)
    tok = train_tokenizer([t for r in rows for t in r])
    torch.manual_seed(0)
    model = build("nano", tok).eval()
    prompts = [r[0] for r in rows]
    x = torch.tensor([prompt_ids(tok, prompts[0])])
    before = enhance(model, tok, prompts, max_new_tokens=12)
    _, path = save_version(tmp_path, model, tok, {"size": "nano"}, {})
    for loaded, loaded_tok in (load_version(path), load(path)):
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
        assert enhance(loaded, loaded_tok, prompts, max_new_tokens=12) == before
        assert loaded_tok.get_vocab() == tok.get_vocab()


def test_versions_number_up_and_a_failed_save_leaves_nothing(tmp_path, monkeypatch):
    tok = train_tokenizer([t for r in scene_texts(2) for t in r])
    model = build("nano", tok)
    assert [save_version(tmp_path, model, tok, {}, {})[0] for _ in range(2)] == ["v0001", "v0002"]

    def half_written(folder, *args, **kwargs):
        (folder / "partial.bin").parent.mkdir(parents=True, exist_ok=True)
        (folder / "partial.bin").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_version(tmp_path, model, tok, {}, {})
    assert sorted(p.name for p in (tmp_path / "enhancer").iterdir()) == ["v0001", "v0002"]
    monkeypatch.undo()
    assert save_version(tmp_path, model, tok, {}, {})[0] == "v0003"
    assert versions(tmp_path) == ["v0001", "v0002", "v0003"]


def test_training_is_deterministic_on_cpu_and_holds_out_eval_captions(tmp_path):
    rows = scene_texts(12, seed=2)
    pairs = pairs_table([r[0] for r in rows], [r[1] for r in rows])
    cfg = EnhancerTrainConfig(steps=8, batch_size=4, eval_fraction=0.25, warmup_steps=2, progress=False,
                              tag_rows=False)  # one row per pair, to count them
    a, b = (train(pairs, tmp_path, cfg) for _ in range(2))
    ma, mb = json.loads(a["metrics"]), json.loads(b["metrics"])
    assert (a["version"], b["version"]) == ("v0001", "v0002")
    assert ma["eval_pairs"] == 3 and ma["train_pairs"] == 9
    assert ma["eval_loss"] < ma["eval_loss_initial"]
    for key in ("train_loss_curve", "eval_loss", "eval_loss_initial"):
        assert ma[key] == mb[key]
    wa, wb = load_version(a["path"])[0].state_dict(), load_version(b["path"])[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_train_rejects_a_table_without_pairs(tmp_path):
    with pytest.raises(ValueError, match="lacks columns"):
        train(pa.table({"less": ["a star"]}), tmp_path, EnhancerTrainConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="no usable pairs"):
        train(pairs_table(["a star"], [""]), tmp_path, EnhancerTrainConfig(steps=1, progress=False))
    assert versions(tmp_path) == []


# ---------------------------------------------------------------------------------------
# Measures
# ---------------------------------------------------------------------------------------

def hand_scene() -> Scene:
    box = (10, 10, 20, 20)
    return Scene(256, 256, (Group("star", "red", 2, "large", "striped", "left", "row", (box, box)),
                            Group("ring", "blue", 1, "small", "solid", "top", "single", (box,))),
                 background="grass", lighting="sunset", style="watercolor", noise_seed=0)


def test_extract_attributes_reads_the_scene_world_vocabulary():
    facts = extract_attributes("Two large striped red stars in a row on the left and a blue ring at the top, "
                               "in a grassy field, in warm sunset light, as a watercolor painting")
    assert facts == {
        ("object", "red star"), ("count", "red star=2"), ("size", "red star=large"),
        ("texture", "red star=striped"), ("arrangement", "red star=row"), ("position", "red star=left"),
        ("object", "blue ring"), ("count", "blue ring=1"), ("position", "blue ring=top"),
        ("background", "grass"), ("lighting", "sunset"), ("style", "watercolor"),
    }
    assert all(true_of(f, hand_scene()) for f in facts)
    # Colour words inside backgrounds are not objects; "a few" is no count.
    assert extract_attributes("a few red stars against a red brick wall") == {
        ("object", "red star"), ("background", "brick")}
    # A rich caption reads back as exactly its scene's ground truth.
    for i in range(100):
        rng = random.Random(i)
        scene = sample_scene(rng, 256, 256)
        facts = extract_attributes(caption_for(scene, rng, "rich"))
        assert all(true_of(f, scene) for f in facts)
        assert {f for f in facts if f[0] == "object"} == {("object", f"{g.colour} {g.shape}") for g in scene.groups}


def test_intent_preservation_scores_identity_drops_and_contradictions():
    scene = hand_scene().to_json()
    terse = "two red stars and a blue ring"
    score = lambda enhanced: evaluate([terse], [enhanced], [scene])  # noqa: E731
    identity = score(terse)
    assert identity["intent_preservation"] == 1.0 and identity["fully_preserved"] == 1.0
    assert identity["intended_per_prompt"] == 4  # two objects, two counts
    dropped = score("two red stars in a row on the left, in a grassy field")
    assert dropped["intent_preservation"] == 0.5 and dropped["fully_preserved"] == 0.0
    recoloured = score("two green stars and a blue ring at the top")  # no green star in the scene
    assert recoloured["intent_preservation"] == 0.5 and recoloured["intent_contradicted"] == 0.25
    recounted = score("three red stars and a blue ring")
    assert recounted["intent_preservation"] == 0.75 and recounted["intent_contradicted"] == 0.25
    # Attributes the scene does not have are not intent.
    assert evaluate(["a red star and a pink heart"], ["a red star"], [scene])["intent_preservation"] == 1.0


def test_richness_gain_is_zero_for_identity_and_positive_for_the_rich_caption():
    items = heldout_terse_prompts(40)
    assert items == heldout_terse_prompts(40)  # seeded
    terse, scenes = [p for p, _ in items], [s for _, s in items]
    identity = evaluate(terse, terse, scenes)
    assert identity["richness_gain"] == 0 and identity["added_facts"] == 0
    assert identity["intent_preservation"] == 1.0
    rich = evaluate(terse, reference_enhancements(items), scenes)
    assert rich["richness_gain"] > 2 and rich["added_facts"] > 5
    assert rich["faithful_share"] == 1.0  # the reference adds only true details
    assert rich["intent_preservation"] == 1.0
    hallucinated = evaluate(terse, [t + ", at night, as a pencil sketch" for t in terse], scenes)
    assert 0 < hallucinated["faithful_share"] < 1


def test_an_interrupted_enhancer_run_resumes_to_the_weights_of_an_unbroken_one(tmp_path):
    """Phase one trains through models/trainer.py: checkpoints, exact resume, versions."""
    from models.enhancer import load_version
    from models.train_enhancer import EnhancerJob
    from models.trainer import LoopConfig, TrainingInterrupted
    from models.trainer import train as run_job

    rows = scene_texts(24)
    pairs = pairs_table([r[1] for r in rows], [r[2] for r in rows])
    cfg = EnhancerTrainConfig(steps=12, batch_size=4, ckpt_every=5, progress=False)
    whole = train(pairs, tmp_path / "a", cfg)
    job = EnhancerJob(pairs, cfg)
    loop = LoopConfig(steps=12, lr=cfg.lr, warmup_steps=cfg.warmup_steps, ckpt_every=5, progress=False)
    with pytest.raises(TrainingInterrupted):
        run_job(job, tmp_path / "b", loop, stop_after=7)  # dies after step 7; checkpoint at 5
    resumed = train(pairs, tmp_path / "b", cfg)
    assert json.loads(resumed["metrics"])["resumed_from"] == 5
    a, _ = load_version(whole["path"])
    b, _ = load_version(resumed["path"])
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k


# ---------------------------------------------------------------------------------------
# One step or the whole chain: the <|all|> marker
# ---------------------------------------------------------------------------------------


def chain_pairs(captions: list[str]) -> pa.Table:
    from dataengine.degrade import DegradeConfig
    from dataengine.degrade import pairs_table as degrade_pairs

    return degrade_pairs([(f"cap-{i}", c) for i, c in enumerate(captions)], DegradeConfig(seed=0))


def test_whole_chain_rows_are_marked_and_one_step_rows_are_not():
    from models.train_enhancer import EnhancerJob

    captions = [r[2] for r in scene_texts(3, seed=4)]
    pairs = chain_pairs(captions)
    full = {f"cap-{i}": c for i, c in enumerate(captions)}
    steps = {s: [p for p in pairs.to_pylist() if p["source_id"] == s] for s in full}
    assert all(len(v) >= 3 for v in steps.values())  # chains long enough to tell the rows apart
    rows = EnhancerJob(pairs, EnhancerTrainConfig(eval_fraction=0, tag_rows=False, progress=False)).train_rows
    for s, chain in steps.items():
        mine = [r for r in rows if r[0] == s]
        marked = [r for r in mine if r[3]]
        # Every level of the chain is asked for the full caption once, marked ...
        assert sorted(r[1] for r in marked) == sorted(p["less"] for p in chain)
        assert all(r[2] == full[s] for r in marked)
        # ... and each step below the first also teaches its one detail, unmarked.
        assert sorted((r[1], r[2]) for r in mine if not r[3]) == sorted(
            (p["less"], p["more"]) for p in chain if p["more"] != full[s])
    # Without the marker: the step pairs and one tersest -> full row per chain (the old recipe).
    old = EnhancerJob(pairs, EnhancerTrainConfig(eval_fraction=0, whole_marker=False, progress=False)).train_rows
    assert len(old) == pairs.num_rows + len(full)
    # Pairs without chain columns (a user's own terse -> rich pairs) are all whole.
    plain = pa.table({"less": ["a red star"], "more": ["A large red star on grass."]})
    assert [r[3] for r in EnhancerJob(plain, EnhancerTrainConfig(progress=False)).train_rows] == [True]


def test_the_marker_asks_for_every_detail_and_its_absence_for_one_step(tmp_path):
    caption = scene_texts(4, seed=0)[3][1]  # a short caption: five steps, nine rows to learn
    pairs = chain_pairs([caption])
    chain = sorted(pairs.to_pylist(), key=lambda p: p["step"])
    tersest, one_step = chain[-1]["less"], chain[-1]["more"]
    cfg = EnhancerTrainConfig(size="nano", steps=200, batch_size=8, lr=3e-3, warmup_steps=10,
                              eval_fraction=0, seed=0, num_threads=1, progress=False, tag_rows=False)
    model, tok = load_version(train(pairs, tmp_path, cfg)["path"])
    whole = enhance(model, tok, [tersest], max_new_tokens=200)[0]
    step = enhance(model, tok, [tersest], max_new_tokens=200, whole=False)[0]
    assert whole == insertion_target(tersest, caption)
    assert step == insertion_target(tersest, one_step) and step != whole


# ---------------------------------------------------------------------------------------
# Casual tags: whole-chain rows whose prompts state scene-wide details as tags
# ---------------------------------------------------------------------------------------


def test_tag_rows_end_whole_prompts_with_the_captions_own_tags_in_order():
    from itertools import combinations

    from dataengine.degrade.tags import casual_tags
    from models.train_enhancer import EnhancerJob

    captions = [r[2] for r in scene_texts(12, seed=5)]
    pairs = chain_pairs(captions)
    levels: dict[str, list[str]] = {}
    for p in pairs.to_pylist():
        levels.setdefault(p["source_id"], []).append(p["less"])
    full = {f"cap-{i}": c for i, c in enumerate(captions)}
    cfg = EnhancerTrainConfig(eval_fraction=0, progress=False)
    rows = EnhancerJob(pairs, cfg).train_rows
    untagged = EnhancerJob(pairs, dataclasses.replace(cfg, tag_rows=False)).train_rows
    tagged = [r for r in rows if r[1] not in levels[r[0]]]
    assert sorted(rows) == sorted(untagged + tagged)  # tag rows come on top of the others
    assert len(tagged) >= len(full)
    for s, less, more, whole in tagged:
        assert whole and more == full[s]
        tags = [t.text for t in casual_tags(full[s])]
        # A chain level, then a non-empty run of the caption's tags that the level lacks,
        # in caption order.
        endings = {", ".join(c) for n in range(1, len(tags) + 1) for c in combinations(tags, n)}
        assert any(less == lvl.rstrip(" .") + ", " + e for lvl in levels[s] for e in endings
                   if all(t.lower() not in lvl.lower() for t in e.split(", ") if t in tags)), less
        assert kept_in_order(less, full[s])  # so each tag word is copied inside its own sentence
    assert rows == EnhancerJob(pairs, cfg).train_rows  # the same rows for the same seed
