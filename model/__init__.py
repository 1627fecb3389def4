"""Streaming video question answering on Qwen2.5-VL: encode each chunk once, answer at any moment."""
from .kv_cache_manager import KVCacheManager, StreamKVCache
from .stream_qwen_model import StreamQwenModel, StreamState
from .video_stream_inference import ChunkInfo, VideoStreamInference

__all__ = ["VideoStreamInference", "StreamQwenModel", "StreamState", "KVCacheManager", "StreamKVCache", "ChunkInfo"]
