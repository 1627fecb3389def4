"""Streaming video question answering on Qwen2.5-VL: encode each chunk once, answer at any moment."""
from .config import StreamConfig
from .answer_stream import AnswerStream
from .decoding import Answer, ChoiceResult
from .kv_cache_manager import KVCacheManager, StreamKVCache
from .sources import open_video
from .stream import StreamState
from .stream_qwen_model import StreamQwenModel
from .video_stream_inference import ChunkInfo, VideoStreamInference

__all__ = ["VideoStreamInference", "StreamConfig", "StreamQwenModel", "StreamState", "KVCacheManager",
           "StreamKVCache", "ChunkInfo", "Answer", "ChoiceResult", "AnswerStream", "open_video"]
