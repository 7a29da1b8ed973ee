"""Effective rank (Roy & Vetterli, 2007): exp of the entropy of the normalised singular values.

APEX's third mechanism is that expanding advantageous units into disadvantageous
ones raises the effective rank of what training changes. The recipe records,
at every stage boundary, the effective rank of each wrapped matrix's change over
the stage, W' - W (W the stage's starting weights): that change is non-zero
only on the tuned rows/columns, so the tuned slice gives it exactly.
"""

import torch


def effective_rank(matrix: torch.Tensor) -> float:
    """exp(-sum p_i log p_i), p_i = s_i / sum s, over the singular values s of ``matrix``.

    Between 1 (rank one) and min(rows, cols) (all singular values equal); 0 for a
    zero matrix (nothing changed). The singular values come from the eigenvalues
    of the float64 Gram matrix of the smaller side, which is exact up to rounding
    and several times cheaper than an SVD.
    """
    m = matrix.detach().double()
    if m.dim() != 2:
        raise ValueError(f"effective_rank takes a matrix, got shape {tuple(m.shape)}")
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    singular = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    total = singular.sum()
    if total == 0:
        return 0.0
    p = singular[singular > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))
