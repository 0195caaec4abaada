"""Turn shard samples (``read_records`` dicts) into model batches: BERT pairs and images.

Pure functions: the caller supplies each sample's global index and the training step, and
every random choice (MLM masking, image shifts) is derived from ``(seed, step, sample_index)``
alone, so a resumed or re-sharded run produces the same batches (see :mod:`dist_llm.data.masking`).

Sample fields (``dist_llm.data.shards``): BERT pairs ``tokens.npy`` (ids padded with PAD),
``segments.npy`` (uint8 token types), ``nsp.cls`` (ASCII 0/1); images ``npy`` (uint8 HxWxC),
``cls`` (ASCII label). Values may be the raw member bytes or already-decoded arrays/ints.
"""
from __future__ import annotations

import io
from typing import Any, Dict, Mapping, Sequence

import numpy as np
import torch

from dist_llm.data.masking import mask_batch, sample_generator

Sample = Mapping[str, Any]


def _array(sample: Sample, field: str) -> np.ndarray:
    v = sample.get(field)
    if v is None:
        raise KeyError(f"sample {sample.get('__key__', b'?')!r} has no {field!r} member; is this the right "
                       f"shard kind (dist-llm prepare pack.kind)?")
    return np.load(io.BytesIO(v), allow_pickle=False) if isinstance(v, (bytes, bytearray)) else np.asarray(v)


def _label(sample: Sample, field: str) -> int:
    v = sample.get(field)
    if v is None:
        raise KeyError(f"sample {sample.get('__key__', b'?')!r} has no {field!r} member")
    return int(v.decode("ascii") if isinstance(v, (bytes, bytearray)) else v)


def _check_indices(samples: Sequence[Sample], sample_indices: Sequence[int]) -> None:
    if len(samples) != len(sample_indices):
        raise ValueError(f"{len(samples)} samples but {len(sample_indices)} sample indices")


def decode_bert_batch(samples: Sequence[Sample], special_ids: Mapping[str, int], vocab_size: int, seed: int,
                      step: int, sample_indices: Sequence[int], mlm_prob: float = 0.15,
                      mask: bool = True) -> Dict[str, torch.Tensor]:
    """``input_ids, token_type_ids, attention_mask, mlm_labels, nsp_labels`` (all int64).

    ``special_ids`` is the tokenizer metadata's map (needs ``pad`` and ``mask``; every id in it is
    excluded from masking). ``mask=False`` gives unmasked ids and all-ignored MLM labels.
    """
    _check_indices(samples, sample_indices)
    for name in ("pad", "mask"):
        if name not in special_ids:
            raise ValueError(f"tokenizer special_ids has no {name!r} token ({sorted(special_ids)}); BERT data "
                             f"needs pad and mask: prepare with a tokenizer that defines them")
    ids = torch.from_numpy(np.stack([_array(s, "tokens.npy") for s in samples]).astype(np.int64))
    types = torch.from_numpy(np.stack([_array(s, "segments.npy") for s in samples]).astype(np.int64))
    nsp = torch.tensor([_label(s, "nsp.cls") for s in samples], dtype=torch.long)
    attention = (ids != int(special_ids["pad"])).long()
    if mask:
        inputs, labels = mask_batch(ids, special_ids.values(), int(special_ids["mask"]), vocab_size, seed, step,
                                    sample_indices, mlm_prob)
    else:
        inputs, labels = ids, torch.full_like(ids, -100)
    return {"input_ids": inputs, "token_type_ids": types, "attention_mask": attention,
            "mlm_labels": labels, "nsp_labels": nsp}


_SHIFT_TAG = 0x5F1F7  # keeps the shift stream apart from the masking stream of the same triple


def shift_image(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``img`` [C, H, W] moved by (dy, dx) pixels, zero-filled where it moved away from."""
    out = torch.zeros_like(img)
    H, W = img.shape[-2:]
    ys, yd = (slice(0, H - dy), slice(dy, H)) if dy >= 0 else (slice(-dy, H), slice(0, H + dy))
    xs, xd = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
    out[:, yd, xd] = img[:, ys, xs]
    return out


def decode_image_batch(samples: Sequence[Sample], seed: int, step: int, sample_indices: Sequence[int],
                       augment: bool = False, max_shift: int = 1) -> Dict[str, torch.Tensor]:
    """``pixel_values`` float32 [B, C, H, W] in [0, 1] and ``labels`` int64 [B].

    ``augment`` shifts each image by up to ``max_shift`` pixels in each direction, drawn from
    ``(seed, step, sample_index)``.
    """
    _check_indices(samples, sample_indices)
    imgs = []
    for s, i in zip(samples, sample_indices):
        a = _array(s, "npy")
        if a.ndim == 2:
            a = a[:, :, None]
        img = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float() / 255.0
        if augment and max_shift > 0:
            g = sample_generator(seed ^ _SHIFT_TAG, step, int(i))
            dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
            img = shift_image(img, dy, dx)
        imgs.append(img)
    shapes = {tuple(t.shape) for t in imgs}
    if len(shapes) > 1:
        raise ValueError(f"images of different shapes in one batch: {sorted(shapes)}; prepare with pack.image_size")
    return {"pixel_values": torch.stack(imgs), "labels": torch.tensor([_label(s, "cls") for s in samples])}
