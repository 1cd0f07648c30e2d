"""Evaluation of a release SAE (minisae.io.saefile.SAE) by the metrics of SPEC §5.

    summary = evaluate_sae(sae, source)                      # L0, FVU, dead/dense, γ, firing freq
    lm = evaluate_lm(sae, model, tokenizer, ["val.jsonl"], "blocks.12.hook_resid_post")
    lm["delta_lm_loss"], lm["loss_recovered"]

evaluate_sae runs the SAE on held-out activations of a source (`eval_sample(n)` when the source has
it, else `sample(n)`), raw (unnormalised) as a user would feed them; on synthetic data with a
planted dictionary (`source.directions`) it adds feature recovery.
evaluate_lm runs the model three times per batch: clean, with the SAE reconstruction spliced in at
the site, and with the site zero-ablated. BOS positions are never spliced (their activations are
huge outliers that SAEs are not trained on) and next-token losses exclude BOS/EOS/PAD targets.

Legend: B sequences, T tokens per sequence, N tokens, D site width, M latents, F true features.
"""

import math

import numpy

from minisae.errors import DependencyError
from minisae.progress import progress_bar
from minisae.metrics import ClassificationAccumulator, EvalAccumulator, best_match, feature_recovery, mcc, uniqueness
from minisae.xp import asarray, to_numpy


EVAL_OFFSET = 1  # sample(n, offset=0) estimates the normalising constant; offset 1 evaluates


def _eval_rows(source, n):
    take = getattr(source, "eval_sample", None)
    rows = take(n) if callable(take) else source.sample(n, offset=EVAL_OFFSET)
    return numpy.asarray(rows, dtype=numpy.float32)  # (N, D)


def check_width(sae, width, where):
    """Refuse an SAE whose d_in does not match the activations it is asked to read."""
    if int(sae.d_in) != int(width):
        raise ValueError(f"SAE d_in={sae.d_in} does not match {where} (width {width})")


def evaluate_sae(sae, source, *, n_tokens=65536, batch_size=4096, true_directions=None,
                 cosine_cutoff=0.9):
    """SPEC §5 metrics of `sae` on n_tokens held-out rows of `source`; a JSON-ready dict.

    Keys: l0, fvu, explained_variance, mse, dead_frac, dense_frac, rel_recon_bias, shrinkage,
    n_tokens, firing_freq (list, per latent), and mmcs / frac_recovered when true directions are
    known. On a synthetic source that also returns its true codes (`eval_sample(n,
    return_codes=True)`), the ground-truth metrics (minisae.metrics): precision, recall, f1,
    uniqueness, and mcc when scipy is installed (None otherwise).
    """
    check_width(sae, source.d_in, "the activation source")
    dirs = true_directions if true_directions is not None else getattr(source, "directions", None)
    codes_all = None
    if dirs is not None and getattr(source, "eval_sample", None) is not None:
        x_all, codes_all = source.eval_sample(n_tokens, return_codes=True)  # (N, D), (N, F)
        x_all = numpy.asarray(x_all, dtype=numpy.float32)
    else:
        x_all = _eval_rows(source, n_tokens)  # (N, D)
    if not numpy.isfinite(x_all).all():
        raise ValueError("the evaluation activations hold NaN or inf values")
    xp = sae.xp
    acc = EvalAccumulator(sae.d_sae, xp)
    W_dec = to_numpy(sae.params["W_dec"])  # (M, D)
    cls = ClassificationAccumulator(best_match(W_dec, dirs)) if codes_all is not None else None
    for start in range(0, x_all.shape[0], batch_size):
        x = asarray(x_all[start:start + batch_size], xp)  # (b, D)
        f = sae.encode(x)  # (b, M)
        xhat = sae.decode(f)  # (b, D)
        acc.update(x, xhat, f)
        if cls is not None:
            cls.update(f, codes_all[start:start + batch_size])
    summary = {k: _py(v) for k, v in acc.summary().items()}
    summary["firing_freq"] = [float(v) for v in to_numpy(acc.firing_freq)]
    if dirs is not None:
        dirs = numpy.asarray(to_numpy(dirs))
        rec = feature_recovery(dirs, W_dec, cutoff=cosine_cutoff)
        summary.update({k: _py(v) for k, v in rec.items()})
    if cls is not None:
        summary.update(cls.summary())
        summary["uniqueness"] = uniqueness(W_dec, dirs)
        try:
            summary["mcc"] = mcc(W_dec, dirs)
        except DependencyError:  # scipy missing; compare asks for it up front
            summary["mcc"] = None
    return summary


