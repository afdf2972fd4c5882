"""FAISS indexes chosen by size: exact below flat_max, tuned IVF above; recall measured at
build is real and stored; the index round-trips with its id map; Ray builds the same index;
growth adds only the new rows and re-measures recall; a memory budget streams the build."""

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
    grow_index,
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
    assert sorted(p.name for p in folder.iterdir()) == ["ids.parquet", "index.faiss", "meta.json", "probes.npz"]
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


# ---------------------------------------------------------------------------------------
# Growth
# ---------------------------------------------------------------------------------------

GROW_N, GROW_M = 10_000, 2_000


@pytest.fixture(scope="module")
def grow_data() -> np.ndarray:
    return synthetic_vectors(GROW_N + GROW_M, D, rank=32, noise=0.2, seed=11)


@pytest.fixture(scope="module")
def grow_base(grow_data) -> BuiltIndex:
    built = build_index(grow_data[:GROW_N], _keys(GROW_N), "m", IVF_CFG, progress=False)
    # Tuning keeps the fastest setting that reaches the target, by measured time, so a busy
    # machine can leave a borderline one that 20% more rows rightly push under the target
    # (k_factor 16: 0.956 at build, 0.940 after growth). A setting with margin keeps these
    # tests about growth.
    params = {"nprobe": 32, "quantizer_efSearch": 64, "k_factor": 64}
    _apply_params(built.index, params)
    built.meta["params"] = params
    return built


def _copy(built: BuiltIndex) -> BuiltIndex:
    """A separate copy to grow (growth changes an index in place)."""
    import copy

    import faiss

    index = faiss.clone_index(built.index)
    _apply_params(index, built.meta["params"])
    return BuiltIndex(index, built.keys.copy(), copy.deepcopy(built.meta), probes=copy.deepcopy(built.probes))


def test_growth_adds_exactly_the_new_keys_and_search_finds_them(grow_base, grow_data, tmp_path):
    built = _copy(grow_base)
    new = grow_data[GROW_N:]
    out = grow_index(built, new, _keys(GROW_M, "g"), progress=False)
    assert out is built and len(built) == GROW_N + GROW_M
    assert built.keys.tolist() == _keys(GROW_N) + _keys(GROW_M, "g")
    assert built.row_of("g000005") == GROW_N + 5
    _, rows = built.search(new[:300], 1)
    assert (rows[:, 0] == GROW_N + np.arange(300)).mean() >= 0.98  # each new vector finds itself
    m = built.meta
    assert m["count"] == GROW_N + GROW_M
    assert [h["event"] for h in m["history"]] == ["build", "grow"]
    build, grow = m["history"]
    assert build["rows"] == GROW_N and grow["rows"] == GROW_N + GROW_M and grow["added"] == GROW_M
    assert 0.9 <= build["recall"] <= 1 and 0.9 <= grow["recall"] <= 1 and grow["recall"] == m["recall_at_k"]
    assert grow["new_probe_rows"] > 0 and grow["recall_new_rows"] is not None
    assert m["rebuild_proposed"] is False and m["rebuild_reason"] is None  # same distribution
    # The probes stay rows of the index, and the new ones' truth is the exact top-k (their
    # old neighbours found over the fp16 copies: near-ties may swap places).
    p = built.probes
    fresh = p.rows >= GROW_N
    assert fresh.sum() == grow["new_probe_rows"] and len(p.rows) == IVF_CFG.probes
    want = _exact_top(grow_data, p.rows[fresh], 10)
    same = [set(a) == set(b) for a, b in zip(p.truth[fresh].tolist(), want.tolist())]
    assert np.mean(same) >= 0.9
    exact_sims = np.take_along_axis(grow_data[p.rows[fresh]] @ grow_data.T, want, axis=1)
    np.testing.assert_allclose(p.sims[fresh], exact_sims, atol=2e-3)

    # Saved and loaded, it grows again; an index saved without probes measures from its copies.
    more = synthetic_vectors(GROW_N + 2 * GROW_M, D, rank=32, noise=0.2, seed=11)[-500:]
    loaded = BuiltIndex.load(built.save(tmp_path / "ix"))
    assert loaded.meta["history"] == m["history"]
    np.testing.assert_array_equal(loaded.probes.truth, p.truth)
    (tmp_path / "ix" / "probes.npz").unlink()
    legacy = BuiltIndex.load(tmp_path / "ix")
    assert legacy.probes is None
    grow_index(legacy, more, _keys(500, "h"), progress=False)
    assert len(legacy) == GROW_N + GROW_M + 500 and legacy.meta["history"][-1]["recall"] > 0.9


