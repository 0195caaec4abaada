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
