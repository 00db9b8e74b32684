"""Generated checkpoints are real diffusers pipelines with real tokenizers; `full` is the real size."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from stages.checkpoints import write_checkpoints
from stages.families import DEEPFLOYD_IF
from stages.families.deepfloyd_if import checkpoints
from stages.families.deepfloyd_if.checkpoints import parameter_counts
from stages.families.deepfloyd_if.presets import get_preset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "full-configs"

EXPECTED = {
    "IF-I": ("IFPipeline", {"text_encoder", "tokenizer", "unet", "scheduler"}),
    "IF-II": ("IFSuperResolutionPipeline", {"tokenizer", "unet", "scheduler", "image_noising_scheduler"}),
    "x4-upscaler": (
        "StableDiffusionUpscalePipeline",
        {"vae", "text_encoder", "tokenizer", "unet", "scheduler", "low_res_scheduler"},
    ),
}


@pytest.mark.parametrize("folder", list(EXPECTED))
def test_diffusers_loads_each_folder(tiny_checkpoints, folder):
    pipe = DiffusionPipeline.from_pretrained(tiny_checkpoints / folder, local_files_only=True)
    cls, components = EXPECTED[folder]
    assert type(pipe).__name__ == cls
    assert components <= {name for name, c in pipe.components.items() if c is not None}
    weights = list((tiny_checkpoints / folder).rglob("*.safetensors"))
    assert weights and not list((tiny_checkpoints / folder).rglob("*.bin"))


def test_tokenizers_are_complete_and_real(tiny_checkpoints):
    t5 = DiffusionPipeline.from_pretrained(tiny_checkpoints / "IF-I", unet=None).tokenizer
    clip = DiffusionPipeline.from_pretrained(tiny_checkpoints / "x4-upscaler", unet=None, vae=None).tokenizer
    assert (tiny_checkpoints / "IF-I" / "tokenizer" / "spiece.model").is_file()
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tiny_checkpoints / "x4-upscaler" / "tokenizer").iterdir()}
    for tokenizer in (t5, clip):
        assert tokenizer.model_max_length == 77
        ids = tokenizer("a photo of a kangaroo", padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77
    # T5 conventions: pad 0, eos 1, unk 2, sentinels; subword pieces, not one id per character.
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert "<extra_id_0>" in t5.get_vocab()
    pieces = t5("a photo of a kangaroo").input_ids
    assert pieces[-1] == 1 and len(pieces) < len("a photo of a kangaroo")
    # CLIP conventions: bos/eos around BPE words ending in </w>, eos used as pad.
    tokens = clip.convert_ids_to_tokens(clip("A photo of a kangaroo").input_ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert "photo</w>" in tokens and clip.pad_token == "<|endoftext|>"


def test_text_encoder_vocab_covers_tokenizer(tiny_checkpoints):
    index = json.loads((tiny_checkpoints / "IF-I" / "text_encoder" / "config.json").read_text())
    t5 = DiffusionPipeline.from_pretrained(tiny_checkpoints / "IF-I", unet=None).tokenizer
    assert index["vocab_size"] == len(t5)


def test_full_preset_is_the_real_architecture():
    """Exact parameter counts of IF-I-XL, IF-II-L, the x4 upscaler (UNet, VAE, CLIP) and T5-v1.1-XXL,
    built on the meta device."""
    assert parameter_counts("full") == {
        "stage1_unet": 4_304_695_110,
        "stage2_unet": 1_243_277_190,
        "stage3_unet": 473_398_020,
        "stage3_vae": 55_325_927,
        "stage3_text_encoder": 340_387_840,
        "t5_encoder": 4_762_310_656,
    }


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/reference/full-configs is not beside this checkout")
def test_shipped_full_configs_equal_the_reference():
    shipped = Path(checkpoints.__file__).parent / "configs" / "full"
    for path in SHARED.glob("*.json"):
        if (shipped / path.name).exists():
            assert json.loads((shipped / path.name).read_text()) == json.loads(path.read_text()), path.name


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_scaled_presets_keep_block_types_and_resolutions(preset):
    full, scaled = get_preset("full"), get_preset(preset)
    for component in ("stage1_unet", "stage2_unet", "stage3_unet", "stage3_vae"):
        for key in ("down_block_types", "up_block_types", "in_channels", "out_channels", "sample_size"):
            assert scaled.configs[component].get(key) == full.configs[component].get(key), (component, key)
    for component in ("stage1_scheduler", "stage2_scheduler", "stage3_scheduler", "stage3_low_res_scheduler"):
        assert scaled.configs[component] == full.configs[component]


def test_failed_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    def broken_vae(preset):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoints, "build_vae", broken_vae)
    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoints(DEEPFLOYD_IF, "tiny", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_tiny_resolutions_are_real(cascade):
    assert cascade.stages["stage1"].unet.config.sample_size == 64
    assert cascade.stages["stage2"].unet.config.sample_size == 256
    latents = torch.zeros(1, 4, 256, 256)
    with torch.inference_mode():
        vae = cascade.stages["stage3"].pipe.vae
        assert vae.decode(latents, return_dict=False)[0].shape == (1, 3, 1024, 1024)
