"""Incremental detokenization (UTF-8 boundaries, stop strings across tokens) and the n-gram lookup."""

from __future__ import annotations

import numpy as np
import pytest

from specserve.detokenizer import IncrementalDetokenizer
from specserve.drafters.ngram import NgramIndex, continuation_tree


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


def feed(tok, text: str, stop: list[str]) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    prompt = tok.encode("Hello")
    ids = list(prompt)
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True, stop=stop)
    seen, hit = [], None
    for t in tok.encode(text):
        ids.append(t)
        hit = detok.append(ids)
        seen.append(detok.visible_text(finished=hit is not None))
        if hit:
            break
    return detok, seen, hit


def test_multibyte_characters_are_never_split(tokenizer):
    text = " naïve café 🙂🚀 日本語"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split()), "the emoji should span several byte tokens"
    detok, seen, _ = feed(tokenizer, text, [])
    assert detok.text == text
    assert all("\ufffd" not in s for s in seen)
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:], strict=False))  # text only grows


def test_stop_string_spanning_tokens_is_cut_and_never_shown(tokenizer):
    text = " The answer is forty-two, really."
    detok, seen, hit = feed(tokenizer, text, ["forty-two"])
    assert hit == "forty-two"
    assert detok.text == " The answer is "
    assert all("forty" not in s for s in seen)  # the partial stop string was held back while streaming


def test_earliest_of_several_stop_strings_wins(tokenizer):
    detok, _, hit = feed(tokenizer, " alpha beta gamma", ["gamma", "beta"])
    assert hit == "beta" and detok.text == " alpha "


def ngram_lookup(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """A fresh index's lookup."""
    return NgramIndex(min_n, max_n).lookup(tokens, k)


def brute_force_lookup(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The definition: longest suffix first, its latest occurrence that ends before the last token."""
    total = len(tokens)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        starts = [i for i in range(total - n) if tokens[i : i + n] == tokens[total - n :]]
        if starts:
            return tokens[starts[-1] + n : starts[-1] + n + k]
    return []


def test_ngram_lookup_takes_the_latest_longest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3]
    # suffix [1 2 3] last occurred at 4 -> continue with [4 5 1 ...]
    assert ngram_lookup(tokens, 1, 3, 3) == [4, 5, 1]
    assert ngram_lookup(tokens, 1, 3, 10) == [4, 5, 1, 2, 3]  # stops at the end of the sequence
    assert ngram_lookup([7, 8, 9], 1, 3, 4) == []  # no earlier occurrence
    assert ngram_lookup([5, 6, 5], 2, 3, 4) == []  # only a 1-gram matches, below the minimum
    assert ngram_lookup([5, 6, 5], 1, 3, 4) == [6, 5]


def test_incremental_index_equals_brute_force():
    rng = np.random.default_rng(0)
    for min_n, max_n in ((1, 3), (2, 4), (3, 3)):
        tokens = rng.integers(0, 6, size=5).tolist()
        index = NgramIndex(min_n, max_n)
        while len(tokens) < 300:  # grow by 1-5 tokens a step, as accepted drafts do
            assert index.lookup(tokens, 4) == brute_force_lookup(tokens, min_n, max_n, 4), len(tokens)
            tokens += rng.integers(0, 6, size=int(rng.integers(1, 6))).tolist()


def brute_force_matches(tokens: list[int], min_n: int, max_n: int, limit: int) -> tuple[int, list[int]]:
    """The longest suffix that occurred before, and its latest `limit` earlier starts, latest first."""
    total = len(tokens)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        starts = [i for i in range(total - n) if tokens[i : i + n] == tokens[total - n :]]
        if starts:
            return n, starts[::-1][:limit]
    return 0, []


def test_incremental_matches_equal_brute_force():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 5, size=4).tolist()
    index = NgramIndex(1, 3, max_matches=3)
    while len(tokens) < 200:
        assert index.matches(tokens) == brute_force_matches(tokens, 1, 3, 3), len(tokens)
        tokens += rng.integers(0, 5, size=int(rng.integers(1, 4))).tolist()


def test_continuation_tree_keeps_the_nodes_most_continuations_share():
    # after suffix [9] (n = 1): starts 8, 4, 0 (latest first) continue with [1 2 5], [1 2 4], [1 3 7]
    tokens = [9, 1, 3, 7, 9, 1, 2, 4, 9, 1, 2, 5, 9]
    n, starts = NgramIndex(1, 1, max_matches=3).matches(tokens)
    assert (n, starts) == (1, [8, 4, 0])
    tree = continuation_tree(tokens, n, starts, 4)
    # counts: 1 x3, 2 x2, then depth 2 before depth 3: 3 (from start 0), then 5 (the latest start's) over 4
    assert tree.tokens == [1, 2, 3, 5]
    assert tree.parents == [0, 1, 1, 2]
    assert continuation_tree(tokens, n, starts, 2).is_chain
    chain = continuation_tree(tokens, n, starts[:1], 8)  # one start: the plain lookup's chain
    assert chain.is_chain and chain.tokens == NgramIndex(1, 1).lookup(tokens, 8) == [1, 2, 5, 9]
