"""Generation on the master: one loop for the HTTP server's scheduler and `tpi generate`.

`Generator` (generator.py) prefills, decodes a batch of sequences in one cluster forward,
chooses tokens, applies the stop rules and the token budget; `Sequence` (sequence.py) is
the state it advances, and `Step` / `Advance` what one forward did. A sequence may carry a
logits processor: JSON mode (json_state.py, json_schema.py, json_constraint.py). Log probabilities from the
output head's candidates: logprobs.py."""
from tpi.generation.generator import ContextOverflowError, GenerationResult, Generator, TokenEvent
from tpi.generation.sequence import Advance, Sequence, Step

__all__ = ["Advance", "ContextOverflowError", "GenerationResult", "Generator", "Sequence", "Step", "TokenEvent"]
