"""Offline fixtures: a tiny random Qwen2.5-VL, the random 3B architecture, synthetic videos.

No weights are downloaded anywhere. ``build_tiny_model`` writes a small byte-level tokenizer
with the real Qwen special-token ids, the Qwen2.5-VL chat template and processor configs to
a folder, loads the processor back with ``AutoProcessor`` (the real loading path), and builds
a 2-layer model on CPU in about a second.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
FIRST_SPECIAL_ID = 151643  # <|endoftext|> in every Qwen2/2.5 tokenizer

# Qwen2.5-VL-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_VISION_COMMON = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      tokens_per_second=2, hidden_act="silu", in_chans=3)
_TOKEN_IDS = dict(bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652,
                  vision_end_token_id=151653, vision_token_id=151654, image_token_id=151655,
                  video_token_id=151656)

TINY_CONFIG = dict(
    model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
    rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    tie_word_embeddings=True, use_sliding_window=False, initializer_range=0.25, **_TOKEN_IDS,
    vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                       fullatt_block_indexes=[1], initializer_range=0.05, **_VISION_COMMON),
)

# Qwen2.5-VL-3B-Instruct's architecture (DESIGN.md section 9); random weights for timing only.
QWEN25_VL_3B_CONFIG = dict(
    model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
    num_attention_heads=16, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128000,
    rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    tie_word_embeddings=True, use_sliding_window=False, initializer_range=0.02, **_TOKEN_IDS,
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                       fullatt_block_indexes=[7, 15, 23, 31], initializer_range=0.02, **_VISION_COMMON),
)

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _tokenizer_json() -> str:
    """A byte-level BPE with no merges (one token per byte) plus the Qwen special tokens at their real ids.

    Ids 256..151642 are filler tokens that encoding never produces (they keep the vocab
    contiguous, as some transformers versions require).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), FIRST_SPECIAL_ID)})
    vocab.update({s: FIRST_SPECIAL_ID + i for i, s in enumerate(SPECIAL_TOKENS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return tok.to_str()


def write_processor_files(folder: str | Path, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 64) -> Path:
    """Write tokenizer, chat template and image/video processor configs loadable by AutoProcessor."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(_tokenizer_json())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": 131072, "chat_template": CHAT_TEMPLATE, "errors": "replace",
    }))
    proc = {"min_pixels": min_pixels, "max_pixels": max_pixels,
            "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
            "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD, "processor_class": "Qwen2_5_VLProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps({**proc, "image_processor_type": "Qwen2VLImageProcessor"}))
    (folder / "video_preprocessor_config.json").write_text(json.dumps({**proc, "video_processor_type": "Qwen2VLVideoProcessor"}))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return folder


def load_processor(folder: str | Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(folder))


def make_config(flat: dict, attn_implementation: str = "sdpa"):
    from transformers import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig(**json.loads(json.dumps(flat)))
    cfg._attn_implementation = attn_implementation
    for sub in ("text_config", "vision_config"):
        if hasattr(cfg, sub):
            getattr(cfg, sub)._attn_implementation = attn_implementation
    return cfg


def build_random_model(flat_config: dict, *, seed: int = 0, dtype=torch.float32, device="cpu",
                       attn_implementation: str = "sdpa"):
    """A randomly initialised StreamQwenModel of the given architecture, in eval mode."""
    from .stream_qwen_model import StreamQwenModel

    torch.manual_seed(seed)
    cfg = make_config(flat_config, attn_implementation)
    with torch.device(device):
        model = StreamQwenModel(cfg)
    return model.to(dtype=dtype).eval()


def build_tiny_model(seed: int = 0, attn_implementation: str = "sdpa", folder: str | Path | None = None):
    """(model, processor): a tiny random Qwen2.5-VL (2 layers, hidden 64) with real token ids, on CPU, fp32."""
    folder = Path(folder or tempfile.mkdtemp(prefix="tiny-qwen25vl-"))
    processor = load_processor(write_processor_files(folder))
    model = build_random_model(TINY_CONFIG, seed=seed, attn_implementation=attn_implementation)
    return model, processor


def build_3b_processor(folder: str | Path | None = None):
    """A processor with Qwen2.5-VL-3B's real pixel budget and the tiny tokenizer (random-weight runs)."""
    folder = Path(folder or tempfile.mkdtemp(prefix="qwen25vl-3b-proc-"))
    return load_processor(write_processor_files(folder, min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768))


# the synthetic video lives in the library (model/synthetic.py); re-exported for the tests
from .synthetic import synthetic_frames, write_synthetic_video  # noqa: E402,F401
