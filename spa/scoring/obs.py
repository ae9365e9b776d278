"""Optimal Brain Surgeon maths for removing input channels of linear layers.

A layer ``y = W x + b`` with input second moment H = E[x x^T] loses the output
error ``||dW x||^2`` when columns Q of W are removed and the rest corrected.
The constant input that feeds the bias is an extra, never-removed column of x
(so H is augmented by the input mean), which folds the mean-contribution bias
correction into the same update. With Hi = H^-1:

    loss(Q)  = tr( W_Q (Hi_QQ)^-1 W_Q^T )
    dW       = -W_Q (Hi_QQ)^-1 Hi_Q,:          (the OBS update; equals least squares)

A group removes the same units from several layers (a residual stream feeds
many), so its ranking is one greedy pass over all of them: remove the units of
least summed relative loss, update every layer's weights and inverse, repeat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# damping relative to the mean diagonal: keeps H invertible where channels are dead or collinear
DAMPING = 0.01
# greedy removal takes at most this many steps per group (blocks of units per step)
GREEDY_STEPS = 32


def augmented_hessian(second_moment: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """E[x x^T], with the bias's constant input appended when ``mean`` is given, damped."""
    c = len(second_moment)
    size = c + (mean is not None)
    hessian = np.empty((size, size))
    hessian[:c, :c] = second_moment
    if mean is not None:
        hessian[:c, c] = hessian[c, :c] = mean
        hessian[c, c] = 1.0
    diagonal = np.diag(second_moment)
    scale = float(diagonal.mean()) if c and np.isfinite(diagonal).all() and diagonal.mean() > 0 else 1.0
    hessian[np.arange(c), np.arange(c)] += DAMPING * scale  # not the bias entry: ridge would shrink the bias
    return hessian


def inverse(hessian: np.ndarray) -> np.ndarray:
    try:  # damped E[x x^T] is positive definite unless the data is broken (inf, NaN)
        result = np.linalg.inv(hessian)
        if np.isfinite(result).all():
            return result
    except np.linalg.LinAlgError:
        pass
    return np.linalg.pinv(np.nan_to_num(hessian), hermitian=True)


@dataclass
class LayerState:
    """One layer during a greedy OBS pass. ``weights`` has one column per input channel, plus
    the bias column when the layer has a bias; ``unit`` maps each input channel to the group's
    unit position (-1: not in this group, never removed here).

    Only the rows of the inverse Hessian for this group's channels are kept and downdated: the
    update and the saliencies read no others. A DenseNet layer reading 1,024 channels, 32 of
    them this group's, costs 32 rows per step instead of 1,024."""

    weights: np.ndarray
    hessian_inv: np.ndarray  # given whole; kept as the group's rows
    unit: np.ndarray
    energy: float  # E||W x||^2 of the dense layer: losses are relative to it

    def __post_init__(self):
        # the greedy pass only ranks; float32 halves its cost and ranks the same
        self.weights = np.asarray(self.weights, dtype=np.float32)
        self.rows = np.flatnonzero(np.asarray(self.unit) >= 0)
        self.hessian_inv = np.asarray(self.hessian_inv[self.rows], dtype=np.float32)
        self.unit = np.asarray(self.unit)[self.rows]  # unit of each kept row; -1 once removed

    def saliency(self, units: int) -> np.ndarray:
        """Relative loss of removing each unit alone, summed over its channels."""
        diagonal = self.hessian_inv[np.arange(len(self.rows)), self.rows]
        columns = np.einsum("ij,ij->j", self.weights[:, self.rows], self.weights[:, self.rows])
        alive = (diagonal > 0) & (self.unit >= 0)
        per_channel = np.where(alive, columns / np.where(alive, diagonal, 1.0), 0.0)
        return np.bincount(self.unit[alive], per_channel[alive], minlength=units) / self.energy

    def remove(self, units: np.ndarray) -> float:
        """Remove the channels of ``units`` with the OBS update; return the relative loss."""
        gone = np.isin(self.unit, units)
        local = np.flatnonzero(gone)
        if not len(local):
            return 0.0
        q = self.rows[local]
        w_q = self.weights[:, q]
        h_q = self.hessian_inv[local]  # rows q of the inverse, over every column
        if len(q) == 1:  # the common case, a rank-1 update without a solve
            pivot = h_q[0, q[0]]
            if pivot <= 0:
                return 0.0
            solved = h_q / pivot
            loss = float(w_q[:, 0] @ w_q[:, 0]) / pivot
        else:
            block = h_q[:, q]
            try:
                block_inv = np.linalg.inv(block)
            except np.linalg.LinAlgError:
                block_inv = np.linalg.pinv(block, hermitian=True)
            solved = block_inv @ h_q
            loss = float(np.einsum("ij,ji->", w_q, block_inv @ w_q.T))
        self.weights -= w_q @ solved
        self.hessian_inv -= self.hessian_inv[:, q] @ solved
        self.weights[:, q] = 0.0
        self.hessian_inv[:, q] = 0.0
        # removed rows are never read again: dropping them makes later steps cheaper
        alive = ~gone
        self.hessian_inv, self.rows, self.unit = self.hessian_inv[alive], self.rows[alive], self.unit[alive]
        return max(loss, 0.0) / self.energy


