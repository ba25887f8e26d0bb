"""Fixtures for the data-preparation tests.

Shared data comes from $SHARED_DATA (default: <repo>/../shared/data); tests that need it are
skipped when it is missing. tiktoken runs offline from $TIKTOKEN_CACHE_DIR, defaulting to
$SHARED_DATA/tiktoken_cache.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DATA_DIR = os.path.join(REPO_ROOT, "data")
SHARED_DATA = os.path.abspath(os.environ.get("SHARED_DATA") or os.path.join(REPO_ROOT, "..", "shared", "data"))


def _cache_dir():
    return os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(SHARED_DATA, "tiktoken_cache")


def _load_module(name):
    """data/<name>.py loaded by file path under its own module name (the repository also has a
    top-level common/ folder)."""
    spec = importlib.util.spec_from_file_location(f"structgpt_data_{name}", os.path.join(DATA_DIR, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_common():
    return _load_module("common")


@pytest.fixture(scope="session")
def common():
    return _load_common()


def load_data_script(name):
    """data/<name>.py as a module, its `from common import ...` bound to data/common.py."""
    saved = sys.modules.get("common")
    sys.modules["common"] = _load_common()
    try:
        return _load_module(name)
    finally:
        if saved is None:
            del sys.modules["common"]
        else:
            sys.modules["common"] = saved


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared data folder not found: {SHARED_DATA} (set SHARED_DATA)")
    return SHARED_DATA


def shared_file(shared_data, rel):
    p = os.path.join(shared_data, rel)
    if not os.path.exists(p):
        pytest.skip(f"shared data file not found: {p}")
    return p


@pytest.fixture(scope="session")
def script_env():
    env = dict(os.environ)
    cache = _cache_dir()
    if not os.path.isdir(cache):
        pytest.skip(f"tiktoken cache not found: {cache} (set TIKTOKEN_CACHE_DIR or SHARED_DATA)")
    env["TIKTOKEN_CACHE_DIR"] = cache
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@pytest.fixture(scope="session")
def enc(script_env):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", script_env["TIKTOKEN_CACHE_DIR"])
    import tiktoken
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="session")
def run_script(script_env):
    """run_script("openwebtext.py", "--input", ..., env_extra={...}) -> CompletedProcess."""

    def run(script, *args, env_extra=None, timeout=120):
        env = dict(script_env)
        if env_extra:
            env.update(env_extra)
        return subprocess.run([sys.executable, os.path.join(DATA_DIR, script), *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO_ROOT)

    return run
