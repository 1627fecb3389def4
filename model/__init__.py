"""Streaming video question answering on Qwen2.5-VL: encode each chunk once, answer at any moment.

The names below are imported on first use (PEP 562), so ``python -m model --help`` and the
torch-free modules (``model.sources``, ``model.config``) do not load torch and transformers.
"""
from importlib import import_module

_WHERE = {"StreamConfig": ".config", "AnswerStream": ".answer_stream", "Answer": ".decoding",
          "ChoiceResult": ".decoding", "KVCacheManager": ".kv_cache_manager", "StreamKVCache": ".kv_cache_manager",
          "open_video": ".sources", "StreamState": ".stream", "StreamQwenModel": ".stream_qwen_model",
          "ChunkInfo": ".video_stream_inference", "VideoStreamInference": ".video_stream_inference",
          "KVPool": ".kv_pool", "PoolConfig": ".config"}

__all__ = ["VideoStreamInference", "StreamConfig", "StreamQwenModel", "StreamState", "KVCacheManager",
           "StreamKVCache", "ChunkInfo", "Answer", "ChoiceResult", "AnswerStream", "open_video", "KVPool", "PoolConfig"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
