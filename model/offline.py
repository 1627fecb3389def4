"""The native (offline) path: a whole transcript in one standard transformers forward.

This is what a user would write without streaming: placeholder tokens expanded in the prompt,
``pixel_values_videos`` for all frames at once, and ``model(...)`` with transformers' own
embedding merge, vision tower, mask and ``DynamicCache``. It runs transformers' stock sdpa
attention (``StreamQwenModel``'s dispatchers delegate ordinary calls to it). The transcript is
written by the same family grammar the stream uses (``transcript.Grammar``, ``transcript.positions``),
from the *events* a stream's calls make (``Video``, ``Image``, ``Question``, ``Answer``), so
streamed and offline results compare one layout computed incrementally and at once; the layout
itself is checked against the processors' (``tests/test_family_reference.py``). Positions come
from this project (``model/positions.py``) on every transformers version (DESIGN.md 3-4).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from . import compat
from .frames import pad_to_temporal_patch, patchify, resize_frames, target_size, to_frame_list
from .prompt import prompt_pieces, token_ids, encode_user_text
from .timing import sync
from .transcript import Grammar, Piece, Text, Vision, pair_times, positions


@dataclass(frozen=True)
class Video:
    """Frames appended to the stream (consecutive ``Video`` events are one video, as consecutive appends are).
    ``timestamps``: each frame's time in seconds (default: the stream's time at ``fps``)."""

    frames: Any
    fps: float
    timestamps: Optional[Sequence[float]] = None


@dataclass(frozen=True)
class Image:
    image: Any


@dataclass(frozen=True)
class Question:
    """A question (untrusted text, kept literal) and the assistant header after it."""

    text: str


@dataclass(frozen=True)
class Answer:
    """The answer kept as a turn (``ask(update_state=True)``): its token ids and the turn's end."""

    ids: Sequence[int]


@dataclass(frozen=True)
class Continuation:
    """Token ids right after a question, not closing its turn (a choice being scored)."""

    ids: Sequence[int]


Event = Union[Video, Image, Question, Answer, Continuation]


@dataclass
class NativeInputs:
    input_ids: torch.Tensor  # (1, T)
    positions: torch.Tensor  # (3, T) M-RoPE positions
    pixel_values_videos: Optional[torch.Tensor] = None  # (P_v, C*T*p*p)
    video_grid_thw: Optional[torch.Tensor] = None  # (n_video_runs, 3)
    second_per_grid_ts: list[float] = field(default_factory=list)
    pixel_values: Optional[torch.Tensor] = None  # (P_i, C*T*p*p)
    image_grid_thw: Optional[torch.Tensor] = None  # (n_images, 3)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


