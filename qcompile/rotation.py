"""Orthogonal rotations of activation channels, as data (pure numpy; `passes.rotate` applies them).

For a MatMul/Gemm y = x W with x [..., K], W [K, N] and any orthogonal R [K, K] (R R^T = I):

    x W = (x R) (R^T W)                                                        (exact)

x R has the same energy as x, spread over the channels: an outlier channel of x becomes K small
ones, so a per-tensor or per-block quantizer of x R wastes far less range (QuaRot, SpinQuant).

R here is block diagonal, K / b copies of the Walsh-Hadamard matrix H_b / sqrt(b) (b a power of
two dividing K), optionally after a diagonal of random signs D (`kind` "random": R = D H, the
randomized Hadamard of QuaRot; D is drawn from `seed`, so a saved plan replays it exactly):

    H_1 = [1],  H_2m = [[H_m, H_m], [H_m, -H_m]]   (Sylvester),   H_b H_b^T = b I

Computing x R costs K b multiply-adds per row as a MatMul by the b x b block (or b log2 b adds
as a fast Walsh-Hadamard transform), against K N for the layer itself. A block of b = the
quantizer's block (32 for MX, 16 for NVFP4) mixes channels only inside each quantization block.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("hadamard", "random")
DEFAULT_BLOCK = 128  # per-tensor formats: 128 measured best on MiniLM int8 (32: -1.1 dB); costs K * 128 MACs a row


@dataclass(frozen=True)
class Rotation:
    """x -> x R, R = D (I_{K/b} (x) H_b / sqrt(b)) over the last axis of width `width`; D = I for
    kind "hadamard", random signs drawn from `seed` for "random"."""

    width: int
    block: int
    kind: str = "hadamard"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"rotation kind {self.kind!r} is not one of {KINDS}")
        if not is_power_of_two(self.block) or self.width % self.block:
            raise ValueError(f"rotation block {self.block} is not a power of two dividing the width {self.width}")

    def signs(self) -> np.ndarray | None:
        """D's diagonal (float32 +-1), or None for kind "hadamard"."""
        if self.kind == "hadamard":
            return None
        return np.random.default_rng(self.seed).choice(np.array([-1.0, 1.0], np.float32), self.width)

    def block_matrix(self) -> np.ndarray:
        """H_b / sqrt(b), float64."""
        return hadamard(self.block) / np.sqrt(self.block)

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
        if d is not None:  # R^T W = H^T (D W)
            w64 = d[:, None].astype(np.float64) * w64
        k, n = w64.shape
        g = np.einsum("ji,gjn->gin", self.block_matrix(), w64.reshape(k // self.block, self.block, n))
        return g.reshape(k, n).astype(np.asarray(w).dtype)

    def to_json(self) -> dict:
        return {"width": self.width, "block": self.block, "kind": self.kind, "seed": self.seed}

    @classmethod
    def from_json(cls, d: dict) -> Rotation:
        return cls(int(d["width"]), int(d["block"]), str(d.get("kind", "hadamard")), int(d.get("seed", 0)))


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def hadamard(n: int) -> np.ndarray:
    """The n x n Sylvester-Hadamard matrix (entries +-1), n a power of two."""
    if not is_power_of_two(n):
        raise ValueError(f"Hadamard order {n} is not a power of two")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def block_for(width: int, requested: int) -> int:
    """The largest power of two that divides `width` and is at most `requested` (1: no rotation)."""
    b = width & -width  # the largest power of two dividing width
    while b > requested:
        b //= 2
    return max(b, 1)
