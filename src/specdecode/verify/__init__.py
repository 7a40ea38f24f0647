"""Pure verification core: the greedy rule, speculative sampling and seeded matching. Imports no
model code."""

from specdecode.verify.rules import Verdict, align_vocab, greedy_verify, speculative_sample
from specdecode.verify.seeded import seeded_verify

__all__ = ["Verdict", "align_vocab", "greedy_verify", "seeded_verify", "speculative_sample"]
