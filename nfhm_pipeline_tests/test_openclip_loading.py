"""open_clip loading through open_clip's own code paths, with tiny self-built weights (no network)."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from nfhm_pipeline.embedders import (TINY_OPENCLIP_NAME, build_tiny_hf_hub_cache, build_tiny_openclip_checkpoint,
                                     decode_to_uint8, load_embedder)
from nfhm_pipeline.embedders.tiny import _tiny_state_dict
from nfhm_pipeline.errors import MissingWeightsError, ModelLoadError


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return {seed: build_tiny_openclip_checkpoint(d / f"tiny{seed}.safetensors", seed=seed) for seed in (0, 1)}


def tiny_spec(path, **extra):
    return {"id": "tiny", "loader": "open_clip", "model": TINY_OPENCLIP_NAME, "pretrained": str(path), **extra}


def pixels(n, size=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def test_checkpoint_file_gives_finite_image_and_text_embeddings(tiny_files):
    emb = load_embedder(tiny_spec(tiny_files[0]))
    images = emb.embed_uint8(pixels(4))
    texts = emb.embed_texts(["a photo of a monarch butterfly", "a chest x-ray", ""])
    assert emb.has_text_tower and emb.dim == 32 and emb.text_dim == 32
    assert images.dtype == torch.float32 and images.shape == (4, 32) and torch.isfinite(images).all()
    assert texts.dtype == np.float32 and texts.shape == (3, 32) and np.isfinite(texts).all()
    assert not np.allclose(texts[0], texts[1])


def test_torch_save_checkpoint_loads_like_safetensors(tmp_path, tiny_files):
    pt = build_tiny_openclip_checkpoint(tmp_path / "tiny0.pt", seed=0)
    a = load_embedder(tiny_spec(tiny_files[0])).embed_uint8(pixels(2))
    b = load_embedder(tiny_spec(pt)).embed_uint8(pixels(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_preprocess_comes_from_the_models_open_clip_config(tiny_files):
    emb = load_embedder(tiny_spec(tiny_files[0]))
    assert (emb.preprocess.size, emb.preprocess.resize, emb.preprocess.interpolation) == (32, "shorter_crop", "bicubic")
    assert emb.preprocess.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_decoded_pixels_match_open_clips_own_transform_for_odd_aspect(tiny_files):
    import open_clip

    _, _, transform = open_clip.create_model_and_transforms(TINY_OPENCLIP_NAME, pretrained=str(tiny_files[0]))
    emb = load_embedder(tiny_spec(tiny_files[0]))
    rng = np.random.default_rng(3)
    for w, h in [(97, 41), (41, 97), (33, 32), (200, 200)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = torch.from_numpy(decode_to_uint8(image, emb.preprocess)).float() / 255
        ours = (ours - torch.tensor(emb.preprocess.mean).view(3, 1, 1)) / torch.tensor(emb.preprocess.std).view(3, 1, 1)
        torch.testing.assert_close(ours, transform(image), rtol=0, atol=1e-5)


def test_hf_hub_id_loads_offline_from_a_local_cache(tmp_path, monkeypatch, tiny_files):
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE
    snapshot = build_tiny_hf_hub_cache(tmp_path / "hub", seed=0)
    # huggingface_hub read these at import; the loader must pick them up now.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    emb = load_embedder({"id": "tiny-hub", "loader": "open_clip", "model": "hf-hub:nfhm/tiny-clip"})
    direct = load_embedder(tiny_spec(tiny_files[0]))
    torch.testing.assert_close(emb.embed_uint8(pixels(3)), direct.embed_uint8(pixels(3)), rtol=0, atol=0)
    np.testing.assert_array_equal(emb.embed_texts(["a moth"]), direct.embed_texts(["a moth"]))
    assert emb.load_report["weights_file"].startswith(str(snapshot))
    assert (constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE) == before  # process settings restored


def test_hf_hub_cache_can_be_passed_explicitly(tmp_path, monkeypatch):
    build_tiny_hf_hub_cache(tmp_path / "hub", seed=0, safetensors=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = load_embedder({"loader": "open_clip", "model": "hf-hub:nfhm/tiny-clip"}, cache_dir=tmp_path / "hub")
    assert emb.load_report["weights_file"].endswith("open_clip_pytorch_model.bin")
    assert emb.embed_uint8(pixels(1)).shape == (1, 32)


def test_hf_hub_commit_is_the_weights_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = {"loader": "open_clip", "model": "hf-hub:nfhm/tiny-clip"}
    build_tiny_hf_hub_cache(tmp_path / "a", seed=0)
    build_tiny_hf_hub_cache(tmp_path / "b", seed=0)
    build_tiny_hf_hub_cache(tmp_path / "c", seed=1)
    fa, fb, fc = (load_embedder(spec, cache_dir=tmp_path / x).fingerprint for x in "abc")
    assert fa == fb != fc


def test_missing_hf_hub_repo_names_model_repo_cache_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(MissingWeightsError) as err:
        load_embedder({"id": "bioclip", "loader": "open_clip", "model": "hf-hub:imageomics/bioclip"})
    msg = str(err.value)
    for part in ("'bioclip'", "imageomics/bioclip", str(tmp_path / "empty"), "hf download imageomics/bioclip",
                 "weights:"):
        assert part in msg
    assert "Traceback" not in msg and len(msg) < 1200


def test_hub_with_config_but_no_weights_is_missing_weights_not_random(tmp_path, monkeypatch):
    snapshot = build_tiny_hf_hub_cache(tmp_path / "hub", seed=0)
    (snapshot / "open_clip_model.safetensors").unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="open_clip_model.safetensors / open_clip_pytorch_model.bin"):
        load_embedder({"loader": "open_clip", "model": "hf-hub:nfhm/tiny-clip"}, cache_dir=tmp_path / "hub")


def test_missing_checkpoint_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "tiny.safetensors"
    with pytest.raises(MissingWeightsError, match="'tiny'.*nowhere/tiny.safetensors does not exist"):
        load_embedder(tiny_spec(missing))


def test_unknown_pretrained_tag_lists_known_tags():
    with pytest.raises(ModelLoadError, match="laion2b_s34b_b79k"):
        load_embedder({"loader": "open_clip", "model": "ViT-B-32", "pretrained": "no_such_tag"})


def _wrapped_module_state_dict(seed, drop=(), extra=()):
    sd = {f"module.{k}": v for k, v in _tiny_state_dict(seed).items() if k not in drop}
    sd.update({f"module.{k}": torch.zeros(2) for k in extra})
    return {"state_dict": sd, "epoch": 8}


def test_fine_tuned_state_dict_on_base_equals_loading_that_model(tmp_path, tiny_files, caplog):
    # ArborCLIP shape: base model + {'state_dict': {'module.<key>': ...}} from another training run.
    torch.save(_wrapped_module_state_dict(1, drop=["logit_scale"], extra=["extra_head.weight"]), tmp_path / "ft.pt")
    with caplog.at_level(logging.WARNING):
        tuned = load_embedder(tiny_spec(tiny_files[0], state_dict=str(tmp_path / "ft.pt")))
    seed1 = load_embedder(tiny_spec(tiny_files[1]))
    seed0 = load_embedder(tiny_spec(tiny_files[0]))
    x = pixels(3)
    torch.testing.assert_close(tuned.embed_uint8(x), seed1.embed_uint8(x), rtol=0, atol=0)
    np.testing.assert_array_equal(tuned.embed_texts(["a bird"]), seed1.embed_texts(["a bird"]))
    assert not torch.allclose(tuned.embed_uint8(x), seed0.embed_uint8(x))
    assert tuned.load_report["missing_keys"] == ["logit_scale"]
    assert tuned.load_report["unexpected_keys"] == ["extra_head.weight"]
    assert "logit_scale" in caplog.text and "extra_head.weight" in caplog.text
    assert tuned.fingerprint not in (seed0.fingerprint, seed1.fingerprint)


def test_state_dict_from_hf_hub_cache(tmp_path, monkeypatch, tiny_files):
    snapshot = build_tiny_hf_hub_cache(tmp_path / "hub", repo_id="someone/tuned", seed=1)
    torch.save(_wrapped_module_state_dict(1), snapshot / "tuned-epoch-8.pt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tuned = load_embedder(tiny_spec(tiny_files[0], state_dict="hf-hub:someone/tuned/tuned-epoch-8.pt"),
                          cache_dir=tmp_path / "hub")
    seed1 = load_embedder(tiny_spec(tiny_files[1]))
    torch.testing.assert_close(tuned.embed_uint8(pixels(2)), seed1.embed_uint8(pixels(2)), rtol=0, atol=0)


def test_state_dict_for_another_architecture_is_refused(tmp_path, tiny_files):
    keys = list(_tiny_state_dict(1))
    torch.save(_wrapped_module_state_dict(1, drop=keys[: len(keys) // 2]), tmp_path / "half.pt")
    with pytest.raises(ModelLoadError, match="model keys missing"):
        load_embedder(tiny_spec(tiny_files[0], state_dict=str(tmp_path / "half.pt")))


def test_missing_state_dict_file_is_missing_weights(tmp_path, tiny_files):
    with pytest.raises(MissingWeightsError, match="state_dict file .*ft.pt does not exist"):
        load_embedder(tiny_spec(tiny_files[0], state_dict=str(tmp_path / "ft.pt")))
