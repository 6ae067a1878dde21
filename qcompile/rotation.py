"""Orthogonal rotations of activation channels, as data (pure numpy; `passes.rotate` applies them).

For a MatMul/Gemm y = x W with x [..., K], W [K, N] and any orthogonal R [K, K] (R R^T = I):

    x W = (x R) (R^T W)                                                        (exact)

x R has the same energy as x, spread over the channels: an outlier channel of x becomes K small
ones, so a per-tensor or per-block quantizer of x R wastes far less range (QuaRot, SpinQuant).

R here is block diagonal, K / b copies of one orthogonal b x b block B, optionally after a
diagonal of random signs D (`kind` "random": R = D (I (x) B), the randomized Hadamard of QuaRot;
D is drawn from `seed`, so a saved plan replays it exactly). B = H_b / sqrt(b) for a Hadamard
order b (`hadamard`):

    H_1 = [1],  H_2m = [[H_m, H_m], [H_m, -H_m]]             (Sylvester: b a power of two)
    H_{p 2^k} = P_p (x) H_{2^k}                               (P_p Paley's: p = q + 1, q a prime
                                                               = 3 mod 4, or p = 2 (q + 1), q = 1 mod 4)
so widths such as 384 = 12 x 32 or 768 = 12 x 64 get a Hadamard over the whole width. An order
with no such factorization (e.g. 150) gets B = C_m (x) H_{2^k} / sqrt(2^k), with C_m the
orthonormal DCT-II of the odd part m ("Hadamard x a small orthogonal factor": orthogonal, but
its rows are not flat, so it spreads an outlier less evenly); `block_for` prefers Hadamard orders.

Fast form ("factor" a > 1, b = a c): B = (B_a (x) B_c) P, with P the permutation that transposes a
block viewed as [a, c]. Then x_block B = vec((reshape(x_block, [a, c]) B_c)^T B_a): two MatMuls of
a and c multiply-adds per element and a Transpose (a radix-sqrt(b) fast Walsh-Hadamard transform),
against b per element as one MatMul by B. P is folded into the weights like the rest of R.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

KINDS = ("hadamard", "random")
DEFAULT_BLOCK = 128  # per-tensor formats: 128 measured best on MiniLM int8 (32: -1.1 dB)
FAST_BLOCK = 128  # blocks from this size up are emitted factored (`fast_factor`): measured faster in onnxruntime


@dataclass(frozen=True)
class Rotation:
    """x -> x R, R = D (I_{K/b} (x) B) over the last axis of width `width` (see the module doc);
    D = I for kind "hadamard", random signs drawn from `seed` for "random"; `factor` a > 1 makes
    B = (B_a (x) B_{b/a}) P, the fast form."""

    width: int
    block: int
    kind: str = "hadamard"
    seed: int = 0
    factor: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"rotation kind {self.kind!r} is not one of {KINDS}")
        if self.block < 1 or self.width % self.block:
            raise ValueError(f"rotation block {self.block} does not divide the width {self.width}")
        if self.factor and (self.factor < 2 or self.block % self.factor or self.factor == self.block):
            raise ValueError(f"rotation factor {self.factor} is not a proper factor of the block {self.block}")

    def signs(self) -> np.ndarray | None:
        """D's diagonal (float32 +-1), or None for kind "hadamard"."""
        if self.kind == "hadamard":
            return None
        return np.random.default_rng(self.seed).choice(np.array([-1.0, 1.0], np.float32), self.width)

    def factors(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(B_a, B_c) of the fast form, float64, or None."""
        if not self.factor:
            return None
        return orthogonal_block(self.factor), orthogonal_block(self.block // self.factor)

    def block_matrix(self) -> np.ndarray:
        """B, float64 (the fast form's permutation included)."""
        f = self.factors()
        if f is None:
            return orthogonal_block(self.block)
        a, c = self.factor, self.block // self.factor
        return np.kron(*f).reshape(self.block, a, c).transpose(0, 2, 1).reshape(self.block, self.block)

    def matrix(self) -> np.ndarray:
        """The whole R [K, K], float64 (for tests and small widths)."""
        r = np.kron(np.eye(self.width // self.block), self.block_matrix())
        d = self.signs()
        return r if d is None else d[:, None].astype(np.float64) * r

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x R over the last axis, in x's float type (float64 arithmetic)."""
        x64 = np.asarray(x, dtype=np.float64)
        d = self.signs()
        if d is not None:
            x64 = x64 * d
        g = x64.reshape(*x64.shape[:-1], self.width // self.block, self.block) @ self.block_matrix()
        return g.reshape(x64.shape).astype(np.asarray(x).dtype)

    def fold_rows(self, w: np.ndarray) -> np.ndarray:
        """R^T W for W [K, N] (rows indexed by the channel), float64 arithmetic, W's dtype."""
        w64 = np.asarray(w, dtype=np.float64)
        d = self.signs()
        if d is not None:  # R^T W = B^T (D W)
            w64 = d[:, None].astype(np.float64) * w64
        k, n = w64.shape
        g = np.einsum("ji,gjn->gin", self.block_matrix(), w64.reshape(k // self.block, self.block, n))
        return g.reshape(k, n).astype(np.asarray(w).dtype)

    @classmethod
    def fast(cls, width: int, block: int, kind: str = "hadamard", seed: int = 0) -> Rotation:
        """The rotation of that block in the form emitted fastest (`fast_factor`)."""
        return cls(width, block, kind, seed, fast_factor(block))

    def to_json(self) -> dict:
        d = {"width": self.width, "block": self.block, "kind": self.kind, "seed": self.seed}
        return {**d, "factor": self.factor} if self.factor else d

    @classmethod
    def from_json(cls, d: dict) -> Rotation:
        return cls(int(d["width"]), int(d["block"]), str(d.get("kind", "hadamard")), int(d.get("seed", 0)),
                   int(d.get("factor", 0)))


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q**0.5) + 1))


def _paley(p: int) -> np.ndarray | None:
    """A p x p Hadamard matrix by Paley's constructions over a prime field, or None."""
    q = p - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I: H = I + [[0, 1^T], [-1, Q]]
        kind = 1
    elif p % 2 == 0 and (p // 2 - 1) % 4 == 1 and _is_prime(p // 2 - 1):  # Paley II
        q, kind = p // 2 - 1, 2
    else:
        return None
    squares = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in squares else -1 for i in range(1, q)])
    jac = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]  # Jacobsthal: Q[i, j] = chi(j - i)
    if kind == 1:
        s = np.zeros((q + 1, q + 1), dtype=np.int64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
        return s + np.eye(q + 1, dtype=np.int64)
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jac
    return np.kron(c, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]])


@functools.lru_cache(maxsize=None)
def _hadamard_split(n: int) -> tuple[int, int] | None:
    """(p, 2^k) with n = p 2^k, k as large as possible, and a Hadamard matrix of order p known
    (p = 1: Sylvester's alone, or a Paley order), or None."""
    two = n & -n
    while two >= 1:
        p = n // two
        if p == 1 or (p % 4 == 0 and _paley(p) is not None):
            return p, two
        two //= 2
    return None


def is_hadamard_order(n: int) -> bool:
    return n >= 1 and _hadamard_split(n) is not None


@functools.lru_cache(maxsize=None)
def _hadamard(n: int) -> np.ndarray:
    split = _hadamard_split(n)
    if split is None:
        raise ValueError(f"no Hadamard matrix of order {n} is constructed here (a power of two times a Paley order)")
    p, two = split
    h = np.ones((1, 1))
    while h.shape[0] < two:
        h = np.block([[h, h], [h, -h]])
    h = np.kron(_paley(p), h) if p > 1 else h
    h.setflags(write=False)
    return h


def hadamard(n: int) -> np.ndarray:
    """An n x n Hadamard matrix (entries +-1, H H^T = n I): Sylvester's for a power of two, a Paley
    matrix (x) Sylvester's for n = p 2^k (module doc); ValueError for other orders."""
    return _hadamard(n).astype(np.float64)


def dct(m: int) -> np.ndarray:
    """The orthonormal m x m DCT-II matrix (rows: frequencies), float64."""
    k, i = np.arange(m)[:, None], np.arange(m)[None, :]
    c = np.cos(np.pi * (2 * i + 1) * k / (2 * m)) * np.sqrt(2.0 / m)
    c[0] /= np.sqrt(2.0)
    return c


@functools.lru_cache(maxsize=None)
def _orthogonal_block(n: int) -> np.ndarray:
    if is_hadamard_order(n):
        b = _hadamard(n) / np.sqrt(n)
    else:
        two = n & -n
        b = np.kron(dct(n // two), _hadamard(two) / np.sqrt(two))
    b.setflags(write=False)
    return b


def orthogonal_block(n: int) -> np.ndarray:
    """The rotation block of order n (module doc): H_n / sqrt(n) for a Hadamard order, else
    C_m (x) H_{2^k} / sqrt(2^k); float64, read-only."""
    return _orthogonal_block(n)


MIN_HADAMARD_BLOCK = 8  # below this a Hadamard block spreads too little: use Hadamard x DCT


def block_for(width: int, requested: int) -> int:
    """The rotation block for `width` channels: the largest Hadamard order dividing `width` and at
    most `requested`; if that is below MIN_HADAMARD_BLOCK, the largest divisor at most
    `requested` when that is not (a Hadamard x DCT block, module doc). 1: no rotation."""
    divisors = [b for b in range(1, min(width, requested) + 1) if width % b == 0]
    b = max(d for d in divisors if is_hadamard_order(d))
    if b < MIN_HADAMARD_BLOCK <= divisors[-1]:
        return divisors[-1]
    return b


def fast_factor(block: int) -> int:
    """The fast form's a for a block (0: emit one MatMul by B): from FAST_BLOCK up, the divisor a
    of the block nearest sqrt(block) from above whose two factors are Hadamard orders when the
    block is one (e.g. 128 -> 16 x 8, 384 -> 24 x 16, 512 -> 32 x 16)."""
    if block < FAST_BLOCK:
        return 0
    divs = [a for a in range(2, block) if block % a == 0 and a * a >= block]
    if is_hadamard_order(block):
        divs = [a for a in divs if is_hadamard_order(a) and is_hadamard_order(block // a)] or divs
    return min(divs) if divs else 0
