"""Counter-based Gumbel noise: sampling that is a pure function of (seed, position, token).

The Gumbel-max trick (Gumbel 1954; Maddison, Tarlow & Minka 2014, "A* Sampling"): if G(x) are
independent standard Gumbel variables, ``argmax_x log p(x) + G(x)`` is an exact sample from p.
Here G is not drawn from a stateful generator but computed by hashing the triple
(seed, t, x), where t is the position of the token in the output (0 = first new token) and x the
token id. The noise therefore does not depend on how many random numbers were drawn before, which
drafter ran or how long its drafts were: the token chosen at position t is a deterministic
function of the seed and the distribution p_t, and the same noise can be applied to a drafter's q_t
(coupling) so that its choice often equals the target's.

The hash is SplitMix64 (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number
generators"): ``mix64(state + n * GAMMA)`` is SplitMix64's n-th output, which passes BigCrush.
A stream key per (seed, t) is itself a SplitMix64 output; each token x then reads output x + 1 of
the stream that key starts. Everything is int64 torch arithmetic (which wraps modulo 2^64), so it
is vectorised over the vocabulary and runs on any device with int64 and float64 support.

This definition is part of the public contract: changing a constant changes every seeded output.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (odd, 2^64 / golden ratio)
MIX1 = 0xBF58476D1CE4E5B9  # SplitMix64's finaliser multipliers (Stafford's Mix13 variant)
MIX2 = 0x94D049BB133111EB
DOMAIN = 0x5EED5EED5EED5EED  # separates specdecode's streams from plain SplitMix64 on the seed
_BITS = 53  # random bits per uniform: a float64 significand
_HALF = 1 << (_BITS - 1)
_SPARSE_BELOW = 16  # hash only the candidates when fewer than V / 16 tokens survive
_CHUNK = 1 << 17  # (position, token) pairs hashed at once on the dense path


def _signed(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``value``."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic: it copies the sign)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (a bijection of 64-bit words)."""
    x = (x ^ _shr(x, 30)) * _signed(MIX1)
    x = (x ^ _shr(x, 27)) * _signed(MIX2)
    return x ^ _shr(x, 31)


def stream_keys(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """One 64-bit key (int64) per output position: (N,) positions -> (N,) keys."""
    if positions.numel() and int(positions.min()) < 0:
        raise ValueError("output positions must be >= 0 (0 is the first generated token)")
    base = mix64(torch.tensor(_signed(seed ^ DOMAIN), dtype=torch.int64))
    return mix64(base + (positions.to(torch.int64) + 1) * _signed(GAMMA))


def uniform_bits(seed: int, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """53 random bits per (position, token) pair, as int64 in [0, 2^53).

    ``positions`` and ``tokens`` are integer tensors of broadcastable shapes.
    """
    keys = stream_keys(seed, positions)
    words = mix64(keys + (tokens.to(torch.int64) + 1) * _signed(GAMMA))
    return _shr(words, 64 - _BITS)


def gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel variables (float64) from 53-bit integers ``m``.

    The uniform is u = (m + 1/2) / 2^53, strictly inside (0, 1). Both halves are computed
    without rounding: u itself below 1/2 and v = 1 - u above, with E = -log(u) = -log1p(-v), so
    the exponential E is accurate in both tails. G = -log(E).
    """
    scale = 2.0**-_BITS
    m = bits.to(torch.float64)
    low = (m + 0.5) * scale  # exact when m < 2^52
    high = ((1 << _BITS) - m - 0.5) * scale  # 1 - u, exact when m >= 2^52
    exponential = torch.where(bits < _HALF, -torch.log(low), -torch.log1p(-high))
    return -torch.log(exponential)


def gumbel_noise(seed: int, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """G(seed, t, x), float64, for broadcastable integer tensors of positions t and tokens x."""
    return gumbel_from_bits(uniform_bits(seed, positions, tokens))


def gumbel_argmax(scores: torch.Tensor, seed: int, positions: torch.Tensor) -> torch.Tensor:
    """The seeded sample of each row: argmax over x of scores(x) + G(seed, t, x).

    Args:
        scores: (N, V) processed scores (log-probabilities up to a constant per row; removed
            tokens are -inf and are never chosen).
        seed: the generation's seed (any Python int; taken modulo 2^64).
        positions: (N,) the output position t of the token each row chooses.

    Returns:
        (N,) token ids (int64) on ``scores``' device. Row i is an exact sample from
        softmax(scores[i]), and rows with different positions use independent noise.
    """
    device = scores.device
    work = torch.device("cpu") if device.type == "mps" else device  # MPS has no float64
    scores = scores.to(work)
    positions = positions.to(work)[:, None]  # (N, 1)
    finite = torch.isfinite(scores).sum(dim=-1)  # (N,)
    if int(finite.min()) == 0:
        raise ValueError("a row of scores has no finite entry: there is no token to sample")
    allowed = int(finite.max())
    if allowed * _SPARSE_BELOW < scores.shape[-1]:
        # Few tokens survive (top-k, top-p, min-p): noise only for each row's finite candidates.
        # The top `allowed` scores of a row hold all its finite ones; the rest stay -inf.
        values, tokens = scores.topk(allowed, dim=-1)  # (N, allowed)
        perturbed = values.double() + gumbel_noise(seed, positions, tokens)
        return tokens.gather(1, perturbed.argmax(dim=-1, keepdim=True))[:, 0].to(device)
    # Most tokens survive: hash the whole vocabulary, a few rows at a time (they stay in cache).
    tokens = torch.arange(scores.shape[-1], device=work)[None, :]  # (1, V)
    step = max(1, _CHUNK // scores.shape[-1])
    chosen = []
    for i in range(0, scores.shape[0], step):
        rows = scores[i : i + step].double()  # (n, V); -inf scores stay -inf
        chosen.append((rows + gumbel_noise(seed, positions[i : i + step], tokens)).argmax(dim=-1))
    return torch.cat(chosen).to(device)
