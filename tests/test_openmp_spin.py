import importlib
import os

import fedsplit


def _reload_with(monkeypatch, **env):
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    importlib.reload(fedsplit)
    return os.environ.get("GOMP_SPINCOUNT")


def test_importing_fedsplit_shortens_openmp_spinning_by_default(monkeypatch):
    assert _reload_with(monkeypatch) == "20000"


def test_a_users_own_openmp_settings_win(monkeypatch):
    assert _reload_with(monkeypatch, GOMP_SPINCOUNT="300000") == "300000"
    assert _reload_with(monkeypatch, OMP_WAIT_POLICY="ACTIVE") is None
