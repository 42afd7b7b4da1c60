"""Missing-weights messages name every file a model needs, all at once, checked before loading.

Each model is given as the catalog gives it (a loader spec), with real files in tmp_path and a
real Hugging Face cache layout (build_tiny_hf_hub_cache), loading offline.
"""
import json

import pytest
import torch

from nfhm_pipeline.embedders import (TINY_OPENCLIP_NAME, build_tiny_hf_hub_cache, build_tiny_openclip_checkpoint,
                                     load_embedder)
from nfhm_pipeline.embedders.tiny import _tiny_state_dict
from nfhm_pipeline.errors import MissingWeightsError

ARBOR_STATE_DICT = "arborclip-vit-b-16-from-bioclip-epoch-8.pt"


def arborclip_spec(base="hf-hub:imageomics/bioclip",
                   state_dict=f"hf-hub:ChihHsuan-Yang/ArborCLIP/{ARBOR_STATE_DICT}"):
    # The shape of vlm4bio.yaml's arborclip entry: a base model plus a fine-tuned state dict.
    return {"id": "arborclip", "loader": "open_clip", "model": base, "state_dict": state_dict}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_base_and_state_dict_both_missing_are_named_in_one_error(offline_cache):
    with pytest.raises(MissingWeightsError) as err:
        load_embedder(arborclip_spec())
    msg = str(err.value)
    assert msg.startswith("model 'arborclip' needs 3 files that are missing")
    for part in ("imageomics/bioclip", "open_clip_config.json", "open_clip_model.safetensors",
                 "ChihHsuan-Yang/ArborCLIP", ARBOR_STATE_DICT, str(offline_cache),
                 "`hf download imageomics/bioclip`", f"`hf download ChihHsuan-Yang/ArborCLIP {ARBOR_STATE_DICT}`",
                 "models--imageomics--bioclip", "models--ChihHsuan-Yang--ArborCLIP", "state_dict:"):
        assert part in msg, part
    assert "Traceback" not in msg and "\n" not in msg


def test_base_present_and_state_dict_missing_names_only_the_state_dict(offline_cache):
    build_tiny_hf_hub_cache(offline_cache, repo_id="nfhm/tiny-clip", seed=0)
    with pytest.raises(MissingWeightsError) as err:
        load_embedder(arborclip_spec(base="hf-hub:nfhm/tiny-clip"))
    msg = str(err.value)
    assert msg.startswith(f"model 'arborclip': state_dict ({ARBOR_STATE_DICT}) of Hugging Face repo "
                          "ChihHsuan-Yang/ArborCLIP")
    assert "nfhm/tiny-clip" not in msg and "open_clip_config.json" not in msg


def test_local_base_checkpoint_and_state_dict_both_missing(tmp_path):
    spec = {"id": "tuned", "loader": "open_clip", "model": TINY_OPENCLIP_NAME,
            "pretrained": str(tmp_path / "base.safetensors"), "state_dict": str(tmp_path / "ft.pt")}
    with pytest.raises(MissingWeightsError) as err:
        load_embedder(spec)
    msg = str(err.value)
    assert f"weights file {tmp_path / 'base.safetensors'} does not exist" in msg
    assert f"state_dict file {tmp_path / 'ft.pt'} does not exist" in msg
    assert "Copy the files there" in msg
    build_tiny_openclip_checkpoint(tmp_path / "base.safetensors")
    with pytest.raises(MissingWeightsError) as err:
        load_embedder(spec)
    assert "base.safetensors" not in str(err.value) and "ft.pt" in str(err.value)
    torch.save(_tiny_state_dict(1), tmp_path / "ft.pt")
    assert load_embedder(spec).load_report["state_dict_file"] == str(tmp_path / "ft.pt")


def test_text_tower_repo_of_another_hub_repo_is_a_needed_file(offline_cache):
    # BiomedCLIP-style: the open_clip config names a Hugging Face text tower / tokenizer repo.
    snapshot = build_tiny_hf_hub_cache(offline_cache, repo_id="nfhm/tiny-biomed", seed=0)
    config = json.loads((snapshot / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "nfhm/absent-pubmedbert"
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(MissingWeightsError) as err:
        load_embedder({"id": "biomed", "loader": "open_clip", "model": "hf-hub:nfhm/tiny-biomed"})
    msg = str(err.value)
    assert "text tower / tokenizer (config.json / tokenizer_config.json) of Hugging Face repo " \
           "nfhm/absent-pubmedbert" in msg and "`hf download nfhm/absent-pubmedbert`" in msg


def test_transformers_hub_repo_offline_names_config_weights_and_processor(offline_cache):
    with pytest.raises(MissingWeightsError) as err:
        load_embedder({"id": "dino", "loader": "transformers", "model": "facebook/dinov2-base"})
    msg = str(err.value)
    assert msg.startswith("model 'dino' needs 3 files that are missing")
    for part in ("config (config.json)", "weights (model.safetensors / model.safetensors.index.json / "
                 "pytorch_model.bin / pytorch_model.bin.index.json)", "image processor config "
                 "(preprocessor_config.json / processor_config.json)", "`hf download facebook/dinov2-base`"):
        assert part in msg, part


def test_transformers_folder_lists_every_missing_file_and_shard(tmp_path):
    from test_embedders import tiny_hf_clip_folder

    folder = tiny_hf_clip_folder(tmp_path / "clip")
    (folder / "preprocessor_config.json").unlink()
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MissingWeightsError) as err:
        load_embedder({"id": "clip", "loader": "transformers", "model": str(folder)})
    msg = str(err.value)
    assert msg.startswith("model 'clip' needs 3 files that are missing")
    for part in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "preprocessor_config.json", f"folder {folder}"):
        assert part in msg, part


def test_every_environment_variable_the_code_and_catalogs_read_is_in_the_readme():
    # VLM4BIO_ROOT was used by vlm4bio.yaml and documented nowhere.
    import re

    from conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", section))
    used = set()
    for path in (REPO_ROOT / "nfhm_pipeline").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        used |= set(re.findall(r"""(?:environ(?:\.get)?[(\[]|getenv\(|EnvVar\(|_env_\w+\()\s*["']([A-Z][A-Z0-9_]+)["']""",
                               text))
    for path in [*(REPO_ROOT / "nfhm_pipeline").rglob("*.yaml"), *(REPO_ROOT / "docs").rglob("*.yaml")]:
        used |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]+)", path.read_text(encoding="utf-8")))
    assert {"VLM4BIO_ROOT", "NFHM_SHARED_DATA", "NFHM_DEVICE", "HF_HUB_OFFLINE"} <= used
    assert used - documented == set()