class _Fold:
    """Walks a transcript's events as the stream's calls walk them, collecting the grammar's pieces and, for each
    vision piece, its patches."""

    def __init__(self, model, processor):
        self.model, self.device = model, model.device
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.family = model.family
        self.vpix, self.ipix = self.family.video_pixels(processor), self.family.image_pixels(processor)
        self.grammar = Grammar(self.family, prompt_pieces(processor), self.tokenizer, model.config.vision_config)
        self.pieces: list[Piece] = []
        self.patches: list[tuple[str, torch.Tensor, float]] = []  # per vision piece: kind, patches, second_per_grid_t
        self.cursor, self.turn_open, self.first = 0, False, True
        self.video = None  # the open video: [block_start, pairs so far, size, spgt, fps, start_s, pending]
        self.seconds = 0.0  # stream time

    def add(self, pieces, patches=()) -> None:
        self.pieces += pieces
        self.patches += patches
        self.cursor = positions(pieces, self.cursor)[1]

    def ensure_turn(self) -> None:
        if not self.turn_open:
            self.add([self.grammar.turn(self.first)])
            self.first, self.turn_open = False, True

    def pairs(self, frames: torch.Tensor, times: list[float]) -> None:
        v = self.video
        patches, (k, h, w) = patchify(frames, self.vpix)
        segment = self.grammar.pairs((h, w), self.vpix.merge_size, pair_times(times, self.vpix.temporal_patch_size),
                                     v["start"], v["pairs"], v["spgt"])
        runs = [p for p in segment.pieces if isinstance(p, Vision)]
        per_run = patches.shape[0] // len(runs)
        self.add(list(segment.pieces), [("video", patches[i * per_run:(i + 1) * per_run], v["spgt"])
                                        for i in range(len(runs))])
        v["pairs"] += k

    def video_frames(self, e: Video) -> None:
        raw = to_frame_list(e.frames)
        self.ensure_turn()
        spgt = self.vpix.temporal_patch_size / float(e.fps)
        if self.video is None:
            self.add(list(self.grammar.open_video()))
            size = target_size(raw[0].shape[1], raw[0].shape[2], self.vpix)
            start_s = e.timestamps[0] if e.timestamps is not None else self.seconds
            self.video = {"start": self.cursor, "pairs": 0, "size": size, "spgt": spgt, "start_s": start_s,
                          "pending": None}
        v = self.video
        assert abs(v["spgt"] - spgt) < 1e-12, "fps changed inside one video"
        frames = resize_frames(raw, v["size"], device=self.device)
        if e.timestamps is None:
            first = 2 * v["pairs"] + (v["pending"] is not None)
            times = [v["start_s"] + (first + k) / float(e.fps) for k in range(len(raw))]
            self.seconds += len(raw) / float(e.fps)
        else:
            times = [float(t) for t in e.timestamps]
            self.seconds = max(self.seconds, times[-1] + 1 / float(e.fps))
        if v["pending"] is not None:
            frames, times = torch.cat([v["pending"][0][None], frames]), [v["pending"][1], *times]
        n_full = frames.shape[0] - frames.shape[0] % self.vpix.temporal_patch_size
        if n_full:
            self.pairs(frames[:n_full], times[:n_full])
        v["pending"] = (frames[n_full], times[n_full]) if n_full < frames.shape[0] else None

    def close_video(self) -> None:
        if self.video is not None:
            if self.video["pending"] is not None:
                frame, t = self.video["pending"]
                tp = self.vpix.temporal_patch_size
                self.pairs(pad_to_temporal_patch(frame[None], tp), [t] * tp)
            self.add(list(self.grammar.close_video()))
            self.video = None

    def image(self, e: Image) -> None:
        raw = to_frame_list(e.image)
        self.ensure_turn()
        self.close_video()
        size = target_size(raw[0].shape[1], raw[0].shape[2], self.ipix)
        frames = pad_to_temporal_patch(resize_frames(raw, size, device=self.device), self.ipix.temporal_patch_size)
        patches, (_, h, w) = patchify(frames, self.ipix)
        self.add(list(self.grammar.image((h, w), self.ipix.merge_size).pieces), [("image", patches, 0.0)])

    def event(self, e: Event) -> None:
        if isinstance(e, Video):
            self.video_frames(e)
        elif isinstance(e, Image):
            self.image(e)
        elif isinstance(e, Question):
            self.ensure_turn()
            self.close_video()
            self.add([self.grammar.question(encode_user_text(self.tokenizer, e.text))])
        elif isinstance(e, Answer):
            self.add([self.grammar.answer(list(e.ids))])
            self.turn_open = False
        elif isinstance(e, Continuation):
            self.add([Text(tuple(e.ids))])
        else:
            raise ValueError(f"unknown transcript event {e!r}")


def build_inputs(model, processor, events: Sequence[Event]) -> NativeInputs:
    """A transcript's events -> one tokenised transcript with every frame preprocessed at once, on the model's
    device, laid out by the model's family exactly as the stream lays out the same calls."""
    fold = _Fold(model, processor)
    for e in events:
        fold.event(e)  # a transcript may end inside a video: as in the stream, its held frame is not in it
    tok = fold.tokenizer
    image_id, video_id = token_ids(tok, ["<|image_pad|>", "<|video_pad|>"])
    ids, vids, vgrids, spgts, imgs, igrids = [], [], [], [], [], []
    patches = iter(fold.patches)
    for p in fold.pieces:
        if isinstance(p, Text):
            ids += p.ids
            continue
        kind, x, spgt = next(patches)
        ids += [video_id if p.kind == "video" else image_id] * p.n
        if p.kind == "video":
            vids.append(x)
            vgrids.append(p.grid)
            spgts.append(spgt)
        else:
            imgs.append(x)
            igrids.append(p.grid)
    device = model.device
    return NativeInputs(
        input_ids=torch.tensor([ids], dtype=torch.long, device=device), positions=positions(fold.pieces, 0)[0],
        pixel_values_videos=torch.cat(vids) if vids else None, video_grid_thw=_grids(vgrids, device),
        second_per_grid_ts=spgts, pixel_values=torch.cat(imgs) if imgs else None, image_grid_thw=_grids(igrids, device),
    )


def _grids(grids: list, device) -> Optional[torch.Tensor]:
    return torch.tensor(grids, dtype=torch.long, device=device) if grids else None


