"""The closed-form edit of one layer: reduced-rank ridge regression on sufficient statistics.

Unknown: ``M`` (``d x k``), the update of the ``k`` safety-neuron columns of ``down_proj``.
With ``x_i`` the low-resource harmful activations on those neurons and ``t_i`` the change of
``down_proj`` output that would turn them into their English twins' output, minimise

    sum_i ||M x_i - t_i||^2 + lam * sum_j ||M b_j||^2 + mu * ||M||_F^2

over benign activations ``b_j`` (the utility-preservation penalty), subject to rank(M) <= r.
Two more terms take the same form: a penalty on benign prompts at the decision positions
(each language's mean ``||M d_j||^2`` scaled to the pair term, or to that language's part of
it, and weighted ``lam_d``, so the tokens that decide a refusal count however short the prompt
and however many languages the group has), and, optionally, benign low-resource prompts mapped onto
their English twins like the harmful pairs (``beta * sum ||M y_j - s_j||^2``): the edit then
moves the language towards English, and refusal follows harm as it does in English.
With ``G = XX^T + lam BB^T + mu I = L L^T`` (Cholesky) and ``C = T X^T``, the objective is
``||M L - C L^-T||_F^2`` + const, so the optimum is ``M = trunc_r(C L^-T) L^-1``: whiten,
truncate the SVD, un-whiten. ``lam`` and ``mu`` are given relative to the traces, so they
mean the same at every layer and model size.

The exact alternative ("projection") restricts ``M = Z P^T`` to the null space ``P`` of the
benign activations (the directions holding the last ``1 - energy`` of their second moment),
so benign inputs are left unchanged by construction, and solves the same problem for ``Z``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerStatistics:
    """Sufficient statistics of one layer, restricted to its ``k`` safety neurons."""

    pair_gram: torch.Tensor  # X X^T, k x k, over low-resource harmful activations
    target_cross: torch.Tensor  # T X^T, d x k
    benign_gram: torch.Tensor  # B B^T, k x k, over benign activations (all tokens)
    pairs: int
    benign_tokens: int
    # per language, D_l D_l^T / n_l: benign prompts at the decision positions
    decision_grams: tuple[torch.Tensor, ...] = ()
    # per decision gram, its language's share of the pair trace (English: the mean share)
    decision_shares: tuple[float, ...] = ()
    # per decision gram, its language's code (for per-language weights)
    decision_languages: tuple[str, ...] = ()
    aligned_gram: torch.Tensor | None = None  # Y Y^T, benign low-resource prompts with twins
    aligned_cross: torch.Tensor | None = None  # S Y^T, towards their English twins
    aligned: int = 0


@dataclass(frozen=True)
class LowRankUpdate:
    B: torch.Tensor  # d x r
    A: torch.Tensor  # r x k
    singular_values: torch.Tensor  # of the whitened problem, all of them (for diagnostics)

    def dense(self) -> torch.Tensor:
        return self.B @ self.A


def _canonical_signs(left: torch.Tensor, right_t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # SVD vectors are defined up to sign; fix it so files are byte-stable across LAPACKs.
    index = left.abs().argmax(dim=0)
    signs = torch.sign(left[index, torch.arange(left.shape[1])])
    signs[signs == 0] = 1
    return left * signs, right_t * signs


def reduced_rank_ridge(
    pair_gram: torch.Tensor,
    target_cross: torch.Tensor,
    penalty_gram: torch.Tensor,
    rank: int,
    ridge: float,
) -> LowRankUpdate:
    """Minimise ``tr(M G M^T) - 2 tr(M C^T)`` over rank-``rank`` ``M`` (all in float64)."""
    k = pair_gram.shape[0]
    gram = pair_gram + penalty_gram
    scale = float(torch.trace(pair_gram)) / k if k else 1.0
    gram = gram + (ridge * max(scale, 1e-12)) * torch.eye(k, dtype=gram.dtype)
    lower = torch.linalg.cholesky(gram)
    # Y = C L^-T  <=>  Y^T = L^-1 C^T
    whitened = torch.linalg.solve_triangular(lower, target_cross.T, upper=False).T
    left, singular, right_t = torch.linalg.svd(whitened, full_matrices=False)
    rank = min(rank, singular.numel())
    left, right_t = left[:, :rank], right_t[:rank, :]
    left, right_t = _canonical_signs(left, right_t.T)
    # A = V_r^T L^-1  <=>  A^T = L^-T V_r
    right = torch.linalg.solve_triangular(lower.T, right_t, upper=True).T
    return LowRankUpdate(B=left * singular[:rank], A=right, singular_values=singular)


def benign_null_space(benign_gram: torch.Tensor, energy: float) -> torch.Tensor:
    """Orthonormal basis (k x m) of the directions outside the benign top-``energy`` subspace."""
    values, vectors = torch.linalg.eigh(benign_gram)  # ascending
    values = values.clamp(min=0)
    total = float(values.sum())
    if total <= 0:
        return vectors
    # keep the smallest directions whose cumulative share stays within 1 - energy
    kept = torch.cumsum(values, dim=0) <= (1.0 - energy) * total
    return vectors[:, kept]


def _trace(gram: torch.Tensor) -> float:
    return max(float(torch.trace(gram)), 1e-12)


def solve_layer(
    stats: LayerStatistics,
    rank: int,
    constraint: str = "penalty",
    benign_weight: float = 1.0,
    ridge: float = 1e-3,
    null_space_energy: float = 0.99,
    decision_weight: float = 0.0,
    benign_alignment: float = 0.0,
    decision_balance: str = "group",
    decision_weights: dict[str, float] | None = None,
) -> LowRankUpdate:
    """The rank-``rank`` update for one layer under the chosen benign constraint.
    ``decision_weights`` replaces ``decision_weight`` for the languages it names."""
    pair_gram = stats.pair_gram.to(torch.float64)
    target_cross = stats.target_cross.to(torch.float64)
    benign_gram = stats.benign_gram.to(torch.float64)
    # Per-sample averages, so lam weighs mean benign energy against mean pair energy.
    pair_gram = pair_gram / max(stats.pairs, 1)
    target_cross = target_cross / max(stats.pairs, 1)
    benign_gram = benign_gram / max(stats.benign_tokens, 1)
    pair_trace = float(torch.trace(pair_gram))
    # Every benign term is scaled to the pair trace, so its weight means the same at every layer.
    penalty_gram = (benign_weight * pair_trace / _trace(benign_gram)) * benign_gram
    if decision_balance not in ("group", "language"):
        raise ValueError(f"unknown decision_balance '{decision_balance}': 'group' or 'language'")
    overrides = decision_weights or {}
    grams = stats.decision_grams if decision_weight or overrides else ()
    shares = stats.decision_shares or (1.0,) * len(stats.decision_grams)
    codes = stats.decision_languages or ("",) * len(stats.decision_grams)
    for decision, share, code in zip(grams, shares[: len(grams)], codes[: len(grams)], strict=True):
        # "group": each language's benign decision rows weigh decision_weight times the whole
        # pair term; "language": times that language's own part of it, so a language is held
        # as firmly against its own harmful pairs in a group of one as in a group of nine.
        weight = overrides.get(code, decision_weight)
        weight *= share if decision_balance == "language" else 1.0
        decision = decision.to(torch.float64)
        penalty_gram = penalty_gram + (weight * pair_trace / _trace(decision)) * decision
    if benign_alignment and stats.aligned:
        aligned_gram = stats.aligned_gram.to(torch.float64) / stats.aligned
        aligned_cross = stats.aligned_cross.to(torch.float64) / stats.aligned
        scale = benign_alignment * pair_trace / _trace(aligned_gram)
        pair_gram = pair_gram + scale * aligned_gram
        target_cross = target_cross + scale * aligned_cross
    if constraint == "penalty":
        return reduced_rank_ridge(pair_gram, target_cross, penalty_gram, rank, ridge)
    if constraint == "projection":
        basis = benign_null_space(penalty_gram, null_space_energy)
        if basis.shape[1] == 0:
            zero = torch.zeros(target_cross.shape[0], 1, dtype=torch.float64)
            return LowRankUpdate(
                B=zero,
                A=torch.zeros(1, pair_gram.shape[0], dtype=torch.float64),
                singular_values=torch.zeros(1, dtype=torch.float64),
            )
        reduced = reduced_rank_ridge(
            basis.T @ pair_gram @ basis,
            target_cross @ basis,
            torch.zeros(basis.shape[1], basis.shape[1], dtype=torch.float64),
            rank,
            ridge,
        )
        return LowRankUpdate(
            B=reduced.B, A=reduced.A @ basis.T, singular_values=reduced.singular_values
        )
    raise ValueError(f"unknown constraint '{constraint}': use 'penalty' or 'projection'")
