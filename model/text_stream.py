"""Text streaming: an answer's text as it is decoded, for ``ask_stream`` and transformers streamers.

``TextPieces`` turns token ids into text pieces whose concatenation equals the full decode
(incomplete UTF-8 characters held back); ``StreamerFeed`` feeds ``TextStreamer`` /
``TextIteratorStreamer`` objects the way ``generate(streamer=...)`` does.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .prompt import TOKENIZER_LOCK, decode


def special_token_ids(tokenizer) -> frozenset[int]:
    """The ids ``tokenizer.decode(..., skip_special_tokens=True)`` leaves out (all special added tokens)."""
    with TOKENIZER_LOCK:
        added = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
        return frozenset(added | set(tokenizer.all_special_ids))


class TextPieces:
    """Incremental detokenizer: ``push(token_id)`` -> the text new since the last call (maybe "").

    All pieces plus ``flush()`` join to ``tokenizer.decode(ids, skip_special_tokens=...)`` of all
    pushed ids. Each push decodes all ids so far (quadratic, but ~0.01 ms a push at 128 tokens and
    ~0.4 ms at 2000 with a fast tokenizer) and gives out only text later tokens cannot change: a
    trailing U+FFFD (an incomplete UTF-8 character split over byte-level tokens) and trailing
    whitespace (which clean_up_tokenization_spaces removes before "." and the like) are held back.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""  # given out so far

    def _decode(self) -> str:
        return decode(self.tokenizer, self.token_ids, self.skip_special_tokens)

    def _give_out(self, text: str) -> str:
        if not text.startswith(self.text):
            return ""  # text already given out changed; wait (flush checks)
        piece, self.text = text[len(self.text):], text
        return piece

    def push(self, token_id: int) -> str:
        self.token_ids.append(int(token_id))
        stable = self._decode().rstrip("\ufffd").rstrip()
        return self._give_out(stable) if len(stable) > len(self.text) else ""

    def flush(self) -> str:
        """The text held back; after it, the pieces join to the decoded text."""
        text = self._decode()
        if not text.startswith(self.text):
            raise RuntimeError(f"the tokenizer's text changed after it was given out ({self.text[-30:]!r} is no "
                               f"longer a prefix of {text[-60:]!r}); TextPieces cannot stream this tokenizer exactly")
        return self._give_out(text)


class StreamerFeed:
    """Drives a transformers streamer (``TextStreamer``, ``TextIteratorStreamer``, anything with
    ``put(value)`` and ``end()``) the way ``generate(streamer=...)`` does.

    What is put: first the prompt, as generate() does, when the feed is made (``prompt_ids``,
    by default an empty (1, 0) tensor: a streamer made with ``skip_prompt=True`` drops it, one
    without adds ""); then, per call, the token as a (1,) int64 CPU tensor, unless it is in
    ``skip_ids``. The stop token is never put (``Decoding`` does not yield it). With
    ``skip_ids=special_token_ids(tokenizer)`` the streamer's text equals ``Answer.text`` (decoded
    with skip_special_tokens=True) whatever its own decode options, e.g. for
    ``TextIteratorStreamer(tokenizer, skip_prompt=True)``. ``end()`` is called exactly once, by
    ``close()`` or on leaving the ``with`` block, also when decoding breaks early or raises::

        with StreamerFeed(streamer, skip_ids=special_token_ids(tokenizer)) as put:
            for token in decoding:
                put(token)
    """

    def __init__(self, streamer, prompt_ids: Optional[Iterable[int]] = None, skip_ids: Iterable[int] = ()):
        if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
            raise TypeError(f"streamer must have put(value) and end() methods, got {type(streamer).__name__}")
        self.streamer = streamer
        self.skip_ids = frozenset(int(i) for i in skip_ids)
        self.closed = False
        prompt = [] if prompt_ids is None else [int(i) for i in prompt_ids]
        # Under the tokenizer lock: a transformers streamer decodes with (usually) the shared tokenizer.
        with TOKENIZER_LOCK:
            streamer.put(torch.tensor([prompt], dtype=torch.long))  # (1, n), as generate() puts input_ids

    def __call__(self, token_id: int) -> None:
        if self.closed:
            raise RuntimeError("this StreamerFeed is closed (end() was called)")
        if int(token_id) not in self.skip_ids:
            with TOKENIZER_LOCK:
                self.streamer.put(torch.tensor([int(token_id)], dtype=torch.long))

    def close(self) -> None:
        """Call the streamer's end() (once; later calls do nothing)."""
        if not self.closed:
            self.closed = True
            with TOKENIZER_LOCK:
                self.streamer.end()

    def __enter__(self) -> "StreamerFeed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
