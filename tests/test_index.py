"""FAISS indexes chosen by size: exact below flat_max, tuned IVF above; recall measured at
build is real and stored; the index round-trips with its id map; Ray builds the same index."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataengine.index import (
    BuiltIndex,
    IndexConfig,
    RecallWarning,
    _apply_params,
    build_index,
    choose_factory,
    recall_at_k,
    synthetic_vectors,
)

N, D = 20_000, 64
IVF_CFG = IndexConfig(flat_max=2_000)  # small, so 20k vectors take the IVF path


def _keys(n: int, prefix: str = "s") -> list[str]:
    return [f"{prefix}{i:06d}" for i in range(n)]


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return synthetic_vectors(N, D, rank=32, noise=0.2, seed=1)


@pytest.fixture(scope="module")
def ivf(data) -> BuiltIndex:
    return build_index(data, _keys(N), "test-model", IVF_CFG, progress=False)


def _exact_top(x: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Brute force in numpy: each query row's k most similar other rows."""
    sims = x[rows] @ x.T
    sims[np.arange(len(rows)), rows] = -np.inf  # leave the query's own row out
    return np.argsort(-sims, axis=1)[:, :k]


def _search_without_self(built: BuiltIndex, x: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    _, found = built.search(x[rows], k + 1)
    return np.array([[r for r in line if r != q][:k] for line, q in zip(found, rows)])


def test_small_sets_get_an_exact_index():
    x = synthetic_vectors(1_500, 32, rank=16, seed=2)
    built = build_index(x, _keys(1_500), "m", IndexConfig(), progress=False)
    assert built.meta["factory"] == "Flat"
    assert built.meta["recall_at_k"] == 1.0
    sims, rows = built.search(x[:5], 3)
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]  # each vector finds itself first
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)


def test_choice_follows_count_and_dimension():
    cfg = IndexConfig(flat_max=50_000)
    assert choose_factory(50_000, 512, cfg) == "Flat"
    big = choose_factory(1_000_000, 512, cfg)
    assert big.startswith("IVF2048_HNSW32,PQ128x4fs") and "Refine(" in big
    assert choose_factory(200_000, 130, cfg).split(",")[1] == "SQ8"  # d not a multiple of 4
    assert choose_factory(10, 8, IndexConfig(kind="IVF4,Flat")) == "IVF4,Flat"
    assert choose_factory(10**9, 8, IndexConfig(kind="flat")) == "Flat"


def test_above_flat_max_an_ivf_with_refine_reaches_the_target(ivf):
    m = ivf.meta
    assert m["factory"].startswith("IVF") and "Refine(" in m["factory"]
    assert m["recall_at_k"] >= IVF_CFG.target_recall
    assert {"nprobe", "k_factor", "quantizer_efSearch"} <= set(m["params"])
    assert m["count"] == N and m["dim"] == D and m["k"] == 10 and m["model_id"] == "test-model"
    assert m["build_seconds"] >= m["train_seconds"] + m["add_seconds"]
    assert m["built_on"] == "cpu" and m["ray"] is False
    json.dumps(m)  # JSON-able as saved


def test_recall_stored_at_build_is_the_recall_users_get(ivf, data):
    """Recomputed by brute force in numpy on other held-out rows, with the stored settings."""
    import faiss

    k = ivf.meta["k"]
    rows = np.random.default_rng(7).choice(N, size=500, replace=False)
    truth = _exact_top(data, rows, k)
    got = recall_at_k(_search_without_self(ivf, data, rows, k), truth)
    assert got >= IVF_CFG.target_recall - 0.02
    assert abs(got - ivf.meta["recall_at_k"]) < 0.03
    # The stored figure is the trial of the stored settings, and the measurement tells
    # settings apart: one list is far from the target.
    params = ivf.meta["params"]
    chosen = [t for t in ivf.meta["tuning"] if {p: t[p] for p in params} == params]
    assert chosen and chosen[-1]["recall"] == ivf.meta["recall_at_k"]
    ivf_part = faiss.extract_index_ivf(ivf.index)
    ivf_part.nprobe = 1
    try:
        low = recall_at_k(_search_without_self(ivf, data, rows, k), truth)
    finally:
        ivf_part.nprobe = params["nprobe"]
    assert low < 0.6


def test_round_trip_keeps_index_id_map_and_metadata(ivf, data, tmp_path):
    folder = ivf.save(tmp_path / "indexes" / "test-model")
    assert sorted(p.name for p in folder.iterdir()) == ["ids.parquet", "index.faiss", "meta.json"]
    loaded = BuiltIndex.load(folder)
    q = data[:200]
    s1, r1 = ivf.search(q, 10)
    s2, r2 = loaded.search(q, 10)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(s1, s2)
    assert loaded.meta == ivf.meta
    assert loaded.row_of("s000123") == 123
    assert loaded.keys_for(r2[:2]) == [[f"s{r:06d}" for r in line] for line in r2[:2].tolist()]
    with pytest.raises(KeyError, match="nope"):
        loaded.row_of("nope")
    # Saving again replaces the folder whole and leaves no temp folders beside it.
    ivf.save(folder)
    assert [p.name for p in folder.parent.iterdir()] == ["test-model"]


def test_stored_vectors_read_back_by_row(ivf, data):
    rows = np.array([0, 123, N - 1])
    np.testing.assert_allclose(ivf.reconstruct(rows), data[rows], atol=2e-3)  # fp16 refine copies
    with pytest.raises(IndexError):
        ivf.reconstruct([N])


