"""Token streaming: Decoding yields what decode() returns, TextPieces joins to decode(), streamers get the answer."""
from __future__ import annotations

import random
from contextlib import nullcontext
import threading
import time

import pytest
import torch
from transformers import TextIteratorStreamer, TextStreamer

from model.decoding import Decoding, decode, make_sampler
from model.text_stream import StreamerFeed, TextPieces, special_token_ids
from model.testing import load_processor, write_processor_files


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_processor(write_processor_files(tmp_path_factory.mktemp("tok"))).tokenizer


def pieces(tokenizer, ids, **kw) -> list[str]:
    tp = TextPieces(tokenizer, **kw)
    return [tp.push(i) for i in ids] + [tp.flush()]


TEXTS = ["hello world", "é", "café au lait", "漢字", "漢字 and 字", "😀 ok 👍🏽", "line one\nline two\n\n", "a  b\t ", " ", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_decode(tok, text):
    ids = tok.encode(text)
    got = pieces(tok, ids)
    assert "".join(got) == tok.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in p for p in got)  # incomplete characters are held back, never given out


def test_pieces_stream_before_the_end(tok):
    ids = tok.encode("漢字 hello world")
    got = pieces(tok, ids)
    assert got[:7] == ["", "", "漢", "", "", "字", ""]  # 3 byte tokens per character; the space waits
    assert got[7:10] == [" h", "e", "l"]
    assert got[-1] == ""  # nothing held back at the end
    trailing = pieces(tok, tok.encode("ok \n"))
    assert trailing == ["o", "k", "", "", " \n"]  # trailing whitespace waits for more text or flush()


def test_special_tokens(tok):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("hi") + [end] + tok.encode(" thére") + [tok.convert_tokens_to_ids("<|vision_start|>")]
    assert "".join(pieces(tok, ids)) == tok.decode(ids, skip_special_tokens=True) == "hi thére"
    assert "".join(pieces(tok, ids, skip_special_tokens=False)) == tok.decode(ids) == "hi<|im_end|> thére<|vision_start|>"


def test_random_bytes_and_specials_including_invalid_utf8(tok):
    rng = random.Random(0)
    specials = sorted(special_token_ids(tok))
    for _ in range(40):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(256) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            assert "".join(pieces(tok, ids, skip_special_tokens=skip)) == tok.decode(ids, skip_special_tokens=skip)


class CleanupTokenizer:
    """Decodes like a tokenizer with clean_up_tokenization_spaces: " ." becomes "." once the "." arrives."""

    def __init__(self, words):
        self.words = words

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.words[i] for i in ids).replace(" .", ".").replace(" ,", ",")


def test_text_that_later_tokens_change():
    t = CleanupTokenizer(["hello", ",", "world", "."])
    ids = [0, 1, 2, 3, 0]
    got = pieces(t, ids)
    assert "".join(got) == t.decode(ids) == "hello, world. hello"
    assert got == ["hello", ",", " world", ".", " hello", ""]


def test_special_token_ids_are_what_decode_skips(tok):
    ids = special_token_ids(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids and tok.convert_tokens_to_ids("<|video_pad|>") in ids
    assert all(tok.decode([65, i, 66], skip_special_tokens=True) == "bc" for i in ids)
    assert tok.decode([65, 200, 66], skip_special_tokens=True) != "bc"


# ---------------------------------------------------------------- Decoding


def reference_decode(first_logits, feed, sampler, stop_ids, max_new_tokens, sync, t0):
    """The decode loop as it was before Decoding existed (the semantics decode() keeps)."""
    tokens, fed, logits, ttft = [], 0, first_logits, None
    while True:
        generated = torch.tensor([tokens], dtype=torch.long) if sampler.processors else None
        tok = sampler(generated, logits)
        if ttft is None:
            sync()
            ttft = time.perf_counter() - t0
        if tok in stop_ids:
            return tokens, fed, ttft, "stop"
        tokens.append(tok)
        if len(tokens) >= max_new_tokens:
            return tokens, fed, ttft, "length"
        logits = feed(tok)
        fed += 1


class FakeModel:
    """Logits from a random table indexed by the last fed token; records what was fed."""

    def __init__(self, vocab=40, seed=0):
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 2
        self.first = torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed + 1))
        self.fed: list[int] = []

    def feed(self, token):
        self.fed.append(token)
        return self.table[token][None]


SETTINGS = [dict(), dict(do_sample=True, seed=1), dict(do_sample=True, seed=2, top_k=5, repetition_penalty=1.3),
            dict(repetition_penalty=2.0)]


@pytest.mark.parametrize("options", SETTINGS)
@pytest.mark.parametrize("max_new_tokens", [1, 2, 7, 60])
@pytest.mark.parametrize("stop", [set(), {3, 11}])
def test_decoding_yields_what_decode_returns(options, max_new_tokens, stop):
    runs = []
    for loop in (reference_decode, decode, None):
        m = FakeModel(seed=max_new_tokens)
        args = (m.first, m.feed, make_sampler("cpu", **options), stop, max_new_tokens, lambda: None, time.perf_counter())
        if loop is None:
            d = Decoding(*args)
            yielded = []
            for t in d:
                assert len(m.fed) == len(yielded)  # yielded as soon as sampled, before it is fed
                yielded.append(t)
            assert yielded == d.tokens and d.ttft_s >= 0
            runs.append((d.tokens, d.fed, d.finish_reason, m.fed))
        else:
            tokens, fed, ttft, reason = loop(*args)
            runs.append((tokens, fed, reason, m.fed))
    assert runs[0] == runs[1] == runs[2]
    tokens, fed, reason, fed_ids = runs[0]
    assert fed_ids == tokens[:fed] and fed == len(tokens) - (reason == "length")
    assert reason == ("length" if len(tokens) == max_new_tokens else "stop")


