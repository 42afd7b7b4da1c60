"""Embedder protocol, preprocessing, fingerprints and the non-open_clip loaders, on self-built weights."""
import numpy as np
import pytest
import torch
from PIL import Image

from nfhm_pipeline.embedders import (LOADERS, TINY_OPENCLIP_NAME, NoTextTowerError, PreprocessSpec,
                                     build_tiny_openclip_checkpoint, decode_to_uint8, load_embedder)
from nfhm_pipeline.errors import MissingWeightsError, ModelLoadError, NfhmError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def pixels(n, size, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def random_image(w, h, mode="RGB", seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = build_tiny_openclip_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.safetensors", seed=0)
    return {"loader": "open_clip", "model": TINY_OPENCLIP_NAME, "pretrained": str(path)}


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mnv2") / "mobilenet_v2_random1001.pt"
    torch.save(torchvision.models.mobilenet_v2(weights=None, num_classes=1001).state_dict(), path)
    return path


def mobilenet_spec(path, **extra):
    return {"id": "mnv2", "loader": "torchvision", "model": "mobilenet_v2", "weights": str(path),
            "num_classes": 1001, "image_size": 64, "resize": "squash", "interpolation": "bilinear",
            "mean": [0.502] * 3, "std": [0.502] * 3, **extra}


# -- preprocessing ------------------------------------------------------------------------------------
def test_pixel_key_depends_on_pixels_not_on_mean_and_std():
    a = PreprocessSpec(224, "shorter_crop", "bicubic", MEAN, STD)
    b = PreprocessSpec(224, "shorter_crop", "bicubic", (0.1, 0.1, 0.1), (0.9, 0.9, 0.9))
    assert a.pixel_key == b.pixel_key == "224-shorter-crop-bicubic"
    others = {PreprocessSpec(256, "shorter_crop", "bicubic", MEAN, STD).pixel_key,
              PreprocessSpec(224, "squash", "bicubic", MEAN, STD).pixel_key,
              PreprocessSpec(224, "shorter_crop", "bilinear", MEAN, STD).pixel_key,
              PreprocessSpec(224, "shorter_crop", "bicubic", MEAN, STD, resize_size=256).pixel_key}
    assert len(others) == 4 and a.pixel_key not in others


@pytest.mark.parametrize("w,h", [(500, 1), (1, 500), (37, 91), (91, 37), (16, 16), (3, 2)])
@pytest.mark.parametrize("resize", ["shorter_crop", "squash"])
def test_decode_to_uint8_gives_square_uint8_for_any_aspect(w, h, resize):
    spec = PreprocessSpec(24, resize, "bicubic", MEAN, STD)
    out = decode_to_uint8(random_image(w, h), spec)
    assert out.dtype == np.uint8 and out.shape == (3, 24, 24) and out.flags.c_contiguous


def test_decode_converts_grey_and_alpha_images_to_rgb():
    spec = PreprocessSpec(8, "squash", "bilinear", MEAN, STD)
    for mode in ("L", "RGBA", "P"):
        assert decode_to_uint8(random_image(20, 10, mode), spec).shape == (3, 8, 8)


def test_shorter_crop_keeps_the_centre_of_a_wide_image():
    # left third red, middle third green, right third blue: the centre crop must be all green.
    arr = np.zeros((30, 90, 3), np.uint8)
    arr[:, :30, 0] = arr[:, 30:60, 1] = arr[:, 60:, 2] = 255
    out = decode_to_uint8(Image.fromarray(arr), PreprocessSpec(30, "shorter_crop", "bilinear", MEAN, STD))
    assert (out[1, :, 2:-2] == 255).all() and (out[0, :, 2:-2] == 0).all() and (out[2, :, 2:-2] == 0).all()


def test_resize_size_resizes_shorter_side_before_the_crop():
    # a white band of 16 rows: kept whole by a plain 64 crop; 64 -> 80 then crop 64 cuts its top 8 rows
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:16] = 255
    plain = decode_to_uint8(Image.fromarray(arr), PreprocessSpec(64, "shorter_crop", "bilinear", MEAN, STD))
    zoomed = decode_to_uint8(Image.fromarray(arr), PreprocessSpec(64, "shorter_crop", "bilinear", MEAN, STD,
                                                                 resize_size=80))
    assert (plain[:, :16] == 255).all() and (plain[:, 16:] == 0).all()
    assert (zoomed[:, :10] == 255).all() and (zoomed[:, 13:] < 128).all()


def test_decode_is_deterministic():
    spec = PreprocessSpec(32, "shorter_crop", "bicubic", MEAN, STD)
    img = random_image(77, 50)
    assert decode_to_uint8(img, spec).tobytes() == decode_to_uint8(img.copy(), spec).tobytes()


# -- the Embedder protocol -----------------------------------------------------------------------------
def test_embeddings_do_not_depend_on_batch_size(tiny_clip):
    emb = load_embedder(tiny_clip)
    x = pixels(8, emb.preprocess.size)
    one_by_one = torch.cat([emb.embed_uint8(x[i:i + 1]) for i in range(8)])
    for batch in (3, 8):
        batched = torch.cat([emb.embed_uint8(x[i:i + batch]) for i in range(0, 8, batch)])
        torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)


