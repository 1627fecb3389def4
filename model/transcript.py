"""The transcript grammar: what a stream and its offline reference feed, as pure functions.

A stream's history is a sequence of calls (video frames, images, questions, answers); the
``Grammar`` of a family and chat template turns each into *pieces* (a run of text ids, or a
run of vision tokens) laid out as Qwen's own processors lay them out, and ``positions`` gives
every piece its M-RoPE positions. The stream feeds these pieces chunk by chunk
(``stream.py``); the offline reference (``offline.py``) concatenates the same pieces of a whole
transcript into one ``input_ids`` with placeholder tokens for transformers' one-shot forward.
Both use the functions here, so "streamed == offline" compares one layout computed two ways
(incrementally into a cache, or at once), and the layout itself is checked against the
processors' (``tests/test_family_reference.py``).

Layouts (``Family.pair_blocks``):
- Qwen2-VL, Qwen2.5-VL: ``<|vision_start|>`` + the tokens of every frame pair + ``<|vision_end|>``;
  a block stays open across chunks and its tokens take positions from the block's start, the
  temporal grid index g continuing from chunk to chunk (``Vision.start``, ``t_offset``);
- Qwen3-VL: per frame pair ``<t seconds><|vision_start|>`` + its tokens + ``<|vision_end|>``.
An image is ``<|vision_start|>`` + its tokens + ``<|vision_end|>`` in every family. The text after
any vision tokens starts at the largest position so far + 1 (``model/positions.py``).

Eviction works on *units*: a frame pair's tokens (Qwen2/2.5) or a pair with its timestamp and
markers (Qwen3); ``Segment.units`` gives their sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .positions import next_start, text_positions, vision_positions
from .prompt import QUESTION_MARK, VISION_END, VISION_START, PromptPieces, encode


@dataclass(frozen=True)
class Text:
    """A run of text token ids."""

    ids: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Vision:
    """A run of vision tokens: ``grid`` (t, h, w) in patches (the processor's ``grid_thw``), merged by ``merge``.

    Its tokens sit at ``start`` + (floor(g * f1 * f2), row, col) for temporal grid g = ``t_offset`` + i
    (``temporal`` = (f1, f2), ``Family.temporal``); ``start`` None: the run starts its own block at
    the position it comes to.
    """

    kind: str  # "video" or "image"
    grid: tuple[int, int, int]
    merge: int
    start: Optional[int] = None
    t_offset: int = 0
    temporal: tuple[float, float] = (0.0, 0.0)

    @property
    def n(self) -> int:
        t, h, w = self.grid
        return t * h * w // self.merge ** 2

    @property
    def per_grid(self) -> int:
        return self.n // self.grid[0]


Piece = Union[Text, Vision]


@dataclass(frozen=True)
class Segment:
    """Pieces fed in one forward. ``units``: token counts of the evictable units (frame pairs) that make up the
    whole segment, in order, each covering ``seconds`` of video; () when nothing in it is ever evicted."""

    pieces: tuple[Piece, ...]
    units: tuple[int, ...] = ()
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return sum(p.n for p in self.pieces)

    @property
    def text_only(self) -> bool:
        return all(isinstance(p, Text) for p in self.pieces)

    def ids(self) -> list[int]:
        """Its text ids (a text-only segment)."""
        assert self.text_only, self.pieces
        return [i for p in self.pieces for i in p.ids]


def positions(pieces: Sequence[Piece], cursor: int) -> tuple[torch.Tensor, int]:
    """(3, n) M-RoPE positions of ``pieces`` fed at position ``cursor`` -> (positions, the next free position)."""
    parts = []
    for p in pieces:
        if isinstance(p, Text):
            pos = text_positions(cursor, p.n)
        else:
            t, h, w = p.grid
            f1, f2 = p.temporal
            pos = vision_positions(p.start if p.start is not None else cursor, t, h // p.merge, w // p.merge,
                                   t_offset=p.t_offset, second_per_grid_t=f1, tokens_per_second=f2)
        parts.append(pos)
        if pos.shape[1]:
            cursor = max(cursor, next_start(pos))
    return (torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)), cursor


class Grammar:
    """The transcript layout of one family and chat template (``PromptPieces``); pure functions of what they get."""

    def __init__(self, family, prompt: PromptPieces, tokenizer, vision_config):
        self.family, self.tokenizer, self.vision_config = family, tokenizer, vision_config
        self.vision_start, self.vision_end = encode(tokenizer, VISION_START), encode(tokenizer, VISION_END)
        self.first_turn_header = encode(tokenizer, prompt.first_turn_header)
        self.turn_header = encode(tokenizer, prompt.turn_header)
        before, after = prompt.question_tail.split(QUESTION_MARK)
        self.question_before, self.question_after = encode(tokenizer, before), encode(tokenizer, after)
        self.answer_tail = encode(tokenizer, prompt.answer_tail)

    # -- turns --------------------------------------------------------------------------
    def turn(self, first: bool) -> Text:
        """A user turn's header (the first one carries the system prompt)."""
        return Text(tuple(self.first_turn_header if first else self.turn_header))

    def question(self, user_ids: Sequence[int]) -> Text:
        """The question (its literal ids: ``prompt.encode_user_text``), its turn's end and the assistant header."""
        return Text((*self.question_before, *user_ids, *self.question_after))

    def answer(self, ids: Sequence[int]) -> Text:
        """An answer kept as a turn: its tokens and the turn's end."""
        return Text((*ids, *self.answer_tail))

    # -- video ----------------------------------------------------------------------------
    def open_video(self) -> tuple[Piece, ...]:
        """What opens a video (its block's start marker, where the block stays open across chunks)."""
        return () if self.family.pair_blocks else (Text(tuple(self.vision_start)),)

    def close_video(self) -> tuple[Piece, ...]:
        """What closes a video (its block's end marker, where the block stays open across chunks)."""
        return () if self.family.pair_blocks else (Text(tuple(self.vision_end)),)

    def pairs(self, hw: tuple[int, int], merge: int, times: Sequence[float], block_start: int, t_offset: int,
              second_per_grid_t: float) -> Segment:
        """Frame pairs of one video, ``hw`` patches each, into one segment.

        ``times``: each pair's time in seconds (the mean of its frames'); ``block_start`` and
        ``t_offset``: the open block's first position and the temporal index of the first pair.
        """
        h, w = hw
        temporal = self.family.temporal(self.vision_config, second_per_grid_t)
        if not self.family.pair_blocks:
            run = Vision("video", (len(times), h, w), merge, block_start, t_offset, temporal)
            return Segment((run,), (run.per_grid,) * len(times), second_per_grid_t)
        pieces, units = [], []
        for t in times:
            stamp = encode(self.tokenizer, self.family.timestamp(t)) + self.vision_start
            unit = (Text(tuple(stamp)), Vision("video", (1, h, w), merge, None, 0, temporal),
                    Text(tuple(self.vision_end)))
            pieces += unit
            units.append(sum(p.n for p in unit))
        return Segment(tuple(pieces), tuple(units), second_per_grid_t)

    def image(self, hw: tuple[int, int], merge: int) -> Segment:
        """A still image as its own block (one temporal grid)."""
        temporal = self.family.temporal(self.vision_config, 0.0)
        return Segment((Text(tuple(self.vision_start)), Vision("image", (1, *hw), merge, None, 0, temporal),
                        Text(tuple(self.vision_end))))


def pair_times(frame_times: Sequence[float], temporal_patch_size: int) -> list[float]:
    """Frame times -> the time of each group of ``temporal_patch_size`` frames: the mean of its first and last
    (a short last group is padded with its last frame, as the processors pad)."""
    times = list(frame_times)
    if len(times) % temporal_patch_size:
        times += [times[-1]] * (temporal_patch_size - len(times) % temporal_patch_size)
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]
