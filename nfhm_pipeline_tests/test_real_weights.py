"""Real pretrained weights on real images: learned features must separate Leeds butterfly species
far better than a randomly initialised model.

Subset: the first 30 images (by file name) of each of the 10 species = 300 images, to stay well
under a minute on 2 CPU cores. Preprocessing of the MobileNetV2 weights is the one documented in
shared/data/README.md: squash to 224x224 bilinear, mean = std = 0.502.
"""
import numpy as np
import pandas as pd
import pytest
import torch

from nfhm_pipeline.embedders import (TINY_OPENCLIP_NAME, build_tiny_openclip_checkpoint, decode_batch, load_embedder,
                                     load_rgb)

PER_SPECIES = 30


def leave_one_out_1nn_cosine_accuracy(embeddings: np.ndarray, labels: list) -> float:
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    hits = 0
    for i in range(len(x)):
        best, best_sim = None, -np.inf
        for j in range(len(x)):
            if j != i:
                sim = float(x[i] @ x[j])
                if sim > best_sim:
                    best, best_sim = j, sim
        hits += labels[best] == labels[i]
    return hits / len(x)


def embed_all(embedder, images, batch_size=50):
    out = [embedder.embed_uint8(torch.from_numpy(decode_batch(images[i:i + batch_size], embedder.preprocess)))
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def test_pretrained_mobilenet_separates_butterfly_species_better_than_random_weights(shared_data, tmp_path):
    weights = shared_data / "weights" / "mobilenet_v2_imagenet1001.pt"
    if not weights.is_file():
        pytest.skip(f"{weights} is absent")
    root = shared_data / "leeds_butterfly"
    labels = pd.read_csv(root / "labels.csv").sort_values("filename").groupby("species").head(PER_SPECIES)
    images = [load_rgb(root / f) for f in labels["filename"]]
    species = labels["species"].tolist()

    real = load_embedder({"id": "mobilenet_v2_imagenet1001", "loader": "torchvision", "model": "mobilenet_v2",
                          "weights": str(weights), "num_classes": 1001, "image_size": 224, "resize": "squash",
                          "interpolation": "bilinear", "mean": [0.502] * 3, "std": [0.502] * 3})
    random_ckpt = build_tiny_openclip_checkpoint(tmp_path / "tiny_random.safetensors", seed=0)
    random = load_embedder({"id": "tiny-random", "loader": "open_clip", "model": TINY_OPENCLIP_NAME,
                            "pretrained": str(random_ckpt)})

    real_acc = leave_one_out_1nn_cosine_accuracy(embed_all(real, images), species)
    random_acc = leave_one_out_1nn_cosine_accuracy(embed_all(random, images), species)
    print(f"LOO 1-NN cosine species accuracy on {len(images)} Leeds images: "
          f"mobilenet_v2 {real_acc:.3f}, random tiny CLIP {random_acc:.3f}, chance 0.10")
    assert real_acc >= 0.85  # measured 0.96
    assert real_acc >= random_acc + 0.4  # random weights measured 0.20