def test_embed_uint8_normalises_with_spec_mean_and_std(mobilenet_file):
    import torchvision

    emb = load_embedder(mobilenet_spec(mobilenet_file))
    x = pixels(2, 64)
    net = torchvision.models.mobilenet_v2(weights=None, num_classes=1001)
    net.load_state_dict(torch.load(mobilenet_file, weights_only=True))
    with torch.no_grad():  # the plain reference: (x/255 - 0.502)/0.502, features, average pool
        ref = net.eval().features((x.float() / 255 - 0.502) / 0.502).mean(dim=(2, 3))
    torch.testing.assert_close(emb.embed_uint8(x), ref, rtol=1e-4, atol=1e-5)


def test_embed_uint8_rejects_pixels_of_another_size(tiny_clip):
    emb = load_embedder(tiny_clip)
    with pytest.raises(ValueError, match="expects uint8 \\[N, 3, 32, 32\\]"):
        emb.embed_uint8(pixels(1, 64))
    with pytest.raises(ValueError):
        emb.embed_uint8(pixels(1, 32).float())


def test_empty_batch_gives_empty_embeddings(tiny_clip):
    emb = load_embedder(tiny_clip)
    assert emb.embed_uint8(pixels(0, 32)).shape == (0, 32)
    assert emb.embed_texts([]).shape == (0, 32)


def test_bf16_autocast_is_close_to_fp32_and_fingerprinted_apart(tiny_clip):
    fp32, bf16 = load_embedder(tiny_clip), load_embedder(tiny_clip, precision="bf16")
    x = pixels(4, 32)
    a, b = fp32.embed_uint8(x), bf16.embed_uint8(x)
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.98
    assert fp32.fingerprint != bf16.fingerprint


def test_embed_images_decodes_pil_images(tiny_clip):
    emb = load_embedder(tiny_clip)
    out = emb.embed_images([random_image(50, 20, seed=i) for i in range(3)], batch_size=2)
    assert out.shape == (3, 32) and out.dtype == np.float32


# -- fingerprints ------------------------------------------------------------------------------------
def test_fingerprint_is_stable_across_loads(tiny_clip, mobilenet_file):
    assert load_embedder(tiny_clip).fingerprint == load_embedder(tiny_clip).fingerprint
    assert load_embedder(mobilenet_spec(mobilenet_file)).fingerprint == \
        load_embedder(mobilenet_spec(mobilenet_file)).fingerprint


