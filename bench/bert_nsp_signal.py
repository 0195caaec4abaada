"""How much next-sentence signal a ``pack=bert`` data set holds, without a neural model.

For each split: pairs, share of random-next pairs, share of padded pairs per label (padding that
only random pairs have is a label leak), then a logistic regression fitted on the train pairs and
scored on val with (a) A/B overlap features (char 3-/4-gram and identifier Jaccard) and (b)
padding alone. (a) well above 0.5 on val means NSP is learnable across documents from content;
(b) above 0.5 on train only means a shortcut that does not transfer.

    python -m bench.bert_nsp_signal DATA_DIR     # a `dist-llm prepare pack=bert` output directory
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

Pair = Tuple[str, str, int, bool]  # A text, B text, nsp label (1 = random), padded


def read_pairs(root: Path, split: str) -> List[Pair]:
    import io

    from dist_llm.data import read_manifest
    from dist_llm.data.shards import PAIRS_FORMAT, read_records
    from dist_llm.data.tokenizer import load_tokenizer

    m = read_manifest(root / split, expect=PAIRS_FORMAT)
    tok = load_tokenizer(m["tokenizer"], root)
    specials = set(m["special_ids"].values())
    out: List[Pair] = []
    for sh in m["shards"]:
        for r in read_records(root / split / sh["file"]):
            t = np.load(io.BytesIO(r["tokens.npy"])).astype(np.int64)
            g = np.load(io.BytesIO(r["segments.npy"]))
            keep = ~np.isin(t, list(specials))
            out.append((tok.decode(t[keep & (g == 0)].tolist()), tok.decode(t[keep & (g == 1)].tolist()),
                        int(r["nsp.cls"]), bool((t == m["special_ids"]["pad"]).any())))
    return out


def _jaccard(x: set, y: set) -> float:
    return len(x & y) / max(1, len(x | y))


def _grams(s: str, n: int) -> set:
    return {s[i:i + n] for i in range(len(s) - n + 1)}


def overlap_features(a: str, b: str) -> List[float]:
    ia, ib = set(re.findall(r"[A-Za-z_]\w{2,}", a)), set(re.findall(r"[A-Za-z_]\w{2,}", b))
    return [_jaccard(_grams(a, 3), _grams(b, 3)), _jaccard(_grams(a, 4), _grams(b, 4)), _jaccard(ia, ib),
            float(bool(ia & ib))]


def signal(root: Path) -> Dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    tr, va = read_pairs(root, "train"), read_pairs(root, "val")
    res: Dict[str, float] = {}
    for name, pairs in (("train", tr), ("val", va)):
        y = np.array([p[2] for p in pairs])
        pad = np.array([p[3] for p in pairs])
        res.update({f"{name}_pairs": len(pairs), f"{name}_random_share": float(y.mean()),
                    f"{name}_padded_share_next": float(pad[y == 0].mean()) if (y == 0).any() else 0.0,
                    f"{name}_padded_share_random": float(pad[y == 1].mean()) if (y == 1).any() else 0.0})
    feats = {"overlap": lambda p: overlap_features(p[0], p[1]), "padding": lambda p: [float(p[3])]}
    for name, f in feats.items():
        X, y = np.array([f(p) for p in tr]), np.array([p[2] for p in tr])
        Xv, yv = np.array([f(p) for p in va]), np.array([p[2] for p in va])
        clf = LogisticRegression().fit(X, y)
        res[f"{name}_logreg_train_acc"], res[f"{name}_logreg_val_acc"] = clf.score(X, y), clf.score(Xv, yv)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path)
    args = ap.parse_args()
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in signal(args.data_dir).items()},
                     indent=1))


if __name__ == "__main__":
    main()
