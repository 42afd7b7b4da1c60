"""A small text-image alignment head trained with MedCLIP's semantic-matching loss.

Frozen image embeddings [N, D_img] and one text embedding per label [F, D_txt]
are projected into one space; the loss pulls each image towards the label texts
its multi-hot label vector shares (soft targets from label similarity, so two
images with the same finding are not treated as negatives of each other, the
false-negative problem MedCLIP addresses). The trained head scores an image
against every label text by cosine, which `roc_auc_per_label` then evaluates.

Scoring and saving need numpy and safetensors only; torch is imported for training.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from nfhm_pipeline.errors import EvaluationError, StorageError
from nfhm_pipeline.evaluation.vectors import unit_rows

_FORMAT = "nfhm-alignment-head/1"


def semantic_matching_loss(v, t, l_img, l_txt, temperature: float):
    """MedCLIP semantic-matching loss (torch tensors in, scalar tensor out).

    v [B, D] image and t [T, D] text embeddings (any scale: L2-normalised here);
    l_img [B, L] and l_txt [T, L] non-negative label vectors (multi-hot; one-hot
    for one text per label). Semantic similarity s_ij = cos(l_img_i, l_txt_j),
    taken as 0 when a label vector is all zero. Soft targets y^{v->t} =
    softmax_j(s), y^{t->v} = softmax_i(s); predictions are softmaxes of
    cos(v_i, t_j) / temperature over texts and over images respectively; each
    direction is a soft-target cross-entropy averaged over its anchors, and the
    loss is their mean.

    Anchors with no match in the batch are left out of their own direction: an
    image whose s row is all zero (no positive label, e.g. an all-negative row)
    has no text to be pulled towards, and a text with no positive image has no
    image to pull; their softmax would be a uniform target that only blurs the
    space. They still take part as negatives in the other direction, so no row
    ever yields NaN. A direction with no anchors contributes 0.
    """
    import torch.nn.functional as F

    v = F.normalize(v, dim=-1)
    t = F.normalize(t, dim=-1)
    logits = v @ t.T / temperature
    s = F.normalize(l_img.to(v.dtype), dim=-1) @ F.normalize(l_txt.to(v.dtype), dim=-1).T
    matched = s > 0

    def direction(logits, s, anchors, dim):
        if not anchors.any():
            return logits.sum() * 0.0  # keeps the graph, contributes nothing
        keep = (slice(None), anchors) if dim == 0 else (anchors, slice(None))
        target = s[keep].softmax(dim=dim)
        return -(target * logits[keep].log_softmax(dim=dim)).sum(dim=dim).mean()

    v2t = direction(logits, s, matched.any(dim=1), dim=1)
    t2v = direction(logits, s, matched.any(dim=0), dim=0)
    return (v2t + t2v) / 2


def _check_embeddings(name: str, a, ndim: int = 2) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if a.ndim != ndim:
        raise EvaluationError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(np.linalg.norm(a, axis=-1) == 0):
        raise EvaluationError(f"{name} contain NaN/inf or all-zero vectors; re-embed those images or texts")
    return a


@dataclass
class AlignmentHead:
    """Trained projections. Images: unit(x) @ image_weight.T + image_bias, then
    unit; label texts: the same with text_weight/text_bias, or unit(text) as it
    is when text_weight is None (the head then maps images into the text space)."""

    image_weight: np.ndarray  # [K, D_img]
    image_bias: np.ndarray  # [K]
    label_text_emb: np.ndarray  # [F, D_txt], as given to training
    text_weight: np.ndarray | None = None  # [K, D_txt]
    text_bias: np.ndarray | None = None  # [K]
    temperature: float = 0.07
    label_names: list[str] | None = None
    loss_history: list[float] = field(default_factory=list)  # mean loss per epoch; not saved

    def project_images(self, image_emb) -> np.ndarray:
        """Unit-length projected images, float32 [N, K]."""
        x = _check_embeddings("image embeddings", image_emb).astype(np.float64)
        if x.shape[1] != self.image_weight.shape[1]:
            raise EvaluationError(f"image embeddings have dimension {x.shape[1]}, the head expects {self.image_weight.shape[1]}")
        return unit_rows(unit_rows(x, dtype=None, checked=False, non_empty=False) @ self.image_weight.T
                         + self.image_bias, dtype=None, checked=False, non_empty=False).astype(np.float32)

    def project_texts(self) -> np.ndarray:
        """Unit-length projected label texts, float32 [F, K]."""
        t = unit_rows(self.label_text_emb.astype(np.float64), dtype=None, checked=False, non_empty=False)
        if self.text_weight is not None:
            t = unit_rows(t @ self.text_weight.T + self.text_bias, dtype=None, checked=False, non_empty=False)
        return t.astype(np.float32)

    def scores(self, image_emb) -> np.ndarray:
        """Cosine of each projected image to each projected label text, float32 [N, F] in [-1, 1]."""
        return (self.project_images(image_emb).astype(np.float64) @ self.project_texts().astype(np.float64).T).astype(np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The arrays that define the head (float32), keyed as saved on disk."""
        arrays = {"image_weight": self.image_weight, "image_bias": self.image_bias, "label_text_emb": self.label_text_emb}
        if self.text_weight is not None:
            arrays |= {"text_weight": self.text_weight, "text_bias": self.text_bias}
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the head as a safetensors file (atomic: temp file in the same folder, then rename)."""
        from safetensors.numpy import save

        path = Path(path)
        meta = {"format": _FORMAT, "temperature": repr(float(self.temperature)), "label_names": json.dumps(self.label_names)}
        data = save(self.state_dict(), metadata=meta)
        from nfhm_pipeline.store.files import write_bytes

        return write_bytes(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AlignmentHead":
        """Read a head written by `save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise StorageError(f"{path}: alignment head file not found; train it first")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise StorageError(f"{path}: not a readable safetensors file ({exc}); delete it and retrain") from exc
        if meta.get("format") != _FORMAT:
            raise StorageError(f"{path}: format {meta.get('format')!r} is not {_FORMAT!r}; retrain the head")
        return cls(
            image_weight=arrays["image_weight"], image_bias=arrays["image_bias"],
            label_text_emb=arrays["label_text_emb"],
            text_weight=arrays.get("text_weight"), text_bias=arrays.get("text_bias"),
            temperature=float(meta["temperature"]), label_names=json.loads(meta["label_names"]),
        )


def train_alignment_head(
    image_emb, targets, label_text_emb, *,
    mask=None, label_names: Sequence[str] | None = None, dim: int | None = None,
    epochs: int = 30, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 1e-4,
    temperature: float = 0.07, seed: int = 0, device: str = "cpu",
) -> AlignmentHead:
    """Train an alignment head with `semantic_matching_loss` (AdamW, shuffled minibatches).

    image_emb float32 [N, D_img]; targets [N, F] multi-hot in {0, 1}; mask bool
    [N, F] or None (all counted) — masked-out entries count as "not positive" in
    the image's label vector; label_text_emb float32 [F, D_txt], one text per
    label (so l_txt is the identity). dim=None learns Linear(D_img -> D_txt)
    with the texts fixed; dim=K learns Linear(D_img -> K) and Linear(D_txt -> K).
    Same inputs and seed give identical weights on the same device; the global
    torch RNG is left untouched. Defaults (30 epochs) on N=4000, D=512: about
    1.5 s on a 16-core CPU or an H100, 1-2 minutes on a busy 2-core CPU.
    """
    import torch

    x = _check_embeddings("image embeddings", image_emb)
    texts = _check_embeddings("label text embeddings", label_text_emb)
    y = np.asarray(targets)
    m = np.ones(y.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if y.shape != (x.shape[0], texts.shape[0]) or m.shape != y.shape:
        raise EvaluationError(
            f"targets {y.shape} and mask {m.shape} must be [images={x.shape[0]}, labels={texts.shape[0]}]"
        )
    if not np.all(np.isin(y[m], (0, 1))):
        raise EvaluationError("targets must be 0 or 1 wherever the mask is True")
    if label_names is not None and len(label_names) != texts.shape[0]:
        raise EvaluationError(f"{len(label_names)} label names for {texts.shape[0]} label texts")
    if epochs < 1 or batch_size < 1:
        raise EvaluationError(f"epochs ({epochs}) and batch_size ({batch_size}) must be at least 1")

    out_dim = texts.shape[1] if dim is None else dim
    # Initialise under a forked RNG so the caller's global torch RNG state is not changed,
    # and on CPU so the initial weights do not depend on the device.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image_proj = torch.nn.Linear(x.shape[1], out_dim)
        text_proj = torch.nn.Linear(texts.shape[1], out_dim) if dim is not None else None
    modules = [mod.to(device) for mod in (image_proj, text_proj) if mod is not None]
    params = [p for mod in modules for p in mod.parameters()]

    X = torch.nn.functional.normalize(torch.from_numpy(x).to(device), dim=-1)
    T = torch.nn.functional.normalize(torch.from_numpy(texts).to(device), dim=-1)
    L_img = torch.from_numpy((y * m).astype(np.float32)).to(device)
    L_txt = torch.eye(texts.shape[0], device=device)
    shuffle = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    history = []
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # warn_only: on CUDA, strict mode would raise without CUBLAS_WORKSPACE_CONFIG set.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=shuffle).to(device)
            total = 0.0
            for start in range(0, x.shape[0], batch_size):
                idx = order[start:start + batch_size]
                v = image_proj(X[idx])
                t = text_proj(T) if text_proj is not None else T
                loss = semantic_matching_loss(v, t, L_img[idx], L_txt, temperature)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(idx)
            history.append(total / x.shape[0])
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)

    def numpy(t):
        return t.detach().cpu().numpy().astype(np.float32)

    return AlignmentHead(
        image_weight=numpy(image_proj.weight), image_bias=numpy(image_proj.bias), label_text_emb=texts.copy(),
        text_weight=numpy(text_proj.weight) if text_proj is not None else None,
        text_bias=numpy(text_proj.bias) if text_proj is not None else None,
        temperature=float(temperature), label_names=None if label_names is None else [str(s) for s in label_names],
        loss_history=history,
    )