def test_fingerprint_changes_with_weights(tmp_path, tiny_clip):
    other = build_tiny_openclip_checkpoint(tmp_path / "seed1.safetensors", seed=1)
    same_bytes = build_tiny_openclip_checkpoint(tmp_path / "copy.safetensors", seed=0)
    base = load_embedder(tiny_clip).fingerprint
    assert load_embedder({**tiny_clip, "pretrained": str(other)}).fingerprint != base
    assert load_embedder({**tiny_clip, "pretrained": str(same_bytes)}).fingerprint == base  # content, not path


@pytest.mark.parametrize("change", [{"mean": [0.5] * 3}, {"std": [0.5] * 3}, {"image_size": 96},
                                    {"interpolation": "bicubic"}, {"resize": "shorter_crop"}])
def test_fingerprint_changes_with_preprocessing(mobilenet_file, change):
    assert load_embedder(mobilenet_spec(mobilenet_file, **change)).fingerprint != \
        load_embedder(mobilenet_spec(mobilenet_file)).fingerprint


# -- raw pixels ------------------------------------------------------------------------------------------
def test_raw_pixel_baseline_is_the_flattened_small_image():
    emb = load_embedder({"id": "raw", "loader": "raw_pixels", "image_size": 16})
    img = random_image(40, 30)
    x = torch.from_numpy(decode_to_uint8(img, emb.preprocess))[None]
    assert emb.dim == 768 and emb.preprocess.size == 16
    np.testing.assert_allclose(emb.embed_uint8(x)[0].numpy(), x[0].numpy().reshape(-1) / 255.0, rtol=0, atol=1e-7)
    assert load_embedder({"loader": "raw_pixels", "image_size": 8}).dim == 192


def test_vision_only_model_refuses_text_with_an_nfhm_error():
    emb = load_embedder({"id": "raw", "loader": "raw_pixels"})
    assert not emb.has_text_tower
    with pytest.raises(NoTextTowerError, match="'raw' has no text tower") as err:
        emb.embed_texts(["a butterfly"])
    assert isinstance(err.value, NfhmError) and isinstance(err.value, NotImplementedError)


# -- torchvision / timm ---------------------------------------------------------------------------------
def test_torchvision_mobilenet_v2_state_dict_gives_1280d_features(mobilenet_file):
    emb = load_embedder(mobilenet_spec(mobilenet_file))
    out = emb.embed_uint8(pixels(3, 64))
    assert emb.dim == 1280 and out.shape == (3, 1280) and torch.isfinite(out).all()
    assert emb.preprocess.pixel_key == "64-squash-bilinear"


@pytest.mark.parametrize("name,dim", [("resnet50", 2048), ("vgg16", 4096), ("vit_b_16", 768)])
def test_torchvision_penultimate_feature_widths(name, dim):
    import torchvision
    from nfhm_pipeline.embedders.torchvision_models import feature_extractor

    with torch.device("meta"):  # shapes only: real forward code, no 100M-parameter init
        net = torchvision.models.get_model(name, weights=None, num_classes=1001)
        features, width = feature_extractor(name, net, name)
        out = features.eval()(torch.empty(2, 3, 224, 224))
    assert width == dim and tuple(out.shape) == (2, dim)


def test_torchvision_loader_uses_imagenet_preprocessing_by_default(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None, num_classes=7).state_dict(), tmp_path / "w.pt")
    emb = load_embedder({"loader": "torchvision", "model": "resnet18", "weights": str(tmp_path / "w.pt"),
                         "num_classes": 7})
    assert emb.dim == 512 and emb.preprocess.pixel_key == "224-shorter-crop-bilinear-r256"
    assert emb.preprocess.mean == (0.485, 0.456, 0.406)


def test_torchvision_wrong_num_classes_names_the_fix(mobilenet_file):
    with pytest.raises(ModelLoadError, match="num_classes=1000"):
        load_embedder(mobilenet_spec(mobilenet_file, num_classes=1000))