@dataclass
class DiagonalLayerState:
    """A layer whose input is too wide for X^T X (or with no statistics at all): channels are
    treated as uncorrelated, so removing one costs ||W[:, c]||^2 E[x_c^2] and moves nothing to
    the others. The same interface as ``LayerState``, in memory linear in the width."""

    column_loss: np.ndarray  # ||W[:, c]||^2 * E[x_c^2] per input channel
    unit: np.ndarray
    energy: float

    def saliency(self, units: int) -> np.ndarray:
        mine = self.unit >= 0
        return np.bincount(self.unit[mine], self.column_loss[mine], minlength=units) / self.energy

    def remove(self, units: np.ndarray) -> float:
        gone = np.isin(self.unit, units)
        loss = float(self.column_loss[gone].sum())
        self.unit = np.where(gone, -1, self.unit)
        return loss / self.energy


def greedy_scores(layers: list, units: int) -> np.ndarray:
    """Scores from one greedy OBS pass: the cumulative relative loss at which each unit goes.

    Units removed earlier score lower, and a block's joint loss is at least any member's own
    loss, so scores rise along the removal order and compare across groups (--global).
    """
    scores = np.zeros(units)
    alive = np.ones(units, dtype=bool)
    block = max(1, -(-units // GREEDY_STEPS))
    total = 0.0
    while alive.sum() > 1:
        saliency = sum(layer.saliency(units) for layer in layers)
        candidates = np.flatnonzero(alive)
        order = candidates[np.lexsort((candidates, saliency[candidates]))]
        taken = order[: min(block, len(candidates) - 1)]
        scores[taken] = total + saliency[taken]
        total += sum(layer.remove(taken) for layer in layers)
        total = max(total, float(scores[taken].max()))
        alive[taken] = False
    last = np.flatnonzero(alive)
    if len(last):
        saliency = sum(layer.saliency(units) for layer in layers)
        scores[last] = total + saliency[last] + 1.0  # the unit that would go last
    return scores


def obs_update(weights: np.ndarray, hessian_inv: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, float]:
    """Weights with columns ``q`` removed and the rest updated (equal to ``least_squares`` over
    the kept columns), and the loss E||dW x||^2, from the whole inverse in one |q|x|q| solve."""
    block = hessian_inv[np.ix_(q, q)]
    w_q = weights[:, q]
    try:
        solved = np.linalg.solve(block, hessian_inv[q, :])
        loss = float(np.einsum("ij,ji->", w_q, np.linalg.solve(block, w_q.T)))
    except np.linalg.LinAlgError:
        pinv = np.linalg.pinv(block, hermitian=True)
        solved, loss = pinv @ hessian_inv[q, :], float(np.einsum("ij,ji->", w_q, pinv @ w_q.T))
    refit = weights - w_q @ solved
    refit[:, q] = 0.0
    return refit, max(loss, 0.0)


def least_squares(weights: np.ndarray, hessian: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Weights over the kept columns that best reproduce ``weights`` over all columns.

    Minimises E||W x - W' x_keep||^2: W' = W H[:, keep] H[keep, keep]^-1 (zero elsewhere).
    """
    h_kk = hessian[np.ix_(keep, keep)]
    target = weights @ hessian[:, keep]
    try:
        solved = np.linalg.solve(h_kk, target.T).T
    except np.linalg.LinAlgError:
        solved = target @ np.linalg.pinv(h_kk, hermitian=True)
    out = np.zeros_like(weights)
    out[:, keep] = solved
    return out
