"""Prompt scaffolding: the text pieces of the streamed transcript, cut from the chat template.

Native Qwen2.5-VL sees ``<sys+user header><|vision_start|><|video_pad|>*N<|vision_end|>Q<|im_end|>
\\n<|im_start|>assistant\\n``. Streaming keeps that layout: the part before the vision block is
encoded once, frames go into the open block, and a question appends ``<|vision_end|>`` plus
the part after the block. Those parts come from the processor's own chat template, so a
checkpoint with a custom system prompt streams exactly what it would see offline.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
QUESTION_MARK = "\x00QUESTION\x00"
_ANSWER = "\x00ANSWER\x00"


def extract_vision_segment(prompt: str) -> tuple[str, str, str]:
    """Split a chat-template rendering into (before, vision, after).

    - normal: ``vision`` runs from the first ``<|vision_start|>`` to the last ``<|vision_end|>``
      (so several vision segments stay together in ``vision``; ``after`` is the text that
      follows the last one);
    - no vision tokens (fallback): the split is made at the start of the last user turn's
      content, with ``vision`` empty; without a user turn, everything is ``after``;
    - empty prompt: three empty strings.
    Raises ValueError for unbalanced vision markers.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    n_start, n_end = prompt.count(VISION_START), prompt.count(VISION_END)
    if n_start != n_end:
        raise ValueError(f"prompt has {n_start} {VISION_START} but {n_end} {VISION_END}")
    if n_start == 0:
        header = f"{IM_START}user\n"
        cut = prompt.rfind(header)
        cut = 0 if cut < 0 else cut + len(header)
        return prompt[:cut], "", prompt[cut:]
    first, last = prompt.find(VISION_START), prompt.rfind(VISION_END) + len(VISION_END)
    if prompt.find(VISION_END) < first:
        raise ValueError(f"{VISION_END} appears before the first {VISION_START}")
    return prompt[:first], prompt[first:last], prompt[last:]


@dataclass(frozen=True)
class PromptPieces:
    """The text pieces the engine feeds, in the order a native transcript has them."""

    first_turn_header: str  # system prompt + "<|im_start|>user\n" (before the first vision block)
    turn_header: str  # "<|im_start|>user\n" for later turns
    question_tail: str  # "{question}<|im_end|>\n<|im_start|>assistant\n", with QUESTION_MARK for the question
    answer_tail: str  # closes a committed answer: "<|im_end|>\n"

    def question(self, text: str) -> str:
        """The question tail as text (only for trusted text: special-token strings in it become special ids)."""
        return self.question_tail.replace(QUESTION_MARK, text)

    def question_ids(self, tokenizer, user_ids: list[int]) -> list[int]:
        """The question tail as ids around the question's own ``user_ids`` (literal text: ``encode_user_text``)."""
        before, after = self.question_tail.split(QUESTION_MARK)
        return encode(tokenizer, before) + list(user_ids) + encode(tokenizer, after)


class _TokenizerLock:
    """The lock around every call the library makes on a tokenizer.

    A fast tokenizer is one Rust object behind a borrow flag: ``encode(split_special_tokens=...)``
    flips a setting on it (a mutable borrow), so any other call on it from another thread at that
    moment fails with "RuntimeError: Already borrowed" (transformers 4.57). Engines on one
    processor share its tokenizer, so the library's tokenizer calls take this one lock (each
    holds it for microseconds). Those calls never nest, so a hold this thread still has on entry
    was leaked by a call interrupted between two of its lines (``KeyboardInterrupt``): it is
    released first, as the engines' own locks do (``transaction.Transactional._acquire``).
    """

    def __init__(self):
        self._lock = threading.RLock()

    def __enter__(self) -> None:
        while self._lock._is_owned():
            self._lock.release()
        self._lock.acquire()

    def __exit__(self, *exc) -> None:
        if self._lock._is_owned():
            self._lock.release()


TOKENIZER_LOCK = _TokenizerLock()


def encode(tokenizer, text: str) -> list[int]:
    """Trusted template text -> ids (its special-token strings become special tokens)."""
    if not text:
        return []
    with TOKENIZER_LOCK:
        return tokenizer.encode(text, add_special_tokens=False)


def encode_user_text(tokenizer, text: str) -> list[int]:
    """Untrusted user text -> ids, with special-token strings kept as literal text.

    ``<|im_end|>`` or ``<|video_pad|>`` typed by a user is tokenised like any other characters,
    so a question cannot close its turn, forge an assistant turn or insert video placeholders.
    """
    if not text:
        return []
    with TOKENIZER_LOCK:
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def decode(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    """Token ids -> text (under the tokenizer lock, see ``TOKENIZER_LOCK``)."""
    with TOKENIZER_LOCK:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def token_ids(tokenizer, tokens: list[str]) -> list[int]:
    """Token strings -> ids (under the tokenizer lock)."""
    with TOKENIZER_LOCK:
        return tokenizer.convert_tokens_to_ids(tokens)


def render(processor, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Messages through the processor's chat template (the tokenizer's as fallback)."""
    owner = processor if getattr(processor, "chat_template", None) else getattr(processor, "tokenizer", processor)
    return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_pieces(processor) -> PromptPieces:
    """Cut the pieces out of the template rendering of a user turn holding a video and a question."""
    user = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION_MARK}]}]
    before, _vision, after = extract_vision_segment(render(processor, user))
    if QUESTION_MARK not in after:
        raise ValueError("the chat template does not place the question after the video")
    header_at = before.rfind(IM_START)
    turn_header = before[header_at:] if header_at >= 0 else before
    answered = render(processor, user + [{"role": "assistant", "content": [{"type": "text", "text": _ANSWER}]}],
                      add_generation_prompt=False)
    answer_tail = answered[answered.rfind(_ANSWER) + len(_ANSWER):]
    return PromptPieces(first_turn_header=before, turn_header=turn_header, question_tail=after,
                        answer_tail=answer_tail)