def test_load_names_the_folder_when_files_are_missing_or_disagree(tmp_path):
    x = synthetic_vectors(300, 16, rank=8, seed=3)
    folder = build_index(x, _keys(300), "m", progress=False).save(tmp_path / "ix")
    pq.write_table(pa.table({"row": pa.array(np.arange(299), pa.int64()), "key": _keys(299)}),
                   folder / "ids.parquet")
    with pytest.raises(ValueError, match=r"ix.*counts disagree"):
        BuiltIndex.load(folder)
    (folder / "meta.json").unlink()
    with pytest.raises(ValueError, match=r"ix.*missing meta.json"):
        BuiltIndex.load(folder)


def test_missing_results_are_minus_one_and_empty_keys():
    x = synthetic_vectors(5, 8, rank=4, seed=4)
    built = build_index(x, _keys(5), "m", progress=False)
    sims, rows = built.search(x[:1], 7)
    assert rows.dtype == np.int64 and sims.dtype == np.float32 and rows.shape == (1, 7)
    assert (rows[0, 5:] == -1).all()
    assert built.keys_for(rows)[0][5:] == ["", ""]


def test_float16_input_and_given_queries(data):
    x = data[:3_000].astype(np.float16)
    queries = synthetic_vectors(100, D, rank=32, noise=0.2, seed=1)[:100]  # same basis, new draws
    built = build_index(x, _keys(3_000), "m", IndexConfig(flat_max=1_000), progress=False, queries=queries)
    assert built.meta["recall_queries"] == "100 given queries"
    assert built.meta["recall_at_k"] >= 0.95


def test_a_target_out_of_reach_warns_and_keeps_the_best():
    x = synthetic_vectors(5_000, 64, rank=32, seed=5)
    cfg = IndexConfig(kind="IVF64,PQ8x4fs", target_recall=0.99)  # lossy codes, no refine
    with pytest.warns(RecallWarning, match="no search setting reached"):
        built = build_index(x, _keys(5_000), "m", cfg, progress=False)
    assert 0 < built.meta["recall_at_k"] < 0.99
    assert built.meta["recall_at_k"] == max(t["recall"] for t in built.meta["tuning"])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x, k: (x, k[:-1]), "100 vectors but 99 keys"),
        (lambda x, k: (x, k[:50] + ["s000007"] + k[51:]), "duplicate key 's000007'"),
        (lambda x, k: (np.where(np.arange(100)[:, None] == 42, np.nan, x), k), "key 's000042'.*NaN"),
        (lambda x, k: (np.where(np.arange(100)[:, None] == 9, np.inf, x), k), "key 's000009'.*NaN or inf"),
        (lambda x, k: (np.where(np.arange(100)[:, None] == 3, 0.0, x), k), "key 's000003'.*all zeros"),
        (lambda x, k: (x[0], k), "must be 2-D"),
        (lambda x, k: (x, k[:10] + [""] + k[11:]), "row 10 must be a non-empty string"),
    ],
)
def test_bad_input_names_the_record(mutate, message):
    x, keys = mutate(synthetic_vectors(100, 16, rank=8, seed=6), _keys(100))
    with pytest.raises(ValueError, match=message):
        build_index(x, keys, "m", progress=False)


def test_config_is_validated():
    for bad in (dict(target_recall=0), dict(target_recall=1.5), dict(k=0), dict(flat_max=-1),
                dict(eval_queries=0), dict(train_size=0), dict(kind=""), dict(use_gpu="yes")):
        with pytest.raises(ValueError):
            IndexConfig(**bad)
    with pytest.raises(ValueError, match="cannot build index 'PQ7'"):
        build_index(synthetic_vectors(100, 16, rank=8), _keys(100), "m", IndexConfig(kind="PQ7"), progress=False)


def _content(index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(each list's row ids in order, every row decoded from its list code, refine copies)."""
    import faiss

    copy = faiss.clone_index(index)
    ivf = faiss.extract_index_ivf(copy)
    lists = np.concatenate([faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).copy()
                            for i in range(ivf.nlist)])
    ivf.make_direct_map()
    return lists, ivf.reconstruct_n(0, ivf.ntotal), faiss.serialize_index(copy.refine_index)


@pytest.mark.slow
def test_ray_build_is_the_same_index(ivf, data):
    import faiss

    from dataengine.cluster import ensure_ray

    ensure_ray(num_cpus=2)
    on_ray = build_index(data, _keys(N), "test-model", IVF_CFG, use_ray=True, progress=False)
    assert on_ray.meta["ray"] is True and on_ray.meta["ray_workers"] == 2
    assert on_ray.meta["recall_at_k"] >= IVF_CFG.target_recall
    # Same lists with the same rows in the same order, the same codes, the same refine
    # copies. (Not byte for byte: fast-scan packs codes in blocks of 32 and the unused
    # slots of a merged list's last block hold other bytes.)
    for got, want in zip(_content(on_ray.index), _content(ivf.index)):
        np.testing.assert_array_equal(got, want)
    # Tuning picks by measured time, so the two may settle on different knobs: search
    # both with the same ones.
    _apply_params(on_ray.index, ivf.meta["params"])
    s1, r1 = ivf.search(data[:300], 10)
    s2, r2 = on_ray.search(data[:300], 10)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(s1, s2)
