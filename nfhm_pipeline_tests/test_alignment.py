import math

import numpy as np
import pytest
import torch

from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.evaluation.alignment import AlignmentHead, semantic_matching_loss, train_alignment_head
from nfhm_pipeline.evaluation.multilabel import macro_micro_auc


def reference_loss(v, t, l_img, l_txt, tau):
    """Plain loops over the MedCLIP formulas; anchors without any match are left out."""
    def unit(a):
        return [[c / math.sqrt(sum(c * c for c in x)) for c in x] for x in a]

    def cos_or_zero(a, b):
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        return 0.0 if na == 0 or nb == 0 else sum(x * y for x, y in zip(a, b)) / (na * nb)

    v, t = unit(v.tolist()), unit(t.tolist())
    B, T = len(v), len(t)
    s = [[cos_or_zero(l_img[i].tolist(), l_txt[j].tolist()) for j in range(T)] for i in range(B)]
    logit = [[sum(a * b for a, b in zip(v[i], t[j])) / tau for j in range(T)] for i in range(B)]

    def xent(targets, logits):  # soft-target cross-entropy over one softmax group
        zt = sum(math.exp(x) for x in targets)
        zl = sum(math.exp(x) for x in logits)
        return -sum(math.exp(a) / zt * math.log(math.exp(b) / zl) for a, b in zip(targets, logits))

    v2t = [xent(s[i], logit[i]) for i in range(B) if any(x > 0 for x in s[i])]
    cols = [j for j in range(T) if any(s[i][j] > 0 for i in range(B))]
    t2v = [xent([s[i][j] for i in range(B)], [logit[i][j] for i in range(B)]) for j in cols]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return (mean(v2t) + mean(t2v)) / 2


def small_batch(seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = torch.randn(4, 5, generator=g, dtype=torch.float64)
    l_img = (torch.rand(6, 4, generator=g) < 0.4).double()
    return v, t, l_img


def test_loss_matches_loop_reference_with_one_hot_label_texts():
    v, t, l_img = small_batch(0)
    l_img[0] = torch.tensor([1.0, 0, 1, 0])  # every image and text has a match: the paper's formula
    l_img[1] = torch.tensor([0.0, 1, 0, 1])
    l_img[2:] = torch.tensor([1.0, 1, 0, 0])
    l_txt = torch.eye(4, dtype=torch.float64)
    got = semantic_matching_loss(v, t, l_img, l_txt, 0.07)
    assert float(got) == pytest.approx(reference_loss(v, t, l_img, l_txt, 0.07), rel=1e-10)


def test_loss_matches_loop_reference_with_empty_rows_and_unmatched_texts():
    v, t, l_img = small_batch(1)
    l_img[2] = 0  # an image with no positive label
    l_img[:, 3] = 0  # a label text no image in the batch has
    l_txt = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float64)
    l_img3 = l_img[:, :3]
    got = semantic_matching_loss(v, t, l_img3, l_txt, 0.5)
    assert float(got) == pytest.approx(reference_loss(v, t, l_img3, l_txt, 0.5), rel=1e-10)


def test_loss_and_gradient_stay_finite_when_no_image_has_a_positive_label():
    v, t, _ = small_batch(2)
    v.requires_grad_(True)
    loss = semantic_matching_loss(v, t, torch.zeros(6, 4, dtype=torch.float64), torch.eye(4, dtype=torch.float64), 0.07)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(v.grad).all()


def noisy_copies(seed=0, n=400, f=5, d_txt=24, d_img=32, noise=0.7):
    """Images are a fixed random linear map of (sum of their label texts + noise)."""
    rng = np.random.default_rng(seed)
    texts = rng.normal(size=(f, d_txt)).astype(np.float32)
    y = (rng.random((n, f)) < 0.3).astype(np.int8)
    y[y.sum(axis=1) == 0, 0] = 1
    images = (y @ texts + noise * rng.normal(size=(n, d_txt))) @ rng.normal(size=(d_txt, d_img))
    return images.astype(np.float32), y, texts


@pytest.mark.parametrize("dim", [None, 16])
def test_head_trained_on_noisy_copies_ranks_held_out_labels_far_above_chance(dim):
    images, y, texts = noisy_copies()
    head = train_alignment_head(images[:300], y[:300], texts, dim=dim, epochs=5, batch_size=32, lr=0.03)
    scores = head.scores(images[300:])
    assert scores.shape == (100, 5) and scores.dtype == np.float32
    assert macro_micro_auc(y[300:], np.ones((100, 5), bool), scores)["macro_auc"] > 0.85


def test_same_seed_gives_identical_weights_and_different_seed_does_not():
    images, y, texts = noisy_copies(n=120)
    kwargs = dict(dim=8, epochs=2, batch_size=32)
    a = train_alignment_head(images, y, texts, seed=7, **kwargs).state_dict()
    b = train_alignment_head(images, y, texts, seed=7, **kwargs).state_dict()
    c = train_alignment_head(images, y, texts, seed=8, **kwargs).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["image_weight"], c["image_weight"])


def test_training_leaves_the_global_torch_rng_untouched():
    images, y, texts = noisy_copies(n=60)
    before = torch.get_rng_state()
    train_alignment_head(images, y, texts, epochs=1)
    assert torch.equal(before, torch.get_rng_state())


def test_masked_out_positives_count_as_not_positive():
    images, y, texts = noisy_copies(n=80)
    mask = np.random.default_rng(1).random(y.shape) < 0.7
    a = train_alignment_head(images, y, texts, mask=mask, epochs=1).state_dict()
    b = train_alignment_head(images, y * mask, texts, epochs=1).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_saved_head_loads_with_identical_scores_and_no_temp_files(tmp_path):
    images, y, texts = noisy_copies(n=60)
    head = train_alignment_head(images, y, texts, dim=8, epochs=1, label_names=list("abcde"))
    path = head.save(tmp_path / "heads" / "chexpert.safetensors")
    loaded = AlignmentHead.load(path)
    assert np.array_equal(head.scores(images), loaded.scores(images))
    assert loaded.label_names == list("abcde") and loaded.temperature == head.temperature
    assert [p.name for p in path.parent.iterdir()] == ["chexpert.safetensors"]


def test_loading_a_corrupt_head_file_raises_storage_error(tmp_path):
    bad = tmp_path / "head.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(StorageError, match="head.safetensors"):
        AlignmentHead.load(bad)