def _lists(index) -> list[np.ndarray]:
    import faiss

    ivf = faiss.extract_index_ivf(index)
    return [faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).copy() for i in range(ivf.nlist)]


def _decoded(index, rows: np.ndarray) -> np.ndarray:
    """Rows decoded from their list codes (not the refine copies)."""
    import faiss

    copy = faiss.clone_index(index)
    ivf = faiss.extract_index_ivf(copy)
    ivf.make_direct_map()
    return ivf.reconstruct_n(0, ivf.ntotal)[rows]


def test_growth_costs_the_new_rows_only(grow_base, grow_data):
    """No retraining and no re-adding: the quantiser, codebooks, old list entries, old codes
    and old refine copies stay as they were; the lists only gain the new rows at their ends."""
    import faiss

    built = _copy(grow_base)
    ivf = faiss.extract_index_ivf(built.index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    codebook = faiss.vector_to_array(faiss.downcast_index(built.index.base_index).pq.centroids)
    lists = _lists(built.index)
    old_rows = np.arange(0, GROW_N, 7)
    decoded = _decoded(built.index, old_rows)
    store = faiss.downcast_index(built.index.refine_index)
    copies = faiss.rev_swig_ptr(store.codes.data(), GROW_N * store.code_size).copy()

    grow_index(built, grow_data[GROW_N:], _keys(GROW_M, "g"), progress=False)

    ivf = faiss.extract_index_ivf(built.index)
    np.testing.assert_array_equal(ivf.quantizer.reconstruct_n(0, ivf.nlist), centroids)
    np.testing.assert_array_equal(faiss.vector_to_array(faiss.downcast_index(built.index.base_index).pq.centroids),
                                  codebook)
    after = _lists(built.index)
    for before_ids, after_ids in zip(lists, after):
        np.testing.assert_array_equal(after_ids[: len(before_ids)], before_ids)
        assert (after_ids[len(before_ids):] >= GROW_N).all()
    assert sorted(np.concatenate(after).tolist()) == list(range(GROW_N + GROW_M))  # each row once
    np.testing.assert_array_equal(_decoded(built.index, old_rows), decoded)
    store = faiss.downcast_index(built.index.refine_index)
    np.testing.assert_array_equal(faiss.rev_swig_ptr(store.codes.data(), GROW_N * store.code_size), copies)
    # Added with the build's assignment settings, searched with the tuned ones again.
    assert built.meta["add_params"] == {"quantizer_efSearch": 16}
    assert faiss.downcast_index(ivf.quantizer).hnsw.efSearch == built.meta["params"]["quantizer_efSearch"]


def test_growth_from_another_distribution_proposes_a_rebuild(grow_base, caplog):
    """The lists were trained on low-rank data; isotropic vectors spread their neighbours
    over many lists, so the tuned nprobe misses them and recall falls under the target."""
    built = _copy(grow_base)
    rng = np.random.default_rng(5)
    other = rng.standard_normal((GROW_N, D)).astype(np.float32)
    with caplog.at_level("WARNING", logger="dataengine.index"):
        grow_index(built, other, _keys(GROW_N, "o"), progress=False)
    m, grow = built.meta, built.meta["history"][-1]
    assert grow["recall_new_rows"] < IVF_CFG.target_recall - 0.1
    assert m["recall_at_k"] + 1.64 * m["recall_se"] < IVF_CFG.target_recall
    assert m["rebuild_proposed"] is True and "under the target 0.95" in m["rebuild_reason"]
    assert "rebuild proposed" in caplog.text


def test_a_flat_index_grown_past_flat_max_proposes_a_rebuild():
    x = synthetic_vectors(2_500, 32, rank=16, seed=2)
    cfg = IndexConfig(flat_max=2_000)
    built = build_index(x[:1_500], _keys(1_500), "m", cfg, progress=False)
    grow_index(built, x[1_500:1_900], _keys(400, "g"), progress=False)
    assert built.meta["rebuild_proposed"] is False and built.meta["recall_at_k"] == 1.0
    grow_index(built, x[1_900:], _keys(600, "h"), progress=False)
    m = built.meta
    assert len(built) == 2_500 and m["recall_at_k"] == 1.0  # still exact
    assert m["rebuild_proposed"] is True and "flat_max=2000" in m["rebuild_reason"] and "IVF" in m["rebuild_reason"]
    assert [h["event"] for h in m["history"]] == ["build", "grow", "grow"]


class _SmallChunks:
    """A VectorSource that hands out 500 rows at a time, whatever it is asked for."""

    def __init__(self, x: np.ndarray, keys: list[str]):
        self.x, self.keys, self.dim = x, keys, x.shape[1]

    def chunks(self, rows: int):
        for s in range(0, len(self.x), 500):
            yield self.x[s : s + 500]


def test_a_bad_vector_met_half_way_leaves_the_index_as_it_was(grow_base, grow_data):
    built = _copy(grow_base)
    lists = [len(ids) for ids in _lists(built.index)]
    _, before = built.search(grow_data[:200], 10)
    new = grow_data[GROW_N:].copy()
    new[1_200] = np.nan  # in the third chunk: two have been added when it is met
    with pytest.raises(ValueError, match=r"key 'g001200' \(row 1200\) has NaN"):
        grow_index(built, _SmallChunks(new, _keys(GROW_M, "g")), progress=False)
    assert len(built) == GROW_N and len(built.keys) == GROW_N and len(built.meta["history"]) == 1
    assert [len(ids) for ids in _lists(built.index)] == lists
    np.testing.assert_array_equal(built.search(grow_data[:200], 10)[1], before)
    new[1_200] = grow_data[GROW_N + 1_200]
    grow_index(built, _SmallChunks(new, _keys(GROW_M, "g")), progress=False)
    assert sorted(np.concatenate(_lists(built.index)).tolist()) == list(range(GROW_N + GROW_M))
    _, rows = built.search(new[1_100:1_300], 1)
    assert (rows[:, 0] == GROW_N + np.arange(1_100, 1_300)).mean() >= 0.98


def test_growth_refuses_keys_already_indexed_and_leaves_the_index_as_it_was():
    x = synthetic_vectors(600, 16, rank=8, seed=3)
    built = build_index(x[:500], _keys(500), "m", progress=False)
    new_keys = _keys(100, "g")
    with pytest.raises(ValueError, match="key 's000007' is already in the index \\(row 7\\)"):
        grow_index(built, x[500:], new_keys[:50] + ["s000007"] + new_keys[51:], progress=False)
    with pytest.raises(ValueError, match="duplicate key 'g000003'"):
        grow_index(built, x[500:], new_keys[:50] + ["g000003"] + new_keys[51:], progress=False)
    with pytest.raises(ValueError, match="new vectors have 8 dimensions, the index 16"):
        grow_index(built, x[500:, :8], new_keys, progress=False)
    assert len(built) == 500 and len(built.keys) == 500 and len(built.meta["history"]) == 1


# ---------------------------------------------------------------------------------------
# Memory budget
# ---------------------------------------------------------------------------------------


class _CountingSource:
    """A VectorSource over an array that records each chunk it hands out."""

    def __init__(self, x: np.ndarray, keys: list[str]):
        self.x, self.keys, self.dim = x, keys, x.shape[1]
        self.sizes: list[int] = []
        self.passes = 0

    def chunks(self, rows: int):
        self.passes += 1
        for s in range(0, len(self.x), rows):
            self.sizes.append(min(rows, len(self.x) - s))
            yield self.x[s : s + rows].astype(np.float16)


def test_a_build_under_a_small_budget_streams_and_finds_what_an_unbounded_one_finds(data):
    x = data.astype(np.float16).astype(np.float32)  # what the source hands out
    free = build_index(x, _keys(N), "m", IndexConfig(flat_max=2_000, train_size=10_000), progress=False)
    source = _CountingSource(data, _keys(N))
    cfg = IndexConfig(flat_max=2_000, train_size=10_000, memory_budget_mb=14)
    bounded = build_index(source, None, "m", cfg, progress=False)
    plan = bounded.meta["memory"]
    assert plan["budget_mb"] == 14 and plan["peak_mb"] <= 14 and plan["train_rows"] == 10_000
    assert plan["chunk_rows"] < N / 2 and max(source.sizes) <= plan["chunk_rows"]
    assert source.passes == 2  # one to read the training sample and held-out rows, one to add
    assert bounded.meta["factory"] == free.meta["factory"]
    _apply_params(bounded.index, free.meta["params"])
    s1, r1 = free.search(data[:300], 10)
    s2, r2 = bounded.search(data[:300], 10)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    assert bounded.meta["recall_at_k"] >= 0.95 and free.meta["recall_at_k"] >= 0.95


def test_a_budget_too_small_is_refused_and_a_tight_one_takes_8_bit_copies():
    from dataengine.index import MemoryBudgetError

    x = synthetic_vectors(5_000, 64, rank=16, seed=4)
    with pytest.raises(MemoryBudgetError, match=r"memory_budget_mb=1 is too small for 5000 x 64.*at least \d+ MB"):
        build_index(x, _keys(5_000), "m", IndexConfig(memory_budget_mb=1), progress=False)
    assert choose_factory(1_000_000, 512, IndexConfig()).endswith("Refine(SQfp16)")  # 1 GiB of copies
    assert choose_factory(1_000_000, 512, IndexConfig(memory_budget_mb=1024)).endswith("Refine(SQ8)")


# ---------------------------------------------------------------------------------------
# The workspace's indexes: streamed from the lake, grown by new vectors
# ---------------------------------------------------------------------------------------


def _add_samples(catalog, keys: list[str], split: str = "train", part: str = "t") -> None:
    """Catalogue `keys` in `split` as one lake part (rewriting a part replaces it)."""
    from dataengine import lake
    from dataengine.schema import SAMPLES

    rows = pa.Table.from_pylist([{"key": k, "split": split} for k in keys], schema=SAMPLES)
    lake.write_part(catalog.ws.lake, "samples", rows, part=part)


def test_lake_vectors_stream_the_newest_vector_of_each_key(ws, catalog):
    from dataengine.embed import load_vectors, store_vectors
    from dataengine.lakevectors import LakeVectors

    keys = _keys(300)
    _add_samples(catalog, keys[:250])
    _add_samples(catalog, keys[250:], split="pool", part="p")
    x = synthetic_vectors(300, 16, rank=8, seed=6)
    store_vectors(ws, keys[:200], x[:200], "m", "image")
    store_vectors(ws, keys[100:], x[100:], "m", "image")
    store_vectors(ws, keys[:10], -x[:10], "m", "image")  # re-embedded: the newest wins
    store_vectors(ws, keys, x, "other-model", "image")
    source = LakeVectors(catalog, "m", "image", splits=["train"])
    got = np.concatenate(list(source.chunks(7)))
    want_keys, want = load_vectors(catalog, "m", "image", splits=["train"])
    assert sorted(source.keys.tolist()) == want_keys and len(got) == 250 and source.dim == 16
    by_key = dict(zip(source.keys.tolist(), got))
    np.testing.assert_array_equal(np.stack([by_key[k] for k in want_keys]), want.astype(np.float16))
    np.testing.assert_array_equal(by_key["s000003"], (-x[3]).astype(np.float16))
    assert all(len(c) <= 7 for c in source.chunks(7))


def test_workspace_index_grows_by_new_vectors_and_rebuilds_when_keys_go(ws, catalog):
    from dataengine.embed import store_vectors
    from dataengine.gaps import build_split_index

    keys = _keys(3_000)
    _add_samples(catalog, keys)
    x = synthetic_vectors(3_000, 32, rank=16, seed=7)
    store_vectors(ws, keys[:1_200], x[:1_200], "m", "image")
    store_vectors(ws, keys[1_200:2_400], x[1_200:2_400], "m", "image")
    cfg = IndexConfig(flat_max=1_000)
    first = build_split_index(ws, "m", "train", cfg=cfg, progress=False)
    assert first.meta["update"] == "built (no saved index)" and first.meta["factory"].startswith("IVF")

    store_vectors(ws, keys[2_400:], x[2_400:], "m", "image")
    grown = build_split_index(ws, "m", "train", cfg=cfg, progress=False)
    assert grown.meta["update"] == "grew by 600" and len(grown) == 3_000
    assert sorted(grown.keys.tolist()) == keys
    assert [h["event"] for h in grown.meta["history"]] == ["build", "grow"]
    _, rows = grown.search(x[2_400:2_500], 1)
    assert [grown.keys[r] for r in rows[:, 0]] == keys[2_400:2_500]

    assert build_split_index(ws, "m", "train", cfg=cfg, progress=False).meta["update"] == "up to date"
    assert build_split_index(ws, "m", "train", cfg=cfg, progress=False, rebuild=True).meta["update"] == "built (asked)"
    _add_samples(catalog, keys[1:])  # a key leaves the split: growth cannot drop it
    again = build_split_index(ws, "m", "train", cfg=cfg, progress=False)
    assert again.meta["update"] == "built (1 indexed keys are no longer in the split)" and len(again) == 2_999
