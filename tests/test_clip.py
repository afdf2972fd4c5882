"""The CLIP bundle (models/clip.py) and the default's training and measures (models/train_clip.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.clip import (
    DEFAULT_ARCH, ClipSpecError, default_config, lite0_classifier, load_clip, save_clip, versions,
)
from models.train_clip import ClipTrainConfig, is_held_out, recall_at, split_rows, train_default_clip

REPO = Path(__file__).resolve().parents[1]

# A CLIP small enough to build in a blink: open_clip's own ViT and text transformer.
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    import open_clip

    path = tmp_path_factory.mktemp("configs") / "dataengine-test-tiny.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    return "dataengine-test-tiny@random"


@pytest.fixture(scope="module")
def default_bundle():
    return load_clip(DEFAULT_ARCH)


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------
# Loading by spec
# ---------------------------------------------------------------------------------------


def test_random_arch_gives_normalised_vectors_and_the_same_weights_each_time(tiny_arch):
    a, b = load_clip(tiny_arch), load_clip(tiny_arch)
    assert a.model_id == b.model_id == tiny_arch
    assert (a.image_size, a.embed_dim) == (32, 32)
    img, txt = a.encode_images(_images(3, 32)), a.encode_texts(["a red square", "two blue circles"])
    assert img.shape == (3, 32) and txt.shape == (2, 32) and img.dtype == txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
    # Same spec, same id, same weights: ids in the embeddings table mean something.
    np.testing.assert_array_equal(img, b.encode_images(_images(3, 32)))
    assert a.encode_images(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 32)


def test_images_must_come_at_the_models_size(tiny_arch):
    bundle = load_clip(tiny_arch)
    with pytest.raises(ValueError, match="uint8"):
        bundle.encode_images(_images(2, 48))
    with pytest.raises(ValueError, match="uint8"):
        bundle.encode_images(_images(2, 32).astype(np.float32))


def test_unknown_or_unreachable_specs_say_what_was_tried(tmp_path):
    with pytest.raises(ClipSpecError, match="tried it as a folder.*open_clip architecture"):
        load_clip("no-such-model")
    with pytest.raises(ClipSpecError, match="no checkpoint file"):
        load_clip(f"ViT-B-32@{tmp_path / 'missing.pt'}")
    with pytest.raises(ClipSpecError, match="no pretrained tag 'nope'"):
        load_clip("ViT-B-32:nope")  # refused before any download is tried
    # A bare architecture has no weights: never embed with random ones under its name.
    with pytest.raises(ClipSpecError, match="without weights.*ViT-B-32@random"):
        load_clip("ViT-B-32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipSpecError, match="not a CLIP folder"):
        load_clip(str(tmp_path / "empty"))


@pytest.mark.slow
def test_default_arch_loads_in_a_fresh_process_with_the_same_weights(default_bundle):
    """A Ray actor is a fresh process: load_clip must register the default arch itself."""
    code = ("from dataengine.runtime import apply_offline_defaults; apply_offline_defaults()\n"
            "import json, torch; torch.set_num_threads(1)\n"
            "from models.clip import load_clip\n"
            "b = load_clip('dataengine-clip-lite0')\n"
            "print(json.dumps([b.model_id, b.embed_dim, b.encode_texts(['a red square'])[0, :8].tolist()]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    model_id, dim, vec = json.loads(out.stdout.strip().splitlines()[-1])
    assert (model_id, dim) == (default_bundle.model_id, default_bundle.embed_dim) == (DEFAULT_ARCH, 512)
    np.testing.assert_allclose(vec, default_bundle.encode_texts(["a red square"])[0, :8], atol=1e-5)


# ---------------------------------------------------------------------------------------
# The default architecture
# ---------------------------------------------------------------------------------------


def test_default_config_is_data_without_install_paths():
    cfg = default_config()
    text = json.dumps(cfg)
    assert "site-packages" not in text and "/" not in cfg["text_cfg"]["hf_model_name"]
    assert cfg["vision_cfg"]["timm_model_name"] == "tf_efficientnet_lite0"
    with pytest.raises(ValueError):
        default_config(image_proj="attention")


def test_the_packaged_imagenet_weights_really_are_in_the_image_trunk(default_bundle):
    """Classify scikit-image's chelsea with the trunk's pooled features and the packaged
    classifier: random or mis-mapped weights would not call her a cat (281-285)."""
    from PIL import Image
    from skimage.data import chelsea

    img = np.array(Image.fromarray(chelsea()).resize((224, 224), Image.BICUBIC))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    mean, std = torch.tensor(default_bundle.mean).view(1, 3, 1, 1), torch.tensor(default_bundle.std).view(1, 3, 1, 1)
    weight, bias = lite0_classifier()
    with torch.no_grad():
        logits = default_bundle.model.visual.trunk((x - mean) / std) @ weight.T + bias
    assert 281 <= int(logits.argmax()) <= 285


def test_text_padding_is_trimmed_without_changing_embeddings(default_bundle):
    texts = ["A cat.", "Three big purple triangles piled into a small pyramid in the middle, on a beach.", "A dog."]
    fast = default_bundle.encode_texts(texts)
    with torch.no_grad():  # the model on fully padded tokens, one text at a time
        slow = torch.cat([default_bundle.model.encode_text(default_bundle.tokenizer([t]), normalize=True)
                          for t in texts]).numpy()
    np.testing.assert_allclose(fast, slow, atol=1e-5)


def test_save_and_load_give_identical_embeddings_and_a_stable_id(default_bundle, tmp_path):
    path = save_clip(default_bundle, tmp_path / "clip", default_bundle.config, {"note": "test"})
    a, b = load_clip(str(path)), load_clip(str(path))
    assert a.model_id == b.model_id and a.model_id.startswith(f"{DEFAULT_ARCH}@")
    want = (default_bundle.image_size, default_bundle.mean, default_bundle.embed_dim)
    assert (a.image_size, a.mean, a.embed_dim) == want
    images, texts = _images(4, a.image_size), ["a red square", "The letter M."]
    np.testing.assert_array_equal(a.encode_images(images), default_bundle.encode_images(images))
    np.testing.assert_array_equal(a.encode_texts(texts), default_bundle.encode_texts(texts))
    saved = json.loads((path / "open_clip_config.json").read_text())
    assert "site-packages" not in json.dumps(saved)  # the MiniLM marker, resolved at load time
    with pytest.raises(FileExistsError):
        save_clip(default_bundle, path, default_bundle.config, {})
    # Other weights, other id.
    with torch.no_grad():
        a.model.text.proj.weight.mul_(2)
    other = load_clip(str(save_clip(a, tmp_path / "other", a.config, {})))
    assert other.model_id != a.model_id


# ---------------------------------------------------------------------------------------
# Training and measuring the default
# ---------------------------------------------------------------------------------------


def _row(key, caption, source="tuxpaint", split="train"):
    return {"key": key, "caption": caption, "source": source, "split": split}


def test_held_out_real_images_are_chosen_by_caption_and_never_trained_on():
    cfg = ClipTrainConfig()
    rows = [_row(f"t{i}-{v}", f"The letter {chr(65 + i)}." if v else f"the letter {chr(65 + i)}.")
            for i in range(26) for v in range(2)]
    rows += [_row(f"s{i}", f"scene {i}", "sceneworld", split) for i, split in enumerate(["train", "pool", "eval"] * 5)]
    parts = split_rows(rows, cfg)
    held, train = parts["heldout_tuxpaint"], parts["train"]
    # Both cases of one letter land on the same side (MiniLM is uncased).
    assert {r["caption"].lower() for r in held}.isdisjoint({r["caption"].lower() for r in train})
    assert 0 < len(held) < len(rows) and len(held) % 2 == 0
    assert [r["key"] for r in parts["heldout_sceneworld"]] == [f"s{i}" for i in range(2, 15, 3)]
    assert all(r["split"] != "eval" for r in train)
    assert split_rows(rows, cfg) == parts  # stable: a hash, no RNG
    assert is_held_out("A great blue heron.", 1.0) and not is_held_out("A great blue heron.", 0.0)
    with pytest.raises(ValueError, match="eval_source"):
        ClipTrainConfig(holdout_sources=("sceneworld",))
    with pytest.raises(ValueError, match="embed_dim >= 500"):
        ClipTrainConfig(embed_dim=256)


def test_recall_counts_the_own_image_only():
    eye = torch.eye(4)
    assert recall_at(eye, eye) == {"r@1": 1.0, "r@5": 1.0, "r@10": 1.0}
    shifted = torch.roll(eye, 1, dims=0)  # every caption's best image is the wrong one
    assert recall_at(shifted, eye)["r@1"] == 0.0


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A scene world of 60 train, 20 pool and 20 eval samples at 64 px, ingested."""
    from dataengine.catalog import Catalog
    from dataengine.ingest import IngestConfig, ingest
    from dataengine.sceneworld import SceneWorldConfig, write_scene_world
    from dataengine.workspace import Workspace

    ws = Workspace.at(tmp_path_factory.mktemp("clipws") / "ws")
    Catalog(ws).migrate()
    write_scene_world(ws.shards, SceneWorldConfig(n_train=60, n_pool=20, n_eval=20, resolution=64), progress=False)
    ingest(ws, [str(ws.shards / "**" / "*.tar")], IngestConfig(use_ray=False))
    return ws


