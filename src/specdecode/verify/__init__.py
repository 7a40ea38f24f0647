"""Pure verification core: the greedy rule and speculative sampling. Imports no model code."""

from specdecode.verify.rules import Verdict, align_vocab, greedy_verify, speculative_sample

__all__ = ["Verdict", "align_vocab", "greedy_verify", "speculative_sample"]
