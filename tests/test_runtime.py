from dataengine.runtime import OFFLINE_DEFAULTS, apply_offline_defaults


def test_defaults_fill_only_what_is_unset():
    env = {"HF_HUB_OFFLINE": "0"}
    applied = apply_offline_defaults(env)
    assert env["HF_HUB_OFFLINE"] == "0", "a user's own setting must win"
    assert "HF_HUB_OFFLINE" not in applied
    for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED", "DO_NOT_TRACK",
                 "PREFECT_SERVER_ANALYTICS_ENABLED"):
        assert env[name] == OFFLINE_DEFAULTS[name]
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


def test_openblas_core_is_named_from_the_cpu_flags():
    from dataengine.runtime import openblas_core

    assert openblas_core("flags\t\t: fpu sse2 avx2 fma avx512f avx512dq avx512bw avx512vl\n") == "SkylakeX"
    assert openblas_core("processor : 0\nflags : fpu sse2 avx2 fma\n") == "Haswell"
    assert openblas_core("flags : fpu sse2 sse3\n") is None
    env = {"OPENBLAS_CORETYPE": "Zen"}
    apply_offline_defaults(env)
    assert env["OPENBLAS_CORETYPE"] == "Zen", "a user's own setting must win"


def test_faiss_blas_runs_the_kernels_of_this_cpu():
    """faiss-cpu's bundled OpenBLAS falls back to SSE3 kernels on CPUs newer than it (4x
    slower exact search); after the defaults it must run this CPU's own."""
    import glob
    import os
    import subprocess
    import sys

    from dataengine.runtime import openblas_core

    import faiss

    libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(faiss.__file__)), "faiss_cpu.libs", "libopenblas*.so"))
    if not libs or openblas_core() is None:
        import pytest

        pytest.skip("faiss has no bundled OpenBLAS here, or this CPU has neither AVX2 nor AVX-512")
    code = ("import ctypes, faiss; lib = ctypes.CDLL(%r); lib.openblas_get_corename.restype = ctypes.c_char_p; "
            "print(lib.openblas_get_corename().decode())" % libs[0])
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    apply_offline_defaults(env)
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert got.strip() == openblas_core()
