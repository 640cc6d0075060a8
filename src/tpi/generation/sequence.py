"""What the generator advances: one sequence's state, and the record of one forward step."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tpi.model.sampling import SamplingParams
from tpi.timing import Breakdown


@dataclass(eq=False)
class Sequence:
    """One generation: its prompt, the tokens chosen so far and where its KV cache stands.

    Made by `Generator.sequence`, which applies the token budget and the stop rules."""

    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]        # a chosen token in here ends the sequence (and is not kept)
    budget: int                     # tokens it may produce: max_new_tokens, capped by the context
    rng: torch.Generator | None     # its own random stream (seeded requests repeat exactly)
    slot: int = 0                   # its row of every device's KV cache
    tokens: list[int] = field(default_factory=list)
    pos: int = 0                    # positions held in its cache slot (0: not prefilled yet)
    finish_reason: str | None = None  # "stop" | "length" | "error", set by the generator
    # masks the logits before each choice (.mask(logits, remaining) -> logits, .advance(token),
    # .done ends the sequence): JSON mode, tpi.generation.json_constraint.JsonConstraint
    processor: object | None = None
    score_prompt: int | None = None   # score the prompt's tokens, with this many alternatives each
    prompt_logprobs: list | None = None  # set by the first prefill when score_prompt (logprobs.py)
    speculative: bool = True        # let the generator's drafter propose for it (if it has one)
    drafted: int = 0                # draft tokens verified for it so far
    accepted: int = 0               # of which accepted

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Advance:
    """What one forward did to one sequence."""

    seq: Sequence
    tokens: list[int]               # the tokens it gained, in order (a stop token is not kept)
    logits: torch.Tensor            # (n, vocab) float32: the logits each chosen token came from
                                    # (n counts a stop token too); -inf outside the head's candidates
    finished: str | None = None     # "stop" | "length" | "error" when this step ended it
    error: str | None = None        # why, when finished == "error" (e.g. non-finite probabilities)
    drafted: int = 0                # draft tokens this step verified
    accepted: int = 0               # of which accepted (tokens gained: accepted + 1, before stop rules)


@dataclass
class Step:
    """One cluster forward: every row's advance, its wall time and each device's time split."""

    advances: list[Advance]
    wall_s: float
    prefill: bool
    breakdowns: list[Breakdown]