def test_breaking_out_early_feeds_nothing_more():
    m = FakeModel()
    d = Decoding(m.first, m.feed, make_sampler("cpu"), set(), 50, lambda: None, 0.0)
    got = []
    for t in d:
        got.append(t)
        if len(got) == 3:
            break
    assert m.fed == got[:2] and d.fed == 2 and d.finish_reason is None
    assert d.tokens == got


def test_max_new_tokens_is_checked():
    m = FakeModel()
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
            Decoding(m.first, m.feed, make_sampler("cpu"), set(), bad, lambda: None, 0.0)


# ---------------------------------------------------------------- transformers streamers

ANSWER = "héllo 漢字 😀\nok, done. "


def scripted(tok, text, stop_after=True, fail_at=None):
    """A Decoding that produces exactly the ids of ``text`` (then the stop token); feed raises at step ``fail_at``."""
    ids = tok.encode(text)
    ids.insert(3, tok.convert_tokens_to_ids("<|vision_start|>"))  # a special token inside the answer
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    seq = ids + [stop] if stop_after else ids
    vocab = len(tok)

    def onehot(i):
        logits = torch.zeros(1, vocab)
        logits[0, seq[i]] = 1.0
        return logits

    step = iter(range(1, len(seq)))

    def feed(_token):
        i = next(step)
        if i == fail_at:
            raise RuntimeError("out of memory (fake)")
        return onehot(i)

    return ids, Decoding(onehot(0), feed, make_sampler("cpu"), {stop}, 1000, lambda: None, 0.0)


class Counting(TextIteratorStreamer):
    def __init__(self, *a, **kw):
        super().__init__(*a, timeout=10, **kw)
        self.ends = 0

    def end(self):
        self.ends += 1
        super().end()


def consume(streamer):
    """Iterate a TextIteratorStreamer in another thread, as an application would -> a callable giving the text."""
    out: list[str] = []
    th = threading.Thread(target=lambda: out.extend(streamer))
    th.start()

    def text():
        th.join(10)
        assert not th.is_alive(), "the streamer never ended"
        return "".join(out)
    return text


def test_text_iterator_streamer_gets_the_answer_text(tok):
    ids, decoding = scripted(tok, ANSWER)
    streamer = Counting(tok, skip_prompt=True)
    text = consume(streamer)
    with StreamerFeed(streamer, prompt_ids=tok.encode("What happened?"), skip_ids=special_token_ids(tok)) as put:
        for t in decoding:
            put(t)
    assert decoding.tokens == ids and decoding.finish_reason == "stop"
    assert text() == tok.decode(ids, skip_special_tokens=True) == ANSWER
    assert streamer.ends == 1


@pytest.mark.parametrize("prompt", ["Q? ", None])
def test_without_skip_prompt_the_prompt_comes_first(tok, prompt):
    ids, decoding = scripted(tok, "fine")
    streamer = Counting(tok)
    text = consume(streamer)
    prompt_ids = None if prompt is None else tok.encode(prompt)
    with StreamerFeed(streamer, prompt_ids=prompt_ids, skip_ids=special_token_ids(tok)) as put:
        for t in decoding:
            put(t)
    assert text() == (prompt or "") + "fine" and streamer.ends == 1


def test_text_streamer_prints_the_answer(tok, capsys):
    ids, decoding = scripted(tok, ANSWER)
    with StreamerFeed(TextStreamer(tok, skip_prompt=True), skip_ids=special_token_ids(tok)) as put:
        for t in decoding:
            put(t)
    assert capsys.readouterr().out == ANSWER + "\n"  # TextStreamer ends with a newline


@pytest.mark.parametrize("how", ["raise", "break"])
def test_end_is_called_once_when_decoding_stops_early(tok, how):
    ids, decoding = scripted(tok, ANSWER, fail_at=6 if how == "raise" else None)
    streamer = Counting(tok, skip_prompt=True)
    text = consume(streamer)
    with pytest.raises(RuntimeError, match="fake") if how == "raise" else nullcontext():
        with StreamerFeed(streamer, skip_ids=special_token_ids(tok)) as put:
            for t in decoding:
                put(t)
                if how == "break" and len(decoding.tokens) == 6:
                    break
    assert len(decoding.tokens) == 6
    assert text() == tok.decode(decoding.tokens, skip_special_tokens=True) == "héll"  # h é(2) <special> l l
    assert streamer.ends == 1
    put.close()
    assert streamer.ends == 1
    with pytest.raises(RuntimeError, match="closed"):
        put(65)


def test_streamer_feed_needs_put_and_end():
    with pytest.raises(TypeError, match="put\\(value\\) and end\\(\\)"):
        StreamerFeed(object())
