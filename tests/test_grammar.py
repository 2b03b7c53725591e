"""Constrained decoding of image codes: exactly L codes after <boi>, then <eoi>; codes nowhere else."""

import pytest
import torch

from mmgen.generation import GenerationOptions, sample_token
from mmgen.grammar import OUTSIDE, ImageGrammar

V, K, L, BOI, EOI = 20, 7, 5, 4, 5


def parse(stream: list[int]) -> None:
    """Raise AssertionError unless `stream` obeys the image grammar."""
    i = 0
    while i < len(stream):
        tok = stream[i]
        assert tok < V, f"code {tok} outside an image at {i}"
        assert tok != EOI, f"<eoi> outside an image at {i}"
        if tok == BOI:
            image = stream[i + 1 : i + 1 + L]
            assert all(t >= V for t in image), f"text inside an image at {i}: {image}"
            if len(image) == L and i + 1 + L < len(stream):
                assert stream[i + 1 + L] == EOI, f"no <eoi> after {L} codes at {i}"
                i += L + 1
            else:
                return  # stream ended inside the image
        i += 1


@pytest.mark.parametrize("seed", range(5))
def test_random_logits_never_produce_an_illegal_token(seed):
    g = torch.Generator().manual_seed(seed)
    grammar = ImageGrammar(V, K, L, BOI, EOI)
    b, steps = 16, 300
    state = torch.full((b,), OUTSIDE)
    streams = [[] for _ in range(b)]
    opts = GenerationOptions(temperature=1.0)
    gens = [torch.Generator().manual_seed(seed * 100 + i) for i in range(b)]
    for _ in range(steps):
        logits = torch.randn(b, V + K, generator=g) * 4
        logits[:, BOI] += 2  # enter images often
        tok = sample_token(grammar.constrain(logits, state), opts, gens)
        state = grammar.advance(state, tok)
        for row, t in zip(streams, tok.tolist()):
            row.append(t)
    for row in streams:
        parse(row)
    assert sum(row.count(BOI) for row in streams) > b  # images were actually drawn


def test_states_and_illegal_tokens():
    grammar = ImageGrammar(V, K, L, BOI, EOI)
    allowed = grammar.allowed(torch.tensor([OUTSIDE, 0, L - 1, L]))
    assert allowed[0, :V].sum() == V - 1 and not allowed[0, EOI] and not allowed[0, V:].any()
    assert allowed[1, V:].all() and not allowed[1, :V].any()
    assert allowed[2, V:].all() and not allowed[2, :V].any()
    assert allowed[3].nonzero().flatten().tolist() == [EOI]
    state = grammar.advance(torch.tensor([OUTSIDE, 0, L - 1, L]), torch.tensor([BOI, V, V + K - 1, EOI]))
    assert state.tolist() == [0, 1, L, OUTSIDE]
    with pytest.raises(ValueError, match="illegal token"):
        grammar.advance(torch.tensor([0]), torch.tensor([3]))  # text inside an image
    with pytest.raises(ValueError, match="illegal token"):
        grammar.advance(torch.tensor([OUTSIDE]), torch.tensor([V]))  # a code outside
    with pytest.raises(ValueError, match="illegal token"):
        grammar.advance(torch.tensor([L]), torch.tensor([V]))  # a code where <eoi> must come
