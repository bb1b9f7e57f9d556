"""Hadamard rotations for int8 (static W8A8 and weight-only): the matrices, and the online rotation a graph runs.

An orthogonal Q applied to an activation (x -> xQ) and undone in the weights that read it
(W -> WQ) leaves the function unchanged, but spreads a channel's outlier over every channel, so
one int8 scale fits them all (QuaRot, SpinQuant). A normalised Hadamard matrix is the rotation
of choice: every entry is +-1/sqrt(n), so it spreads evenly, and an int8 per-tensor quantizer
(an NPU's MatMul weights) holds it exactly.

Orders: Sylvester's construction gives 2^k; Paley's give q + 1 (q a prime = 3 mod 4) and
2(q + 1) (q a prime = 1 mod 4); Kronecker products of Hadamard matrices are Hadamard. So an
order n = m * 2^k is built when some m with n / m a power of two is a Paley order (SmolLM2:
576 = 36 x 16, 1536 = 12 x 128; Qwen2.5-0.5B: 896 = 28 x 32, 4864 = 76 x 64). Where none is, a
seeded random orthogonal matrix stands in (it spreads outliers as well, but is not exact in int8).

Hand-written: scipy has Sylvester's construction only, and no field library folds rotations into
a PyTorch decoder before ONNX export (QuaRot and SpinQuant are research code on fixed models)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(j - i), chi the quadratic character mod the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if r in squares else -1 for r in range(1, q)])
    return chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]


def _paley(n: int) -> np.ndarray | None:
    """A +-1 Hadamard matrix of order n from Paley's constructions, or None."""
    if _is_prime(n - 1) and (n - 1) % 4 == 3:  # Paley I: I + [[0, 1], [-1, Q]]
        q = n - 1
        core = np.zeros((n, n), dtype=np.int64)
        core[0, 1:], core[1:, 0], core[1:, 1:] = 1, -1, _jacobsthal(q)
        return core + np.eye(n, dtype=np.int64)
    half = n // 2
    if n % 2 == 0 and _is_prime(half - 1) and (half - 1) % 4 == 1:  # Paley II: a symmetric conference matrix, doubled
        conference = np.zeros((half, half), dtype=np.int64)
        conference[0, 1:], conference[1:, 0], conference[1:, 1:] = 1, 1, _jacobsthal(half - 1)
        zero, sign = np.array([[1, -1], [-1, -1]]), np.array([[1, 1], [1, -1]])
        return np.block([[zero if c == 0 else c * sign for c in row] for row in conference])
    return None


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h


@lru_cache(maxsize=32)
def hadamard_factors(n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(A, B), normalised Hadamard matrices with A (x) B of order n: A of a Paley order (or 1),
    B of a power of two. None when n has no such factorisation."""
    for m in sorted({n >> k for k in range(n.bit_length()) if (n >> k) << k == n}):
        left = np.ones((1, 1), dtype=np.int64) if m == 1 else _paley(m)
        if left is None and m & (m - 1) == 0:
            left = _sylvester(m)
        if left is not None:
            right = _sylvester(n // m)
            factors = (left / np.sqrt(m), right / np.sqrt(n // m))
            for f in factors:  # a construction slip would change the model's function: check it
                if not np.allclose(f @ f.T, np.eye(len(f)), atol=1e-9):
                    raise AssertionError(f"Hadamard construction of order {len(f)} is not orthogonal")
            return factors
    return None


def rotation_factors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with A (x) B an n x n orthogonal matrix: Hadamard where the order allows, else a
    seeded random orthogonal A (QR of a Gaussian) and B = [[1]]."""
    found = hadamard_factors(n)
    if found is not None:
        return found
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r)), np.ones((1, 1))


def rotation_matrix(n: int, seed: int) -> np.ndarray:
    """A dense n x n rotation to fold into weights: the factors' Kronecker product with the rows'
    signs flipped at random (seeded), so that no input channel lines up with a Hadamard row."""
    left, right = rotation_factors(n, seed)
    signs = np.random.default_rng(seed + 1).choice([-1.0, 1.0], size=n)
    return signs[:, None] * np.kron(left, right)


def is_hadamard(n: int) -> bool:
    return hadamard_factors(n) is not None


ROTATION_MODULE = "input_rotation"  # the online rotation's attribute on a Linear, and so its initializers' names
MAX_ONLINE_BLOCK = 256   # the right factor: x is seen as (..., n / 256, 256) at most
MAX_ONLINE_FACTOR = 512  # a larger left factor would make the online rotation read megabytes per layer


def online_factors(n: int) -> tuple[np.ndarray | None, np.ndarray]:
    """(A or None, B), A (x) B = the online rotation of order n, B a Sylvester matrix of at most
    MAX_ONLINE_BLOCK rows, A the rest (a Paley matrix times a Sylvester one) when it has at most
    MAX_ONLINE_FACTOR rows, else None: a Hadamard rotation within each block of B's size."""
    found = hadamard_factors(n)
    if found is not None:
        sylvester = len(found[1])
        block = min(sylvester, MAX_ONLINE_BLOCK)
        if n // block <= MAX_ONLINE_FACTOR:
            left = np.kron(found[0] * np.sqrt(len(found[0])), _sylvester(sylvester // block))
            return (None if len(left) == 1 else left / np.sqrt(len(left))), _sylvester(block) / np.sqrt(block)
    block = min(n & -n, MAX_ONLINE_BLOCK)
    return None, _sylvester(block) / np.sqrt(block)


def online_rotation(n: int) -> Any:
    """The module a graph runs where a rotation cannot fold (the down projection's input, after
    the gate's nonlinearity): x (..., n) -> x (A (x) B), as two small float MatMuls on x seen as
    (..., a, b): A^T (X B). The quantizers leave both float (quant/graph.py knows their
    initializers by ROTATION_MODULE in their names): the rotated tensor is what int8 covers."""
    import torch

    left, right = online_factors(n)

    class OnlineRotation(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = n // len(right)
            self.register_buffer("right", torch.tensor(right, dtype=torch.float32))
            self.register_buffer("left_t", None if left is None else torch.tensor(left.T, dtype=torch.float32))

        def forward(self, x: Any) -> Any:
            y = x.unflatten(-1, (self.blocks, len(self.right))) @ self.right.to(x.dtype)
            if self.left_t is not None:
                y = self.left_t.to(x.dtype) @ y
            return y.flatten(-2)

        def matrix(self) -> Any:
            """The dense n x n matrix this applies (x -> x @ matrix)."""
            a = torch.eye(self.blocks, dtype=torch.float64) if self.left_t is None else self.left_t.T.double()
            return torch.kron(a, self.right.double())

    return OnlineRotation()
