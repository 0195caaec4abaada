"""task=distill: the loss maths, the teacher (frozen, not the engine's, located from a checkpoint
or a Hugging Face directory), the tokenizer/vocabulary checks, and a 2-rank ZeRO-3 run through
the real CLI (gloo, DeepSpeed on CPU) whose optimizer state covers the student only."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from dist_llm.config.schema import (  # noqa: E402
    DataConfig, DatasetSource, DistillTaskConfig, JobConfig, ModelConfig, TaskConfig,
)
from dist_llm.config.validate import ConfigError, validate  # noqa: E402
from dist_llm.models import build_model  # noqa: E402
from dist_llm.train.tasks import build_task  # noqa: E402
from dist_llm.train.tasks.distill import DistillError, DistillTask, distill_loss  # noqa: E402
from serve_helpers import write_tiny_checkpoint  # noqa: E402

STUDENT = ModelConfig(preset="gpt2", n_layers=1, n_heads=2, d_model=32, max_seq_len=96, vocab_size=258)


def _job(teacher: str, data_dir: Path, **distill) -> JobConfig:
    return JobConfig(model=STUDENT, data=DataConfig(train=[DatasetSource(path=str(data_dir))]),
                     task=TaskConfig(kind="distill", distill=DistillTaskConfig(teacher=teacher, **distill)))


def test_distill_loss_is_t2_kl_plus_ce():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    y = torch.randint(0, 11, (2, 5), generator=g)
    y[1, 4] = -100  # ignored position
    T, alpha = 3.0, 0.3
    loss, kl_sum, ce_sum, n = distill_loss(s, t, y, T, alpha)
    keep = y.reshape(-1) != -100
    ps, pt = F.softmax(s.reshape(-1, 11)[keep] / T, -1), F.softmax(t.reshape(-1, 11)[keep] / T, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    ce = F.cross_entropy(s.reshape(-1, 11)[keep], y.reshape(-1)[keep])
    assert int(n) == 9
    assert torch.allclose(loss, alpha * T * T * kl + (1 - alpha) * ce, atol=1e-6)
    assert torch.allclose(kl_sum / n, kl, atol=1e-6) and torch.allclose(ce_sum / n, ce, atol=1e-6)
    # identical distributions: no KL, and alpha=0 is the plain CE
    assert float(distill_loss(s, s, y, T, 1.0)[0]) == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(distill_loss(s, t, y, T, 0.0)[0], ce, atol=1e-6)


def test_teacher_from_our_checkpoint_is_frozen_and_only_the_student_learns(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path)  # byte tokenizer, vocab 258; its data dir is the student's too
    job = _job(str(ckpt.parent.parent), tmp_path / "data" / "train", temperature=2.0, alpha=0.5)
    task = build_task(job)
    assert isinstance(task, DistillTask) and task._teacher is None  # weights load on first use
    torch.manual_seed(0)
    student = build_model(STUDENT)
    batch = torch.randint(0, 256, (3, 17))
    loss, metrics = task.loss(student, batch)
    loss.backward()
    teacher = task.teacher(torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert next(teacher.parameters()).dtype == torch.float32  # CPU: fp32 (bf16 only where supported)
    assert set(metrics) == {"distill_kl", "distill_ce"} and int(metrics["distill_kl"][1]) == 3 * 16
    # the teacher really is the checkpoint (same logits as the model serve would load)
    from safetensors.torch import load_file

    ref = build_model(ModelConfig(**{**json.loads((ckpt / "manifest.json").read_text())["config"]["model"]}))
    ref.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    with torch.no_grad():
        assert torch.equal(teacher(batch[:, :-1]), ref.eval()(batch[:, :-1]))
    # eval mode reports the student's own CE as the loss (comparable to a run without a teacher)
    student.eval()
    eval_loss, _ = task.loss(student, batch)
    with torch.no_grad():
        assert torch.allclose(eval_loss, student(batch[:, :-1], batch[:, 1:]), atol=1e-5)


def test_teacher_from_a_hugging_face_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dist_llm.interop.tokenizer import export_tokenizer
    from dist_llm.data.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=258, n_positions=96, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0, embd_pdrop=0,
        attn_pdrop=0)).eval()
    hf.save_pretrained(tmp_path / "hf")
    export_tokenizer(ByteTokenizer(), tmp_path / "hf")  # byte-level tokenizer.json, like our data's
    write_tiny_checkpoint(tmp_path)  # for its data/train manifest (byte tokenizer)
    task = build_task(_job(str(tmp_path / "hf"), tmp_path / "data" / "train"))
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        diff = (task.teacher(torch.device("cpu"))(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_tokenizer_or_vocab_mismatch_is_an_error_naming_both(tmp_path):
    from interop_fixtures import train_hf_tokenizer, write_shards

    from dist_llm.interop.tokenizer import tokenizer_from_hf_dir

    ckpt = write_tiny_checkpoint(tmp_path)  # byte-tokenized teacher
    bpe = tokenizer_from_hf_dir(train_hf_tokenizer(tmp_path / "bpe", vocab_size=258))
    data = write_shards(tmp_path / "bpe_data" / "train", bpe, seq_len=16)
    import shutil

    shutil.copy(bpe.path, tmp_path / "bpe_data" / "tokenizer.json")
    with pytest.raises(DistillError, match=r"teacher=.*byte tokenizer, 258 tokens.*bpe_data.*hf tokenizer, 2\d\d tokens"):
        build_task(_job(str(ckpt), data))
    bigger = write_tiny_checkpoint(tmp_path / "big", vocab_size=300)
    with pytest.raises(DistillError, match=r"vocab_size=300 but the student's model.vocab_size=258"):
        build_task(_job(str(bigger), tmp_path / "data" / "train"))


def test_validation_names_the_fields():
    cfg = JobConfig(model=STUDENT, task=TaskConfig(kind="distill", distill=DistillTaskConfig(
        teacher=None, temperature=0.0, alpha=1.5)))
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=1)
    msg = str(e.value)
    assert "task.distill.teacher" in msg and "task.distill.temperature=0.0" in msg and "task.distill.alpha=1.5" in msg


@pytest.mark.slow
def test_two_rank_zero3_distill_run_keeps_no_teacher_optimizer_state(workdir):
    from helpers import TINY, metrics, run_cli

    teacher = write_tiny_checkpoint(workdir / "teacher", vocab_size=320, n_layers=3, d_model=64)
    args = ["train", *TINY, "name=kd", "task=distill", f"task.distill.teacher={teacher}", "parallel=zero3",
            "launcher.nproc=2", "train.max_steps=6", "train.eval_every=3", "train.checkpoint.every=6",
            "model.n_layers=1"]
    run_cli(args, cwd=workdir)
    run = workdir / "runs" / "kd"
    losses, kl = metrics(run), metrics(run, "train/distill_kl")
    assert sorted(losses) == list(range(1, 7)) and sorted(kl) == list(range(1, 7))
    assert all(v > 0 for v in kl.values()) and metrics(run, "val/distill_kl")
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "model.safetensors"))
    student_cfg = json.loads((ckpt / "manifest.json").read_text())["config"]["model"]
    from dist_llm.interop.init_from import model_config_from_dict

    student_params = sum(p.numel() for p in build_model(model_config_from_dict(student_cfg)).parameters())
    assert not any(k.startswith("layers.1.") or k.startswith("blocks.1.") for k in weights)  # 1-layer student
    # Adam moments of both ranks' ZeRO-3 partitions: the student's parameters, nothing of the teacher's
    moments = 0
    for rank_file in sorted(ckpt.glob("elastic/rank-*.safetensors")):  # each rank's optimizer slices
        moments += sum(t.numel() for k, t in load_file(str(rank_file)).items() if "::exp_avg::" in k)
    teacher_params = sum(t.numel() for t in load_file(str(teacher / "model.safetensors")).values())
    assert student_params <= moments < student_params + 64 * 2  # ZeRO pads partitions by a few elements
    assert moments < teacher_params
