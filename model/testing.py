"""Offline fixtures: tiny random models of each family, the real architectures with random weights, synthetic videos.

No weights are downloaded anywhere. ``build_tiny_model(family=...)`` writes a small byte-level
tokenizer with the real Qwen special-token ids, the family's chat template and processor configs
to a folder, loads the processor back with ``AutoProcessor`` (the real loading path), and builds
a 2-3 layer model on CPU in about a second. ``REAL_CONFIGS`` are the published architectures
(Qwen2.5-VL-3B, Qwen2-VL-2B, Qwen3-VL-2B/4B/8B) for GPU timing with random weights. The library
imports this module only when an entry point is asked to run without a checkpoint.
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

# Qwen3-VL-Instruct's chat template has no default system prompt (Qwen2/2.5 add one); written here for the fixtures.
QWEN3_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
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

# Qwen2-VL: no vision windows, QuickGELU, the merger's width is the text hidden size.
TINY_QWEN2_VL_CONFIG = dict(
    model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"],
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
    rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    tie_word_embeddings=True, use_sliding_window=False, initializer_range=0.25, **_TOKEN_IDS,
    vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu",
                       initializer_range=0.05),
)

# Qwen3-VL: head_dim 16 (interleaved sections 3+3+2 = head_dim / 2), 3 layers, DeepStack after layers 0 and 1.
_QWEN3_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                  vision_end_token_id=151653)
TINY_QWEN3_VL_CONFIG = dict(
    model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"], tie_word_embeddings=True, **_QWEN3_IDS,
    text_config=dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
                     max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=5000000.0,
                     rope_scaling={"rope_type": "default", "mrope_section": [3, 3, 2], "mrope_interleaved": True},
                     initializer_range=0.25, attention_bias=False, tie_word_embeddings=True,
                     bos_token_id=151643, eos_token_id=151645),
    vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                       deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh", in_channels=3,
                       initializer_range=0.05),
)

# Qwen3-VL-MoE (30B-A3B's shape, tiny): the dense tiny model with a mixture of 4 experts, 2 per token.
TINY_QWEN3_VL_MOE_CONFIG = {**TINY_QWEN3_VL_CONFIG, "model_type": "qwen3_vl_moe",
                            "architectures": ["Qwen3VLMoeForConditionalGeneration"],
                            "text_config": {**TINY_QWEN3_VL_CONFIG["text_config"], "num_experts": 4,
                                            "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                            "decoder_sparse_step": 1, "norm_topk_prob": True}}

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

# Qwen2-VL-2B-Instruct's architecture.
QWEN2_VL_2B_CONFIG = dict(
    model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"],
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
    rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    tie_word_embeddings=True, use_sliding_window=False, initializer_range=0.02, **_TOKEN_IDS,
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu",
                       initializer_range=0.02),
)


def _qwen3_vl(hidden, layers, heads, intermediate, vision_depth, vision_hidden, vision_intermediate, deepstack, tied):
    return dict(
        model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"], tie_word_embeddings=tied,
        **_QWEN3_IDS,
        text_config=dict(vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8, head_dim=128,
                         hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6, rope_theta=5000000.0,
                         rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                         initializer_range=0.02, attention_bias=False, tie_word_embeddings=tied,
                         bos_token_id=151643, eos_token_id=151645),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_intermediate,
                           num_heads=16, out_hidden_size=hidden, patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=deepstack,
                           hidden_act="gelu_pytorch_tanh", in_channels=3, initializer_range=0.02),
    )


# Qwen3-VL-2B/4B/8B-Instruct's architectures (FAMILIES.md); random weights for timing only.
QWEN3_VL_2B_CONFIG = _qwen3_vl(2048, 28, 16, 6144, 24, 1024, 4096, [5, 11, 17], tied=True)
QWEN3_VL_4B_CONFIG = _qwen3_vl(2560, 36, 32, 9728, 24, 1024, 4096, [5, 11, 17], tied=True)
QWEN3_VL_8B_CONFIG = _qwen3_vl(4096, 36, 32, 12288, 27, 1152, 4304, [8, 16, 24], tied=False)

TINY_CONFIGS = {"qwen2_5_vl": TINY_CONFIG, "qwen2_vl": TINY_QWEN2_VL_CONFIG, "qwen3_vl": TINY_QWEN3_VL_CONFIG,
                "qwen3_vl_moe": TINY_QWEN3_VL_MOE_CONFIG}
REAL_CONFIGS = {"qwen2_5_vl-3b": QWEN25_VL_3B_CONFIG, "qwen2_vl-2b": QWEN2_VL_2B_CONFIG,
                "qwen3_vl-2b": QWEN3_VL_2B_CONFIG, "qwen3_vl-4b": QWEN3_VL_4B_CONFIG, "qwen3_vl-8b": QWEN3_VL_8B_CONFIG}

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


_CLIP_MEAN_STD = (_CLIP_MEAN, _CLIP_STD)
_HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
PROCESSOR_FILES = {  # family -> (processor class, image processor, video processor, patch, mean/std, chat template)
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor", 14, _CLIP_MEAN_STD,
                   CHAT_TEMPLATE),
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor", 14, _CLIP_MEAN_STD, CHAT_TEMPLATE),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor", 16, _HALF, QWEN3_CHAT_TEMPLATE),
}
TINY_PIXELS = {"qwen2_5_vl": (56 * 56, 28 * 28 * 64), "qwen2_vl": (56 * 56, 28 * 28 * 64),
               "qwen3_vl": (64 * 64, 32 * 32 * 64)}  # (min, max) pixels of an image or a video frame
REAL_PIXELS = {"qwen2_5_vl": (128 * 28 * 28, 768 * 28 * 28), "qwen2_vl": (128 * 28 * 28, 768 * 28 * 28),
               "qwen3_vl": (128 * 32 * 32, 768 * 32 * 32)}


def write_processor_files(folder: str | Path, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 64,
                          family: str = "qwen2_5_vl") -> Path:
    """Write tokenizer, chat template and image/video processor configs loadable by AutoProcessor.

    Qwen3-VL's video processor sizes a whole video by ``size``; the stream sizes each frame as a
    two-frame clip with its per-frame cap (``families/qwen3_vl.py``), so its ``size`` is written as
    twice the per-frame minimum and its cap as ``max_video_tokens`` = max_pixels / 32^2.
    """
    family = family.replace("_moe", "")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor_class, image_class, video_class, patch, (mean, std), template = PROCESSOR_FILES[family]
    (folder / "tokenizer.json").write_text(_tokenizer_json())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": 131072, "chat_template": template, "errors": "replace",
    }))
    common = {"patch_size": patch, "temporal_patch_size": 2, "merge_size": 2, "image_mean": mean, "image_std": std,
              "processor_class": processor_class}
    image = {**common, "min_pixels": min_pixels, "max_pixels": max_pixels,
             "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}, "image_processor_type": image_class}
    if family == "qwen3_vl":
        factor = patch * 2
        video = {**common, "size": {"shortest_edge": 2 * min_pixels, "longest_edge": max(2 * max_pixels, 16 * 2**20)},
                 "max_video_tokens": max_pixels // factor**2, "video_processor_type": video_class}
    else:
        video = {**image, "video_processor_type": video_class}
        del video["image_processor_type"]
    (folder / "preprocessor_config.json").write_text(json.dumps(image))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return folder


def load_processor(folder: str | Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(folder))


def make_config(flat: dict, attn_implementation: str = "sdpa"):
    """A transformers config of the family ``flat["model_type"]`` names."""
    from .families import family_of

    cfg = family_of(flat["model_type"]).model_class().config_class(**json.loads(json.dumps(flat)))
    cfg._attn_implementation = attn_implementation
    for sub in ("text_config", "vision_config"):
        if hasattr(cfg, sub):
            getattr(cfg, sub)._attn_implementation = attn_implementation
    return cfg


def build_random_model(flat_config: dict, *, seed: int = 0, dtype=torch.float32, device="cpu",
                       attn_implementation: str = "sdpa"):
    """A randomly initialised StreamQwenModel of the given architecture (any family), in eval mode."""
    from .stream_qwen_model import StreamQwenModel

    torch.manual_seed(seed)
    cfg = make_config(flat_config, attn_implementation)
    with torch.device(device):
        model = StreamQwenModel(cfg)
    return model.to(dtype=dtype).eval()


def build_tiny_model(seed: int = 0, attn_implementation: str = "sdpa", folder: str | Path | None = None,
                     family: str = "qwen2_5_vl"):
    """(model, processor): a tiny random model of ``family`` (2-3 layers, hidden 64) with real token ids, on CPU,
    fp32. Random weights: its answers are meaningless, its arithmetic is the real architecture's."""
    folder = Path(folder or tempfile.mkdtemp(prefix=f"tiny-{family}-"))
    processor = load_processor(write_processor_files(folder, *TINY_PIXELS[family.replace("_moe", "")], family=family))
    model = build_random_model(TINY_CONFIGS[family], seed=seed, attn_implementation=attn_implementation)
    return model, processor


def build_processor(family: str = "qwen2_5_vl", folder: str | Path | None = None):
    """A processor with a family's real pixel budget and the tiny tokenizer (random-weight runs of real sizes)."""
    folder = Path(folder or tempfile.mkdtemp(prefix=f"{family}-proc-"))
    return load_processor(write_processor_files(folder, *REAL_PIXELS[family], family=family))


def build_3b_processor(folder: str | Path | None = None):
    """A processor with Qwen2.5-VL-3B's real pixel budget and the tiny tokenizer (random-weight runs)."""
    return build_processor("qwen2_5_vl", folder)


# the synthetic video lives in the library (model/synthetic.py); re-exported for the tests
from .synthetic import synthetic_frames, write_synthetic_video  # noqa: E402,F401
