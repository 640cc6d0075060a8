"""JSON mode's logits processor over SmolLM2's real vocabulary: whatever candidates the head
offers (random rows of N*K finite logits, as a random model gives), sampled or greedy, the
chosen text is valid JSON by the end of the token budget."""
from __future__ import annotations

import json

import pytest
import torch

from tpi.generation.json_constraint import JsonConstraint, vocab_index
from tpi.model.sampling import SamplingParams, choose_token
from tpi.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def vocab(smollm2_dir):
    return vocab_index(ChatTokenizer(smollm2_dir), 49152)


def run(vocab, budget: int, params: SamplingParams, seed: int, candidates: int = 256) -> tuple[str, bool]:
    """Decode `budget` tokens through the processor; each step's row is `candidates` random
    tokens with random logits, -inf elsewhere."""
    g = torch.Generator().manual_seed(seed)
    c = JsonConstraint(vocab)
    for step in range(budget):
        logits = torch.full((49152,), float("-inf"))                    # (vocab,)
        ids = torch.randint(0, 49152, (candidates,), generator=g)
        logits[ids] = torch.randn(candidates, generator=g) * 3
        token = choose_token(c.mask(logits, budget - step), params, g)
        c.advance(token)
        if c.done:
            return c.text, True
    return c.text, False


@pytest.mark.parametrize("budget", [2, 5, 40])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_candidates_always_give_json(vocab, budget, temperature):
    for seed in range(6):
        text, done = run(vocab, budget, SamplingParams(temperature=temperature, top_p=0.95), seed)
        assert done, f"not closed within {budget} tokens: {text!r}"
        assert isinstance(json.loads(text), dict)


def test_valid_candidates_are_followed(smollm2_dir, vocab):
    """When the model offers a valid continuation it is taken: favour the tokens of a known
    object and greedy decoding writes exactly it."""
    tok = ChatTokenizer(smollm2_dir)
    target = '{"city": "Paris", "days": [1, 2]}'
    ids = tok.encode(target, add_special_tokens=False)
    c = JsonConstraint(vocab)
    for i in ids:
        logits = torch.full((49152,), float("-inf"))
        logits[torch.randint(0, 49152, (200,))] = 1.0
        logits[i] = 4.0
        token = choose_token(c.mask(logits, 100), SamplingParams(), None)
        assert token == i
        c.advance(token)
    assert c.done and c.text == target
