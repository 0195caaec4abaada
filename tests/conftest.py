import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def stdlib_cache(tmp_path_factory):
    """One small embedded corpus (300 kB, seq_len 32) shared by the end-to-end tests; each test
    copies it into its own working directory so runs stay independent."""
    from dist_llm.prepare import build_stdlib_corpus

    root = tmp_path_factory.mktemp("stdlib")
    build_stdlib_corpus(root / "data" / "stdlib", 32, max_bytes=300_000)
    return root / "data" / "stdlib"


@pytest.fixture
def workdir(tmp_path, stdlib_cache):
    shutil.copytree(stdlib_cache, tmp_path / "data" / "stdlib")
    return tmp_path


@pytest.fixture(scope="session")
def compress_runs(tmp_path_factory, stdlib_cache):
    """{"gpt2": run dir, "llama": run dir}: tiny models trained 300 steps on the embedded corpus."""
    from compress_fixtures import train_checkpoint

    root = tmp_path_factory.mktemp("compress")
    return {preset: train_checkpoint(root, stdlib_cache, preset) for preset in ("gpt2", "llama")}


# Variables that make a process a rank of some job. A test that sets them in this process (an
# in-process process group, a launcher helper) must not hand them to the next test, whose
# subprocesses would then believe they are rank 0 of a world of one.
_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
             "TORCHELASTIC_USE_AGENT_STORE", "DIST_LLM_JOB_ID", "DIST_LLM_LAUNCHER")


@pytest.fixture(autouse=True, scope="module")
def _no_rank_env_leaks():
    import os

    saved = {k: os.environ.get(k) for k in _RANK_ENV}
    yield
    leaked = {k: os.environ.get(k) for k in _RANK_ENV if os.environ.get(k) != saved[k]}
    for k in leaked:
        if saved[k] is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = saved[k]
