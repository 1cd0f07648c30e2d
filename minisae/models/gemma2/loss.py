"""Next-token cross-entropy of a Gemma model's logits: which positions count, and the loss of each.

    loss of the pair (t, t + 1) = logsumexp(z_t) - z_t[ids[t + 1]],   z_t the logits (V,) at t

in float64, averaged over the pairs that count (both tokens real, the target not PAD / EOS /
BOS). Gemma2Model.loss computes the same without the (B, T, V) logits (model.py). Dimension
legend: B rows, T tokens per row, V vocabulary, n counted pairs.
"""

from minisae.xp import asarray

from .layers import module_of

_CE_ELEMS = 2**22  # cross_entropy gathers about this many logits at a time (float64)


def cross_entropy(logits, ids, mask=None, *, exclude_ids=(0, 1, 2)):
    """Masked next-token cross-entropy: (mean loss over counted tokens as a float, count).

    Position t's logits predict ids[:, t + 1]. The pair (t, t + 1) counts iff
      - mask[:, t] and mask[:, t + 1] are both True (both tokens real; mask None = all real), and
      - the target ids[:, t + 1] is not in `exclude_ids` (default PAD 0, EOS 1, BOS 2; () for none).
    The last position predicts nothing. Loss per pair = logsumexp(logits) - logits[target], in
    float64; the mean is over counted pairs (NaN when none count).
    """
    xp = module_of(logits)
    B, T, V = logits.shape
    rows, cols, targets = counted_pairs(ids, mask, exclude_ids, (B, T), xp)  # (n,) each
    n = int(rows.shape[0])
    if n == 0:
        return float("nan"), 0
    total = 0.0
    step = max(1, _CE_ELEMS // V)
    for s0 in range(0, n, step):
        s1 = s0 + step
        total += nll_sum(logits[rows[s0:s1], cols[s0:s1]], targets[s0:s1], xp)  # (n, V) gathered
    return total / n, n


def counted_pairs(ids, mask, exclude_ids, shape, xp):
    """(rows, cols, targets): the positions whose next-token loss counts (see cross_entropy)."""
    B, T = shape
    ids = asarray(ids, xp)
    if tuple(ids.shape) != (B, T):
        raise ValueError(f"ids: expected shape {(B, T)} to match the logits, found {tuple(ids.shape)}")
    real = xp.ones((B, T), dtype=bool) if mask is None else asarray(mask, xp).astype(bool)
    if tuple(real.shape) != (B, T):
        raise ValueError(f"mask: expected shape {(B, T)} like ids, found {tuple(real.shape)}")
    target = ids[:, 1:]  # (B, T-1)
    counted = real[:, :-1] & real[:, 1:]  # (B, T-1) input and target both real
    for e in exclude_ids:
        counted &= target != int(e)
    rows, cols = xp.nonzero(counted)  # (n,), (n,)
    return rows, cols, target[rows, cols]


def nll_sum(z, targets, xp):
    """sum over rows of logsumexp(z) - z[target], in float64; z (n, V), targets (n,)."""
    total = 0.0
    step = max(1, _CE_ELEMS // z.shape[-1])  # rows per float64 block
    for s0 in range(0, z.shape[0], step):
        zc = z[s0:s0 + step].astype(xp.float64)  # (r, V)
        m = zc.max(axis=-1)  # (r,)
        lse = m + xp.log(xp.exp(zc - m[:, None]).sum(axis=-1))  # (r,)
        picked = zc[xp.arange(zc.shape[0]), targets[s0:s0 + step]]  # (r,)
        total += float((lse - picked).sum())
    return total