@pytest.mark.slow
def test_clip_trains_in_the_stack_loop_and_a_crashed_run_resumes_exactly(tiny_world, tmp_path):
    from safetensors.torch import load_file

    from dataengine.catalog import Catalog
    from models.clip import WEIGHTS_FILE
    from models.train_clip import ClipJob, clip_loop
    from models.trainer import TrainingInterrupted, train

    cfg = ClipTrainConfig(image_size=64, baseline=False, steps=20, batch_size=32, lr=2e-3, store_vectors=False)
    loop = clip_loop(cfg, progress=False)
    assert loop.ckpt_every == 10 and not clip_loop(cfg, resume=False).resume
    whole = train(ClipJob(Catalog(tiny_world), cfg), tmp_path / "whole", loop)
    with pytest.raises(TrainingInterrupted):
        train(ClipJob(Catalog(tiny_world), cfg), tmp_path / "crashed", loop, stop_after=15)
    resumed = train(ClipJob(Catalog(tiny_world), cfg), tmp_path / "crashed", loop)
    assert whole["resumed_from"] is None and resumed["resumed_from"] == 10
    a, b = (load_file(str(Path(r["path"]) / WEIGHTS_FILE)) for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["metrics"]["loss_last"] == whole["metrics"]["loss_last"]
    # The version holds the trainer's run config beside the model's own files.
    saved = json.loads((Path(whole["path"]) / "config.json").read_text())
    assert saved["job"]["steps"] == 20 and len(saved["job"]["samples"]) == 16 and saved["loop"]["warmup_steps"] == 0


@pytest.mark.slow
def test_training_lowers_the_loss_saves_a_loadable_version_and_runs_once(tiny_world):
    from dataengine.catalog import Catalog
    from dataengine.images import iter_images

    cfg = ClipTrainConfig(image_size=64, baseline_image_size=64, steps=40, batch_size=32, lr=2e-3)
    first = train_default_clip(tiny_world.root, cfg, progress=False)
    m = first["metrics"]
    assert not first["reused"] and first["version"] == "v0001" and first["status"] == "promoted"
    assert m["loss_last"] < m["loss_first"]
    sw = m["heldout"]["sceneworld"]
    assert sw["candidates"] > 10 and set(sw) >= {"default", "composite", "start", "chance"}
    path = Path(first["path"])
    assert json.loads((path / "metrics.json").read_text()) == m
    rows = Catalog(tiny_world).query("SELECT version, status FROM model_versions WHERE model='clip'").to_pylist()
    assert [(r["version"], r["status"]) for r in rows] == [("v0001", "promoted")]

    # The saved model embeds exactly as the measured one did: its recall comes out the same.
    bundle = load_clip(str(path))
    assert bundle.model_id == first["model_id"] and bundle.image_size == 64
    held = Catalog(tiny_world).query("SELECT key, shard, image_offset, image_size, caption FROM samples "
                                     "WHERE split = 'eval' AND task = 'gen' ORDER BY key").to_pylist()
    images = dict((k, a) for k, a, _ in iter_images(held, 64))
    vec_i = torch.from_numpy(bundle.encode_images(np.stack([images[r["key"]] for r in held])))
    vec_t = torch.from_numpy(bundle.encode_texts([r["caption"] for r in held]))
    again_measured = recall_at(vec_t, vec_i)  # a near-tie may flip with batch-size float noise: one rank
    assert all(abs(again_measured[k] - sw["default"][k]) <= 1 / len(held) + 1e-9 for k in again_measured)
    assert sw["default"]["swap_n"] > 0  # held-out captions got attribute-swap negatives to be scored on

    # The run featurised train and the held-out sets, never the pool (its captions name
    # what train lacks) and stored their vectors: embed skips them and embeds the pool's
    # gen samples (and the edit samples); a stored vector is the one the saved model computes.
    from dataengine.embed import EmbedConfig, embed, load_vectors

    def count(where: str) -> int:
        return Catalog(tiny_world).query(f"SELECT count(*) AS n FROM samples WHERE {where}").column("n")[0].as_py()

    seen = count("task = 'gen' AND split <> 'pool'")
    assert count("task = 'gen' AND split = 'pool'") > 0
    assert first["stored_vectors"] == {"image": seen, "text": seen}
    report = embed(tiny_world.root, EmbedConfig(use_ray=False, batch_size=16), progress=False, load_encoder=load_clip)
    assert report.model_id == first["model_id"] and report.skipped == {"image": seen, "text": seen}
    assert report.embedded["image"] >= count("task = 'gen' AND split = 'pool'")
    keys, stored = load_vectors(Catalog(tiny_world), first["model_id"], "image", splits=("eval",))
    by_key = dict(zip(keys, stored))
    fresh = dict(zip([r["key"] for r in held], vec_i.numpy()))
    cos = [float(np.dot(by_key[k], fresh[k])) for k in fresh]
    assert len(cos) == len(held) and min(cos) > 0.999  # float16 storage
    keys, stored = load_vectors(Catalog(tiny_world), first["model_id"], "text", splits=("eval",))
    fresh = dict(zip([r["key"] for r in held], vec_t.numpy()))
    assert min(float(np.dot(v, fresh[k])) for k, v in zip(keys, stored) if k in fresh) > 0.999

    # Trained once: the second call returns the same version, no new training.
    again = train_default_clip(tiny_world.root, cfg, progress=False)
    assert again["reused"] and again["version"] == "v0001" and again["metrics"] == m
    assert versions(tiny_world.models) == ["v0001"]

    # A version saved but never registered (a crash between the two) is registered on reuse.
    with Catalog(tiny_world).transaction() as con:
        con.execute("DELETE FROM model_versions WHERE model = 'clip'")
    recovered = train_default_clip(tiny_world.root, cfg, progress=False)
    assert recovered["reused"] and recovered["version"] == "v0001" and recovered["metrics"] == m
    rows = Catalog(tiny_world).query("SELECT version, status, metrics FROM model_versions WHERE model='clip'").to_pylist()
    assert [(r["version"], r["status"], json.loads(r["metrics"])) for r in rows] == [("v0001", "promoted", m)]

    # A forced retrain stores vectors for its own model id, never a second one for a key
    # (the same data and seed can reproduce the same weights, hence the same id).
    retrained = train_default_clip(tiny_world.root, cfg, progress=False, reuse=False)
    assert retrained["version"] == "v0002"
    if retrained["model_id"] == first["model_id"]:
        assert retrained["stored_vectors"] == {"image": 0, "text": 0}
    dupes = Catalog(tiny_world).query("SELECT key, model_id, kind FROM embeddings "
                                      "GROUP BY ALL HAVING count(*) > 1").num_rows
    assert dupes == 0