def question_events(question: str, video: Any = None, fps: float = 2.0,
                    timestamps: Optional[Sequence[float]] = None) -> list[Event]:
    """The standard single-turn transcript: (a video and) a question, up to the assistant header."""
    return ([Video(video, fps, timestamps)] if video is not None else []) + [Question(question)]


def _forward(model, inputs: NativeInputs, cache, logits_to_keep: int, attention_mask=None):
    kw = dict(input_ids=inputs.input_ids, position_ids=inputs.positions.to(model.device)[:, None],  # (3, 1, T)
              **compat.logits_kwargs(model, logits_to_keep))
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask  # (1, 1, T, T) additive: used as given
    if inputs.pixel_values_videos is not None:
        kw.update(pixel_values_videos=inputs.pixel_values_videos, video_grid_thw=inputs.video_grid_thw)
        if compat.accepts(model, "second_per_grid_ts"):  # Qwen2.5-VL only
            kw["second_per_grid_ts"] = torch.tensor(inputs.second_per_grid_ts, device=model.device)
    if inputs.pixel_values is not None:
        kw.update(pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw)
    kw.update(compat.cache_kwargs(model, cache, cache.get_seq_length(), inputs.num_tokens, model.device))
    logits = model(**kw).logits  # (1, T|kept, V)
    return (logits[:, -logits_to_keep:] if logits_to_keep else logits).float()


@torch.no_grad()
def native_logits(model, inputs: NativeInputs, all_tokens: bool = False, last: int = 1) -> torch.Tensor:
    """(1, T|last, V) float32 logits of a one-shot offline prefill: every token's, or the ``last`` ones'."""
    return _forward(model, inputs, compat.new_dynamic_cache(model.config), 0 if all_tokens else last)


def bounded_visibility(num_tokens: int, calls: Sequence[tuple[int, int, Sequence[tuple[int, int]]]]) -> torch.Tensor:
    """(T, T) bool: what each transcript token of a bounded stream attended to.

    ``calls``: per call that wrote tokens, (start, end, kept): its transcript tokens [start, end)
    and the (index, length) ranges the cache kept when the call began (``SlotLayout.kept_ranges``).
    Token i of a call sees token j <= i if j was kept when the call began or j is the call's own.
    Tokens in no call see every earlier token (plain causal).
    """
    visible = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
    for start, end, kept in calls:
        row = torch.zeros(num_tokens, dtype=torch.bool)
        for s, n in kept:
            row[s:s + n] = True
        row[start:] = True
        visible[start:end] &= row[None, :]
    return visible


@torch.no_grad()
def masked_logits(model, inputs: NativeInputs, visible: torch.Tensor, all_tokens: bool = False) -> torch.Tensor:
    """(1, T|1, V) float32 logits of one offline prefill in which token i attends to j iff ``visible[i, j]``.

    The exact reference of a bounded stream (with ``bounded_visibility``): the same transcript and
    positions as ``native_logits``, only the attention mask restricted.
    """
    dtype = model.dtype
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    return _forward(model, inputs, compat.new_dynamic_cache(model.config), 0 if all_tokens else 1,
                    attention_mask=mask[None, None].to(model.device))


@dataclass
class NativeAnswer:
    token_ids: list[int]
    ttft_s: float  # prefill (vision encoder included) -> first token
    total_s: float
    first_logits: torch.Tensor  # (V,)
    cache_bytes: int = 0


@torch.no_grad()
def native_generate(model, inputs: NativeInputs, max_new_tokens: int, stop_ids: set[int]) -> NativeAnswer:
    """Greedy prefill + decode with transformers' forward and DynamicCache, positions from us."""
    sync()
    t0 = time.perf_counter()
    cache = compat.new_dynamic_cache(model.config)
    logits = _forward(model, inputs, cache, 1)[:, -1]
    first = logits[0].clone()
    next_pos = int(inputs.positions.max()) + 1
    tokens, ttft = [], None
    while True:
        tok = int(logits.argmax(-1))
        if ttft is None:
            sync()
            ttft = time.perf_counter() - t0
        if tok in stop_ids:
            break
        tokens.append(tok)
        if len(tokens) >= max_new_tokens:
            break
        step = NativeInputs(input_ids=torch.tensor([[tok]], device=model.device),
                            positions=torch.full((3, 1), next_pos, dtype=torch.long))
        logits = _forward(model, step, cache, 1)[:, -1]
        next_pos += 1
    sync()
    return NativeAnswer(tokens, ttft, time.perf_counter() - t0, first, compat.dynamic_cache_bytes(cache))

