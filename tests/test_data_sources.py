"""Shards read from URLs (dist_llm/data/sources.py) through webdataset's opener: a real HTTP server
(http.server in a thread), ``pipe:`` commands and ``file://`` give exactly the directory's batches;
a connection dropped mid-shard is retried and a bounded number of failures ends naming the URL; a
wrong checksum fails naming the URL; manifest names cannot leave the prefix or become commands;
``dist-llm prepare`` publishes to a directory or a ``pipe:`` upload command."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
from shard_server import ShardServer

from dist_llm.config.store import compose, compose_prepare
from dist_llm.config.validate import ConfigError, validate
from dist_llm.data import ShardWriter, TrainLoader, ValLoader
from dist_llm.data.shards import sha256_bytes
from dist_llm.data.sources import ChecksumMismatch, FetchOptions, ShardFetchError, check_url, location
from dist_llm.fileio import UnsafePathError
from dist_llm.prepare.publish import publish

SEQ, VOCAB, PER_SHARD, LANES = 16, 1000, 10, 2
FAST = FetchOptions(retries=2, retry_backoff_s=0.01)


def _write(root: Path) -> Path:
    """Sample i of a split is [tag, i, i+1, ...]: identifiable in a batch. train: 10 shards, the last short."""
    for split, n, tag in (("train", 95, 1), ("val", 30, 2)):
        with ShardWriter(root / split, SEQ, VOCAB, PER_SHARD) as w:
            for i in range(n):
                w.add(np.concatenate([[tag], (i + np.arange(SEQ)) % VOCAB]))
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = _write(tmp_path_factory.mktemp("served"))
    with ShardServer(root) as srv:
        yield root, srv


@pytest.fixture
def own(tmp_path: Path):
    """A private copy (tests that damage the data or count requests)."""
    root = _write(tmp_path / "data")
    with ShardServer(root) as srv:
        yield root, srv


def _loader(path: str, fetch: Optional[FetchOptions] = FAST, workers: int = 0) -> TrainLoader:
    return TrainLoader([(path, 1.0)], SEQ, LANES, 0, 1, micro_batch_size=2, grad_accum=2, seed=7,
                       num_workers=workers, fetch=fetch)


def _batches(loader: TrainLoader, steps: int = 25) -> List[np.ndarray]:
    """25 steps x 4 samples: more than one epoch (90 samples), so every shard is read."""
    return [t.numpy().copy() for _ in range(steps) for t in loader.next_step()]


def _same(a: List[np.ndarray], b: List[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _shards(root: Path) -> List[str]:
    return [s["file"] for s in json.loads((root / "train" / "manifest.json").read_text())["shards"]]


def test_url_sources_give_the_directory_batches_and_resume(served):
    root, srv = served
    ref_loader = _loader(str(root / "train"))
    ref = _batches(ref_loader)
    urls = {"http": f"{srv.url}/train", "http/": f"{srv.url}/train/", "pipe": f"pipe:cat {root}/train/{{name}}",
            "file": f"file://{root}/train", "http-name": f"{srv.url}/train/{{name}}"}
    for kind, url in urls.items():
        loader = _loader(url)
        assert _same(_batches(loader), ref), kind
        got, want = loader.state_dict(), ref_loader.state_dict()
        assert got["lane_positions"] == want["lane_positions"], kind  # same shards, same offsets
        assert [s["fingerprint"] for s in got["sources"]] == [s["fingerprint"] for s in want["sources"]]
    # DataLoader workers carry the fetch options; a directory checkpoint resumes from the URL
    assert _same(_batches(_loader(urls["http"], workers=2)), ref)
    resumed = _loader(urls["pipe"])
    resumed.load_state_dict(ref_loader.state_dict())
    assert _same(_batches(resumed, 5), _batches(ref_loader, 5))


def test_val_loader_reads_urls(served):
    root, srv = served
    ref = ValLoader(str(root / "val"), SEQ, 0, 1, 4, 24).batches()
    for url in (f"{srv.url}/val", f"pipe:cat {root}/val/{{name}}"):
        got = ValLoader(url, SEQ, 0, 1, 4, 24, fetch=FAST).batches()
        assert len(got) == 6 and all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(got, ref))


def test_connection_dropped_mid_shard_is_retried(own, caplog):
    root, srv = own
    ref = _batches(_loader(str(root / "train")))
    srv.drops.update({name: 1 for name in _shards(root)} | {"manifest.json": 1})
    with caplog.at_level(logging.WARNING, logger="dist_llm.data"):
        assert _same(_batches(_loader(f"{srv.url}/train")), ref)
    retried = sorted(r.args[0] for r in caplog.records if "failed (attempt 1 of 3" in r.getMessage())
    # every file: one request cut short, then read in full (shards read again in epoch 2 come whole)
    assert retried == sorted(f"{srv.url}/train/{name}" for name in _shards(root) + ["manifest.json"])
    for name in _shards(root):
        assert srv.requests.count(f"/train/{name}") >= 2, name
    assert srv.requests.count("/train/manifest.json") == 2 and "transfer closed with data missing" in caplog.text


def test_bounded_failures_end_naming_the_url(own):
    root, srv = own
    srv.drops.update({name: 1000 for name in _shards(root)})
    loader = _loader(f"{srv.url}/train", FetchOptions(retries=2, retry_backoff_s=0.05))
    t = time.time()
    with pytest.raises(ShardFetchError) as err:
        _batches(loader)
    msg = str(err.value)
    url = msg.split("could not read ", 1)[1].split(" ", 1)[0]
    assert url.startswith(f"{srv.url}/train/shard-") and url.endswith(".tar"), msg
    assert "after 3 attempt(s) (data.retries=2)" in msg and "transfer closed with data missing" in msg
    assert srv.requests.count(url[len(srv.url):]) == 3  # bounded: 1 + retries
    assert time.time() - t < 20  # backoff 0.05 + 0.1 s, not curl's own retry loop


def test_wrong_checksum_fails_naming_the_url(own):
    root, srv = own
    for name in _shards(root):  # a shard replaced without its manifest (one byte of a token changed)
        f = root / "train" / name
        data = bytearray(f.read_bytes())
        data[-1100] ^= 1
        f.write_bytes(bytes(data))
    for url in (f"{srv.url}/train", f"pipe:cat {root}/train/{{name}}"):
        with pytest.raises(ChecksumMismatch, match=r"checksum mismatch for (http://127\.0\.0\.1:\d+/train/|pipe:cat "
                                                   r"\S+/train/)shard-\d{6}\.tar: manifest says [0-9a-f]{64}, got "
                                                   r"[0-9a-f]{64} .*in each of 2 attempt"):
            _batches(_loader(url, FetchOptions(retries=1, retry_backoff_s=0.01)))


def test_cache_dir_keeps_verified_shards_and_refetches_a_corrupt_copy(own, tmp_path):
    root, srv = own
    ref = _batches(_loader(str(root / "train")))
    opts = FetchOptions(cache_dir=str(tmp_path / "cache"), retries=1, retry_backoff_s=0.01)
    assert _same(_batches(_loader(f"{srv.url}/train", opts)), ref)
    cached = sorted((tmp_path / "cache").rglob("*.tar"))
    shas = {s["sha256"] for s in json.loads((root / "train" / "manifest.json").read_text())["shards"]}
    assert {p.stem for p in cached} == shas and all(sha256_bytes(p.read_bytes()) == p.stem for p in cached)
    srv.requests.clear()
    assert _same(_batches(_loader(f"{srv.url}/train", opts)), ref)
    assert srv.requests == ["/train/manifest.json"]  # every shard from the cache
    cached[0].write_bytes(b"garbage")
    assert _same(_batches(_loader(f"{srv.url}/train", opts)), ref)
    assert len(srv.requests) == 3 and sha256_bytes(cached[0].read_bytes()) == cached[0].stem
    # a manifest "sha256" that is a path never becomes one under cache_dir (the fetch fails its check)
    m = json.loads((root / "train" / "manifest.json").read_text())
    m["shards"][0]["sha256"] = "../../escaped"
    (root / "train" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ChecksumMismatch, match="manifest says ../../escaped"):
        _batches(_loader(f"{srv.url}/train", opts))
    assert not list(tmp_path.rglob("escaped*"))


BAD_NAMES = ["../val/shard-000000.tar", "/etc/passwd", "http://evil.example/x.tar", "//evil.example/x.tar",
             "a/../../x.tar", "x.tar;touch PWNED", "$(touch PWNED).tar", "`touch PWNED`.tar", "pipe:touch PWNED",
             "x.tar\ntouch PWNED", "", "a//b.tar", ".hidden/../x.tar"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_manifest_names_cannot_leave_the_prefix_or_run_commands(own, bad, tmp_path, monkeypatch):
    root, srv = own
    monkeypatch.chdir(tmp_path)
    m = json.loads((root / "train" / "manifest.json").read_text())
    m["shards"][3]["file"] = bad
    (root / "train" / "manifest.json").write_text(json.dumps(m))
    for url in (f"{srv.url}/train", f"pipe:cat {root}/train/{{name}}", f"file://{root}/train"):
        with pytest.raises(UnsafePathError, match="only name files inside its own prefix"):
            _loader(url)
    assert not list(tmp_path.glob("PWNED*")) and not (root / "train" / "PWNED").exists()


def test_a_directory_manifest_cannot_supply_a_command(tmp_path, monkeypatch):
    """Commands come only from the config: a local manifest naming "pipe:..." is a (missing) file."""
    _write(tmp_path / "d")
    monkeypatch.chdir(tmp_path / "d" / "train")  # split "." : the name alone would look like a URL
    m = json.loads(Path("manifest.json").read_text())
    m["shards"][0]["file"] = f"pipe:touch {tmp_path}/PWNED; cat shard-000000.tar"
    Path("manifest.json").write_text(json.dumps(m))
    assert location(".", m["shards"][0]["file"]).startswith("./pipe:")
    with pytest.raises(FileNotFoundError, match="listed in the manifest but missing"):
        _batches(_loader("."))
    assert not (tmp_path / "PWNED").exists()


def test_bad_urls_and_a_stalled_command(served):
    root, _ = served
    for bad, why in (("pipe:cat /x/manifest.json", "needs {name}"), ("file://relative/dir", "absolute path"),
                     ("http:///dir", "names no host")):
        with pytest.raises(ValueError, match=why):
            check_url(bad)
        with pytest.raises(ValueError, match=why):
            _loader(bad)
    with pytest.raises(ShardFetchError, match=r"could not read pipe:false .*the command exited with status 1"):
        _loader("pipe:false {name}")
    t = time.time()
    with pytest.raises(ShardFetchError, match=r"pipe:sleep 8.*data.fetch_timeout_s=0.3s"):
        _loader(f"pipe:sleep 8; cat {root}/train/{{name}}", FetchOptions(retries=0, timeout_s=0.3))
    assert time.time() - t < 10


def test_config_fields_are_validated_before_launch():
    ok = compose(["data.train=[{path:'http://127.0.0.1:8000/web/train'}]", "data.val='pipe:cat /d/val/{name}'",
                  "data.cache_dir=/tmp/shard-cache", "data.retries=5", "data.retry_backoff_s=0.5"])
    assert ok.data.train[0].path == "http://127.0.0.1:8000/web/train" and ok.data.val == "pipe:cat /d/val/{name}"
    assert FetchOptions.from_config(ok.data) == FetchOptions("/tmp/shard-cache", 5, 0.5, 600.0)
    validate(ok, 2)
    bad = compose(["data.train=[{path:'pipe:aws s3 cp s3://b/train/manifest.json -'},{path:'s3://b/train'}]",
                   "data.val='file://rel/val'", "data.retries=-1", "data.retry_backoff_s=-1",
                   "data.fetch_timeout_s=-2", "train.eval_every=5"])
    with pytest.raises(ConfigError) as err:
        validate(bad, 2)
    text = "\n".join(err.value.problems)
    for want in ("data.train[0].path='pipe:aws s3 cp s3://b/train/manifest.json -': a pipe: source needs {name}",
                 "data.train[1].path='s3://b/train'", "pipe:aws s3 cp s3://b/train/{name} -",
                 "data.val='file://rel/val': a file: URL needs an absolute path", "data.retries=-1",
                 "data.retry_backoff_s=-1", "data.fetch_timeout_s=-2"):
        assert want in text, want


def _prepare(out: Path, destination: str):
    from dist_llm.prepare import run_prepare

    return run_prepare(compose_prepare([f"output_dir={out}", "input.embedded_max_bytes=60000", "workers=1",
                                        "progress=off", f"pack.seq_len={SEQ}", "pack.samples_per_shard=64",
                                        "split.val_every=3", f"destination='{destination}'"]))


def _files(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def test_prepare_publishes_to_a_pipe_command_and_a_directory(tmp_path):
    out, dest, copy = tmp_path / "out", tmp_path / "bucket" / "web", tmp_path / "copy"
    cmd = f'pipe:mkdir -p "$(dirname {dest}/{{name}})" && cat > {dest}/{{name}}'
    result = _prepare(out, cmd)
    assert result["splits"]["train"]["shards"] > LANES and result["splits"]["val"]["shards"] >= 1
    assert _files(dest) == _files(out) and "train/manifest.json" in _files(dest)
    assert "destination" not in result["config"] and "mkdir" not in (out / "manifest.json").read_text()
    ref = _batches(_loader(str(out / "train")), 10)
    assert _same(_batches(_loader(f"pipe:cat {dest}/train/{{name}}"), 10), ref)
    assert _prepare(out, str(copy))["skipped"]  # a finished output is still published
    assert _files(copy) == _files(out)
    with pytest.raises(ShardFetchError, match=r"could not write pipe:exit 3 #train/shard-000000\.tar after 2 "
                                              r"attempt\(s\).*status 3"):
        publish(out, "pipe:exit 3 #{name}", ["train", "val"], FetchOptions(retries=1, retry_backoff_s=0.01))


def test_doctor_checks_url_sources(own):
    from dist_llm.train.doctor import check_shards

    root, srv = own
    cfg = compose([f"data.train=[{{path:'{srv.url}/train'}}]", f"data.val='pipe:cat {root}/val/{{name}}'",
                   "train.eval_every=5", "data.retries=0"])
    name, ok, detail = check_shards(cfg)
    assert ok and detail.startswith("train: 10 shards, first verified; val: 3 shards, first verified"), detail
    first = json.loads((root / "train" / "manifest.json").read_text())["shards"][0]["file"]
    (root / "train" / first).write_bytes(b"not the shard")
    name, ok, detail = check_shards(cfg)
    assert not ok and detail.startswith(f"train: {srv.url}/train/{first} sha256 "), detail


def test_evaluation_reads_url_splits(served):
    import torch

    from dist_llm.evaluation import evaluate_lm, evaluate_task
    from dist_llm.train.tasks import build_task

    root, srv = served
    cfg = compose(["experiment=smoke", "logging=none", f"model.vocab_size={VOCAB}", f"train.seq_len={SEQ}"])
    torch.manual_seed(0)
    task = build_task(cfg)
    model = task.build_model(cfg)
    ref_task = evaluate_task(task, model, str(root / "val"), max_samples=24, batch_size=8)
    ref_lm = evaluate_lm(model, str(root / "val"), batch_size=8, max_batches=3)
    assert ref_task["samples"] == 24 and ref_lm["tokens"] == 24 * SEQ
    for url in (f"{srv.url}/val", f"pipe:cat {root}/val/{{name}}"):
        assert evaluate_task(task, model, url, max_samples=24, batch_size=8) == ref_task, url
        assert evaluate_lm(model, url, batch_size=8, max_batches=3) == ref_lm, url
