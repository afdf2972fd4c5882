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
