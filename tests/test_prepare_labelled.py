"""`dist-llm prepare pack=classify|sft`: labels, loss masks, chat templates, bad rows, resume."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from dist_llm.config.store import compose_prepare
from dist_llm.data.labelled import load_classify, load_sft
from dist_llm.data.tokenizer import ByteTokenizer
from dist_llm.prepare import Interrupted, run_prepare
from dist_llm.prepare.labelled import render_segments
from dist_llm.prepare.plan import BadInputError

BASE = ["tokenizer=byte", "dedup=none", "workers=1", "progress=off", "split.val_every=5"]


def _jsonl(path: Path, rows: List[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _prep(tmp: Path, name: str, inp: Path, *extra: str) -> Dict:
    return run_prepare(compose_prepare([f"output_dir={tmp / name}", "input=files", f"input.paths=[{inp}]",
                                        *BASE, *extra]))


def test_classify_labels_ids_and_manifest(tmp_path: Path) -> None:
    rows = [{"text": f"sample {i} " + "x" * (i % 7), "label": ["pos", "neg", "mid"][i % 3]} for i in range(60)]
    r = _prep(tmp_path, "c", _jsonl(tmp_path / "c.jsonl", rows), "pack=classify", "pack.seq_len=16")
    assert r["stats"]["malformed"] == 0
    tr, va = load_classify(tmp_path / "c" / "train"), load_classify(tmp_path / "c" / "val")
    assert tr["classes"] == ["mid", "neg", "pos"]  # sorted labels seen
    assert len(tr["labels"]) == 48 and len(va["labels"]) == 12
    tok = ByteTokenizer()
    for i in range(3):  # val holds rows 0, 5, 10, ... (val_every=5)
        n = int(va["lengths"][i])
        text = tok.decode(va["input_ids"][i, :n].tolist())
        src = rows[5 * i]
        assert text == src["text"].strip()[:16] and va["classes"][int(va["labels"][i])] == src["label"]
        assert (va["input_ids"][i, n:] == tok.special_ids["pad"]).all()
    assert sum(tr["manifest"]["label_counts"].values()) == 48


def test_classify_bad_labels_are_malformed_with_file_line_field(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(20)]
    rows[3] = {"text": "no label"}
    rows[7] = {"text": "unknown", "label": "zzz"}
    inp = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BadInputError) as e:
        _prep(tmp_path, "x", inp, "pack=classify", "pack.labels=[a,b]")
    msg = str(e.value)
    assert f"{inp}:4: missing label field 'label'" in msg
    assert f"{inp}:8: unknown label 'zzz' in field 'label'" in msg
    r = _prep(tmp_path, "y", inp, "pack=classify", "pack.labels=[a,b]", "input.max_bad_fraction=0.2")
    assert r["stats"]["malformed"] == 2 and load_classify(tmp_path / "y" / "train")["classes"] == ["a", "b"]


def test_sft_mask_covers_response_only_and_bad_rows(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}?", "response": f"a{i}!"} for i in range(10)]
    rows.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "yo"}, {"role": "user", "content": "more"},
                              {"role": "assistant", "content": "ok"}]})
    rows.append({"prompt": "where is the answer"})  # malformed: no response
    inp = _jsonl(tmp_path / "s.jsonl", rows)
    r = _prep(tmp_path, "s", inp, "pack=sft", "pack.seq_len=96", "input.max_bad_fraction=0.1", "split.val_every=0",
              "split.val_fraction=0")
    assert r["stats"]["malformed_examples"] == [f"{inp}:12: no response: field 'response' is missing or empty"]
    d = load_sft(tmp_path / "s" / "train")
    tok, eos = ByteTokenizer(), ByteTokenizer.special_ids["eos"]
    trained = [[t for t in row.tolist() if t != -100] for row in d["targets"]]
    assert trained[0] == tok.encode("a0!") + [eos]
    assert trained[10] == tok.encode("yo") + [eos] + tok.encode("ok") + [eos]  # both turns, no prompt
    assert tok.decode(d["input_ids"][0][d["attention_mask"][0]].tolist()) == "<|user|>\nq0?\n<|assistant|>\na0!"


def test_sft_chat_template_segments() -> None:
    tpl = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
           "{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    segs = render_segments(msgs, tpl, "<E>")
    assert "".join(s for s, _ in segs) == "[user]hi[assistant]yo<E>"
    assert [s for s, loss in segs if loss] == ["yo<E>"]


def test_labelled_resume_equals_uninterrupted(tmp_path: Path) -> None:
    ov = ["input=stdlib_classify", "pack=classify", "pack.samples_per_shard=100", "input.chunk_records=300",
          *BASE]
    run_prepare(compose_prepare([f"output_dir={tmp_path / 'a'}", *ov]))
    with pytest.raises(Interrupted):
        run_prepare(compose_prepare([f"output_dir={tmp_path / 'b'}", *ov, "debug.stop_after_shards=3"]))
    run_prepare(compose_prepare([f"output_dir={tmp_path / 'b'}", *ov]))
    for split in ("train", "val"):
        a, b = load_classify(tmp_path / "a" / split), load_classify(tmp_path / "b" / split)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    counts = load_classify(tmp_path / "a" / "train")["manifest"]["label_counts"]
    assert len(counts) == 6 and min(counts.values()) > 100  # balanced classes