def _py(v):
    v = to_numpy(v) if not isinstance(v, (int, float)) else v
    if isinstance(v, numpy.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, numpy.generic):
        v = v.item()
    return v


def evaluate_lm(sae, model, tokenizer, text_paths, site, *, seq_len=1024, batch_size=2,
                max_tokens=8192, text_field="text", progress=False):
    """Delta LM loss and loss recovered of `sae` spliced into `model` at `site` (SPEC §5).

    Returns {"ce_clean", "ce_sae", "ce_zero", "delta_lm_loss", "loss_recovered", "lm_tokens"}; losses
    are token-weighted means over the batches read until max_tokens scored tokens.
    """
    from minisae.data.activations import iter_batches

    check_width(sae, model.site_width(site), f"site {site} of the model")
    mx = model.xp
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_total = 0
    special = (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id)
    bar = _bar(progress, max_tokens)
    try:
        for _, ids_np, mask_np in iter_batches(tokenizer, text_paths, seq_len, batch_size, text_field=text_field):
            ids = mx.asarray(ids_np)  # (B, T)
            mask = mx.asarray(mask_np)  # (B, T)
            keep = (ids == tokenizer.bos_id)[..., None]  # (B, T, 1) BOS positions stay as they are

            def splice_sae(acts):
                B, T, D = acts.shape
                recon = sae(asarray(acts.reshape(B * T, D), sae.xp))  # (B*T, D)
                recon = asarray(recon, mx, acts.dtype).reshape(B, T, D)  # (B, T, D)
                return mx.where(keep, acts, recon)

            def splice_zero(acts):
                return mx.where(keep, acts, mx.zeros_like(acts))

            losses = {}
            for name, splice in (("clean", None), ("sae", {site: splice_sae}), ("zero", {site: splice_zero})):
                # = cross_entropy(model.forward(ids, splice), ...) without the (B, T, V) logits
                loss, n = model.loss(ids, mask, splice=splice, exclude_ids=special)
                losses[name] = (float(to_numpy(loss)), int(to_numpy(n)))
            n = losses["clean"][1]
            if n == 0:
                continue
            for name in sums:
                sums[name] += losses[name][0] * n
            n_total += n
            bar.update(n)
            if n_total >= max_tokens:
                break
    finally:
        bar.close()
    if n_total == 0:
        raise ValueError(f"no scored tokens in the evaluation texts {list(map(str, text_paths))}")
    ce = {k: v / n_total for k, v in sums.items()}
    denom = ce["zero"] - ce["clean"]
    return {
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "delta_lm_loss": ce["sae"] - ce["clean"],
        "loss_recovered": (ce["zero"] - ce["sae"]) / denom if denom != 0 else math.nan,
        "lm_tokens": n_total,
    }


def evaluate(sae, source=None, *, n_tokens=65536, batch_size=4096, model=None, tokenizer=None,
             texts=None, site=None, seq_len=1024, lm_batch_size=2, lm_tokens=8192, text_field="text"):
    """evaluate_sae on `source` (when given) plus evaluate_lm (when model, tokenizer, texts, site are)."""
    out = {}
    if source is not None:
        out.update(evaluate_sae(sae, source, n_tokens=n_tokens, batch_size=batch_size))
    if model is not None:
        if tokenizer is None or not texts or site is None:
            raise ValueError("delta LM loss needs a tokenizer, evaluation texts and a site besides the model")
        out.update(evaluate_lm(sae, model, tokenizer, texts, site, seq_len=seq_len, batch_size=lm_batch_size,
                               max_tokens=lm_tokens, text_field=text_field))
    if not out:
        raise ValueError("nothing to evaluate: give an activation source, or a model with texts and a site")
    return out


def _bar(enabled, total):
    return progress_bar(total, enabled=bool(enabled), desc="LM eval", unit="tok", unit_scale=True)