def test_torchvision_missing_weights_file(tmp_path):
    with pytest.raises(MissingWeightsError, match="mnv2.*does not exist"):
        load_embedder(mobilenet_spec(tmp_path / "absent.pt"))


def test_timm_model_from_local_weights_file(tmp_path):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("test_vit", pretrained=False)
    torch.save(net.state_dict(), tmp_path / "test_vit.pt")
    emb = load_embedder({"loader": "timm", "model": "test_vit", "weights": str(tmp_path / "test_vit.pt")})
    x = pixels(2, emb.preprocess.size)
    with torch.no_grad():
        ref = net.eval().forward_head(net.forward_features(
            (x.float() / 255 - torch.tensor(emb.preprocess.mean).view(1, 3, 1, 1))
            / torch.tensor(emb.preprocess.std).view(1, 3, 1, 1)), pre_logits=True)
    torch.testing.assert_close(emb.embed_uint8(x), ref, rtol=1e-4, atol=1e-5)


# -- transformers --------------------------------------------------------------------------------------
def test_transformers_clip_vision_tower_matches_clip_image_features(tmp_path):
    import transformers

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, projection_dim=16)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip.save_pretrained(tmp_path)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    emb = load_embedder({"loader": "transformers", "model": str(tmp_path)})
    x = pixels(2, 32)
    mean, std = torch.tensor(emb.preprocess.mean).view(1, 3, 1, 1), torch.tensor(emb.preprocess.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = clip.eval().get_image_features(pixel_values=(x.float() / 255 - mean) / std)
    ref = getattr(ref, "pooler_output", ref)
    assert emb.dim == 16 and (emb.preprocess.size, emb.preprocess.resize) == (32, "shorter_crop")
    torch.testing.assert_close(emb.embed_uint8(x), ref, rtol=1e-4, atol=1e-5)


def test_transformers_florence2_pools_the_mean_of_image_tokens(tmp_path):
    import transformers

    vision = dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                  patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 2], num_groups=[2, 2],
                  window_size=2, projection_dim=24, max_position_embeddings=8, drop_path_rate=0.0)
    text = dict(vocab_size=100, d_model=24, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Florence2ForConditionalGeneration(transformers.Florence2Config(vision_config=vision,
                                                                                          text_config=text))
    model.save_pretrained(tmp_path)
    transformers.CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(tmp_path)
    emb = load_embedder({"loader": "transformers", "model": str(tmp_path)})
    x = pixels(2, 32)
    mean, std = torch.tensor(emb.preprocess.mean).view(1, 3, 1, 1), torch.tensor(emb.preprocess.std).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = model.eval().get_image_features(pixel_values=(x.float() / 255 - mean) / std).pooler_output
    assert tokens.shape == (2, 17, 24) and emb.preprocess.resize == "squash"
    torch.testing.assert_close(emb.embed_uint8(x), tokens.mean(dim=1), rtol=1e-4, atol=1e-5)


def test_transformers_repo_missing_offline_names_repo_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as err:
        load_embedder({"id": "dino", "loader": "transformers", "model": "facebook/dinov2-base"},
                      cache_dir=tmp_path)
    assert "'dino'" in str(err.value) and "hf download facebook/dinov2-base" in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_unknown_loader_lists_the_loaders():
    with pytest.raises(ModelLoadError) as err:
        load_embedder({"id": "x", "loader": "onnx", "model": "m"})
    assert all(name in str(err.value) for name in LOADERS)


# -- trust_remote_code ---------------------------------------------------------------------------------
def tiny_hf_clip_folder(folder):
    """A save_pretrained folder of a tiny CLIP (config.json, model.safetensors, preprocessor_config.json)."""
    import transformers

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8, projection_dim=16)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                   projection_dim=16)).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                    crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def marker_model_folder(folder, marker, model_type="nfhm_marker"):
    """A model folder whose config.json names its own Python (auto_map) that writes `marker` when imported."""
    import json

    tiny_hf_clip_folder(folder)
    (folder / "marker_code.py").write_text(
        f"open({str(marker)!r}, 'w').write('the model folder ran its code')\n"
        "from transformers import CLIPConfig as MarkerConfig, CLIPModel as MarkerModel\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "marker_code.MarkerConfig",
                                                   "AutoModel": "marker_code.MarkerModel"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_without_trust_is_refused_before_its_code_runs(tmp_path):
    folder = marker_model_folder(tmp_path / "model", tmp_path / "ran.txt")
    with pytest.raises(ModelLoadError) as err:
        load_embedder({"id": "custom", "loader": "transformers", "model": str(folder)})
    msg = str(err.value)
    assert "'custom'" in msg and "marker_code.py" in msg and "trust_remote_code" in msg and "florence2" in msg
    assert not (tmp_path / "ran.txt").exists()


def test_trust_remote_code_for_a_model_type_that_does_not_need_it_is_refused(tmp_path):
    folder = marker_model_folder(tmp_path / "model", tmp_path / "ran.txt")
    with pytest.raises(ModelLoadError) as err:
        load_embedder({"id": "custom", "loader": "transformers", "model": str(folder), "trust_remote_code": True})
    msg = str(err.value)
    assert "would run Python files from" in msg and "'nfhm_marker'" in msg and "florence2" in msg
    assert not (tmp_path / "ran.txt").exists()


def test_trust_remote_code_on_a_native_model_type_is_refused(tmp_path):
    folder = marker_model_folder(tmp_path / "model", tmp_path / "ran.txt", model_type="clip")
    with pytest.raises(ModelLoadError, match="model_type 'clip'"):
        load_embedder({"loader": "transformers", "model": str(folder), "trust_remote_code": True})
    assert not (tmp_path / "ran.txt").exists()
    # Without trust the same folder loads with transformers' own CLIP code, and its code never runs.
    assert load_embedder({"loader": "transformers", "model": str(folder)}).dim == 16
    assert not (tmp_path / "ran.txt").exists()


def test_trust_remote_code_must_be_a_boolean(tmp_path):
    with pytest.raises(ModelLoadError, match="trust_remote_code must be true or false, got 'yes'"):
        load_embedder({"loader": "transformers", "model": str(tiny_hf_clip_folder(tmp_path)),
                       "trust_remote_code": "yes"})


def test_remote_code_load_never_waits_on_stdin(tmp_path):
    # transformers asks "[y/N]" on stdin for remote code reached with trust_remote_code=None and
    # waits 15 s; inside a Dagster step nobody answers. stdin here is a pipe nobody writes to.
    import os
    import subprocess
    import sys

    folder = marker_model_folder(tmp_path / "model", tmp_path / "ran.txt")
    script = (
        "import time, transformers\n"
        "from nfhm_pipeline.embedders import load_embedder\n"
        "from nfhm_pipeline.errors import NfhmError\n"
        "t = time.monotonic()\n"
        "try:\n"
        f"    load_embedder({{'id': 'custom', 'loader': 'transformers', 'model': {str(folder)!r}, "
        "'trust_remote_code': True})\n"
        "except NfhmError as e:\n"
        "    print(type(e).__name__ + ': ' + str(e))\n"
        "print(f'seconds {time.monotonic() - t:.2f}')\n")
    log = tmp_path / "out.txt"
    with open(log, "w") as out_file:
        proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=out_file,
                                stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            proc.wait(timeout=180)  # stdin stays open and silent, as a terminal nobody watches
        finally:
            proc.kill()
            proc.stdin.close()
    out = log.read_text()
    assert "[y/N]" not in out and "Do you wish to run the custom code" not in out
    assert "ModelLoadError: model 'custom': trust_remote_code: true would run Python files" in out
    assert float(out.rsplit("seconds ", 1)[1]) < 10  # transformers' question waits 15 s
    assert not (tmp_path / "ran.txt").exists()


TINY_FLORENCE_CODE = '''
import torch
from transformers import PretrainedConfig, PreTrainedModel

open({marker!r}, "w").write("ran")


class TinyFlorenceConfig(PretrainedConfig):
    model_type = "florence2"

    def __init__(self, width=8, **kwargs):
        self.width = width
        super().__init__(**kwargs)


class TinyFlorence(PreTrainedModel):
    config_class = TinyFlorenceConfig

    def __init__(self, config):
        super().__init__(config)
        self.patches = torch.nn.Conv2d(3, config.width, 8, 8)
        self.post_init()

    def _encode_image(self, pixel_values):
        return self.patches(pixel_values).flatten(2).transpose(1, 2)
'''


def test_allowed_remote_code_model_loads_with_its_own_code(tmp_path, monkeypatch):
    # The original microsoft/Florence-2-* layout: model_type florence2, config and model from the
    # folder's own module (auto_map), pooled as the mean of `_encode_image` tokens.
    import importlib.util
    import json

    import transformers
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = tmp_path / "florence"
    folder.mkdir()
    code = folder / "modeling_tiny_florence.py"
    code.write_text(TINY_FLORENCE_CODE.format(marker=str(tmp_path / "built.txt")))
    spec = importlib.util.spec_from_file_location("nfhm_test_tiny_florence", code)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    reference = module.TinyFlorence(module.TinyFlorenceConfig()).eval()
    reference.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_tiny_florence.TinyFlorenceConfig",
                          "AutoModelForCausalLM": "modeling_tiny_florence.TinyFlorence"}
    (folder / "config.json").write_text(json.dumps(config))
    transformers.CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(folder)

    emb = load_embedder({"id": "florence", "loader": "transformers", "model": str(folder),
                         "trust_remote_code": True})
    assert emb.remote_florence and emb.load_report["trust_remote_code"] is True
    assert (tmp_path / "modules").is_dir()  # transformers ran the folder's module from its module cache
    x = pixels(2, 32)
    mean, std = torch.tensor(emb.preprocess.mean).view(1, 3, 1, 1), torch.tensor(emb.preprocess.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = reference._encode_image((x.float() / 255 - mean) / std).mean(dim=1)
    assert emb.dim == 8 and emb.preprocess.resize == "squash"
    torch.testing.assert_close(emb.embed_uint8(x), ref, rtol=1e-5, atol=1e-6)


# -- loader records and key validation -----------------------------------------------------------------
def test_load_embedder_refuses_a_key_its_loader_does_not_read():
    with pytest.raises(ModelLoadError) as err:
        load_embedder({"id": "raw", "loader": "raw_pixels", "size": 16})
    msg = str(err.value)
    assert "'raw'" in msg and "['size']" in msg and "'raw_pixels'" in msg and "image_size" in msg


def test_every_loader_record_names_a_load_function_and_its_fields():
    from nfhm_pipeline.embedders.loaders import COMMON_FIELDS

    for kind, record in LOADERS.items():
        assert record.kind == kind and callable(record.load)
        assert record.path_fields <= record.fields and not record.fields & COMMON_FIELDS


def test_every_shipped_catalog_model_entry_is_a_valid_loader_spec():
    # vlm4bio's Florence-2 entry once said `pooling: florence_mean`, refused only when it loaded.
    from nfhm_pipeline.catalog import available_catalogs, load_catalog
    from nfhm_pipeline.embedders.hf_transformers import POOLINGS
    from nfhm_pipeline.embedders.loaders import check_spec

    for name in available_catalogs():
        for key, model in load_catalog(name).models.items():
            spec = {**model.loader_spec(), "id": key}
            assert check_spec(spec)[0] == key
            assert spec.get("pooling", "image_embeds") in POOLINGS, (name, key)
