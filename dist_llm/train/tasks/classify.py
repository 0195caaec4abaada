"""Image classification (ViT on ``pack=image`` shards): cross-entropy on the class token.

Optional light augmentation (``task.classify.augment``): each training image is shifted by up
to ``max_shift`` pixels, drawn from ``(data.seed, step, global sample index)`` so it is
dp-independent and exact on resume; validation images are never shifted. Metrics: ``accuracy``
and ``loss`` as (sum, count) pairs over the global batch.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Tuple

import torch
from torch import nn

from dist_llm.config.schema import JobConfig
from dist_llm.train.tasks.base import IMAGES, Batch, Metrics, Task, register_task


@register_task("classify")
class ClassifyTask(Task):
    sample_format = IMAGES

    def build_model(self, cfg: JobConfig) -> nn.Module:
        from dist_llm.models import build_model

        return build_model(cfg.model)

    def setup_data(self, manifest: Mapping[str, Any]) -> None:
        m = self.cfg.model
        classes = manifest.get("classes") or []
        if len(classes) > m.num_classes:
            raise ValueError(f"the image data has {len(classes)} classes but model.num_classes={m.num_classes}: "
                             f"set model.num_classes={len(classes)}")
        shape = manifest.get("image_shape")
        want = [m.image_size, m.image_size, m.num_channels]
        if shape is not None and list(shape) != want:
            raise ValueError(f"the image data holds {shape[0]}x{shape[1]}x{shape[2]} images but the model expects "
                             f"{want[0]}x{want[1]}x{want[2]} (model.image_size, model.num_channels): set them to "
                             f"match or re-run `dist-llm prepare pack=image pack.image_size=...`")

    def decode_batch(self, samples: Sequence[Mapping[str, Any]], step: int,
                     sample_indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        from dist_llm.data.batches import decode_image_batch

        c = self.cfg.task.classify
        return decode_image_batch(samples, self.cfg.data.seed, step, sample_indices, augment=c.augment,
                                  max_shift=c.max_shift)

    def decode_eval_batch(self, samples: Sequence[Mapping[str, Any]],
                          sample_indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        from dist_llm.data.batches import decode_image_batch

        return decode_image_batch(samples, self.cfg.data.seed, 0, sample_indices, augment=False)

    def loss(self, model, batch: Batch) -> Tuple[torch.Tensor, Metrics]:
        from dist_llm.models.vit import classification_loss

        assert isinstance(batch, dict)
        dtype = next(iter(model.parameters())).dtype  # bf16 engines hold bf16 weights
        logits = model(batch["pixel_values"].to(dtype))
        labels = batch["labels"]
        loss = classification_loss(logits, labels)
        n = torch.tensor(labels.numel(), device=labels.device)
        correct = (logits.argmax(-1) == labels.reshape(-1)).sum()
        return loss, {"loss": (loss.detach() * n, n), "accuracy": (correct, n)}
