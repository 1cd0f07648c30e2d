"""Evaluation of a release SAE (minisae.io.saefile.SAE) by the usual metrics: L0, FVU, dead/dense
fractions, shrinkage, and the LM loss with the SAE spliced in.

    summary = evaluate_sae(sae, source)                      # L0, FVU, dead/dense, γ, firing freq
    lm = evaluate_lm(sae, model, tokenizer, ["val.jsonl"], "blocks.12.hook_resid_post")
    lm["delta_lm_loss"], lm["loss_recovered"]

evaluate_sae runs the SAE on held-out activations of a source (`eval_sample(n)` when the source has
it, else `sample(n)`), raw (unnormalised) as a user would feed them; on synthetic data with a
planted dictionary (`source.directions`) it adds feature recovery.
evaluate_lm runs the model three times per batch: clean, with the SAE reconstruction spliced in at
the site, and with the site zero-ablated. BOS positions are never spliced (their activations are
huge outliers that SAEs are not trained on) and next-token losses exclude BOS/EOS/PAD targets.
With max_norm_ratio = r, positions whose activation norm at the SAE's input site exceeds r × the
batch's median (minisae.data.activations.norm_outliers, the rule a cache made with the same r
dropped them by) stay unspliced as well, in the SAE and the zero-ablated pass alike; their
next-token losses still count. The result says how many positions that was.

Legend: B sequences, T tokens per sequence, N tokens, D site width, M latents, F true features.
"""

import math

import numpy

from minisae.errors import DependencyError
from minisae.progress import progress_bar
from minisae.eval.metrics import ClassificationAccumulator, EvalAccumulator, best_match, feature_recovery, mcc, uniqueness
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
    """Reconstruction and sparsity metrics of `sae` on n_tokens held-out rows of `source`; a
    JSON-ready dict.

    Keys: l0, fvu, explained_variance, mse, dead_frac, dense_frac, rel_recon_bias, shrinkage,
    n_tokens, firing_freq (list, per latent), and mmcs / frac_recovered when true directions are
    known. On a synthetic source that also returns its true codes (`eval_sample(n,
    return_codes=True)`), the ground-truth metrics (minisae.eval.metrics): precision, recall, f1,
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


def describe_eval_data(source, n_tokens, *, where=None):
    """What evaluate_sae(source, n_tokens=...) reads, for the user: (one line saying which data,
    held-out or training tokens, how many, and whether ground truth is scored; a warning line when
    fewer tokens exist than were asked for, else None). `where`: how the source was found (e.g.
    "the run's own data (runs/x/config.json)")."""
    from minisae.data.activations import ActivationStore

    origin = f" ({where})" if where else ""
    if isinstance(source, ActivationStore):
        held = int(source.holdout_rows.size)
        have = held or int(source.train_rows.size)
        n = min(n_tokens, have)
        if held:
            what = f"{n} held-out tokens of the activation cache {source.folder}{origin}"
        else:
            what = (f"{n} training tokens of the activation cache {source.folder}{origin}: it keeps no held-out "
                    "tokens, so an SAE trained on it is scored on tokens it saw (train with --holdout-tokens "
                    "to keep some out)")
        warning = (f"--eval-tokens {n_tokens} is more than the {have} {'held-out' if held else 'training'} "
                   f"tokens of {source.folder}; evaluating on those {have}") if n_tokens > have else None
        return f"evaluated on {what}", warning
    truth = getattr(source, "directions", None) is not None and callable(getattr(source, "eval_sample", None))
    name = type(source).__name__
    return (f"evaluated on {n_tokens} fresh tokens of {name}{origin}, held out (never drawn for training)"
            + ("; ground truth known: MCC and F1 scored" if truth else ""), None)


def _py(v):
    v = to_numpy(v) if not isinstance(v, (int, float)) else v
    if isinstance(v, numpy.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, numpy.generic):
        v = v.item()
    return v


_KIND_ORDER = {"attn.hook_z": 0, "hook_mlp_in": 1, "hook_mlp_out": 2, "hook_resid_post": 3}  # within a block


def transcoder_sites(sae, model, site, site_out=None):
    """(input site, output site) of a transcoder in `model`, checked: widths, and the output after the input."""
    from minisae.errors import InputError
    from minisae.sites import parse_site

    site_out = site_out or sae.cfg["metadata"].get("hook_name_out")
    if not site_out:
        raise InputError("a transcoder needs the site it predicts: give --site-out (its cfg has no hook_name_out)")
    check_width(sae, model.site_width(site), f"site {site} of the model")
    if int(sae.d_out) != int(model.site_width(site_out)):
        raise InputError(f"transcoder d_out={sae.d_out} does not match output site {site_out} of the model "
                         f"(width {model.site_width(site_out)})")
    (l_in, k_in), (l_out, k_out) = parse_site(site), parse_site(site_out)
    if (l_out, _KIND_ORDER[k_out]) <= (l_in, _KIND_ORDER[k_in]):
        raise InputError(f"transcoder output site {site_out} does not come after its input site {site} in the model")
    return site, site_out


def evaluate_lm(sae, model, tokenizer, text_paths, site, *, seq_len=1024, batch_size=2,
                max_tokens=8192, text_field="text", progress=False, site_out=None, max_norm_ratio=None,
                baseline=None):
    """Delta LM loss and loss recovered of `sae` spliced into `model` at `site`.

    Returns {"ce_clean", "ce_sae", "ce_zero", "delta_lm_loss", "loss_recovered", "lm_tokens",
    "unspliced_outliers"}; losses are token-weighted means over the batches read until max_tokens
    scored tokens; unspliced_outliers counts the positions max_norm_ratio left as they were.

    baseline: a dict the caller keeps between calls (minisae compare: one per sweep). The clean
    and zero-ablated losses do not depend on the SAE, so the first call stores them per batch
    under the evaluation's settings, and later calls with the same settings run only the SAE pass
    (one head pass a batch instead of three; the same numbers, bitwise: model.losses runs each
    splice on its own). Not used for transcoders (their clean pass also measures the prediction).

    A transcoder reads `site` and predicts `site_out` (default: its cfg's hook_name_out, e.g. the
    MLP's output for a Gemma Scope 2 transcoder reading the MLP's input): its prediction (skip term
    included) replaces the model's activations at site_out, and site_out is what gets zero-ablated.
    The clean pass also measures the prediction against the real output on every non-BOS real
    token, adding the keys of minisae.eval.metrics.EvalAccumulator (fvu: the FVU of the MLP output, l0,
    mse, dead_frac, dense_frac, rel_recon_bias, n_tokens).
    """
    from minisae.data.activations import check_norm_ratio, iter_batches

    transcoder = getattr(sae, "is_transcoder", False)
    acc = None
    if transcoder:
        site, site_out = transcoder_sites(sae, model, site, site_out)
        acc = EvalAccumulator(sae.d_sae, sae.xp)
    else:
        check_width(sae, model.site_width(site), f"site {site} of the model")
        site_out = site
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_total, n_outliers = 0, 0
    check_norm_ratio(max_norm_ratio)
    special = (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id)
    key = (id(model), id(tokenizer), tuple(map(str, text_paths)), site, seq_len, batch_size, max_tokens, text_field,
           max_norm_ratio)
    stored = None if baseline is None or transcoder else baseline.get(key)  # [(clean, zero, n), ...] per batch
    fresh = [] if baseline is not None and not transcoder and stored is None else None
    bar = _bar(progress, max_tokens)
    try:
        for i, (_, ids_np, mask_np) in enumerate(iter_batches(tokenizer, text_paths, seq_len, batch_size,
                                                             text_field=text_field)):
            if stored is not None and i >= len(stored):
                break
            losses, n_out = _batch_losses(sae, model, tokenizer, ids_np, mask_np, site, site_out, max_norm_ratio,
                                          special, stored[i] if stored is not None else None, acc)
            n = losses["clean"][1]
            if fresh is not None:
                fresh.append((losses["clean"][0], losses["zero"][0], n))
            if n == 0:
                continue
            for name in sums:
                sums[name] += losses[name][0] * n
            n_total += n
            n_outliers += n_out
            bar.update(n)
            if n_total >= max_tokens:
                break
    finally:
        bar.close()
    if n_total == 0:
        raise ValueError(f"no scored tokens in the evaluation texts {list(map(str, text_paths))}")
    if fresh is not None:
        baseline[key] = fresh
    ce = {k: v / n_total for k, v in sums.items()}
    denom = ce["zero"] - ce["clean"]
    out = {
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "delta_lm_loss": ce["sae"] - ce["clean"],
        "loss_recovered": (ce["zero"] - ce["sae"]) / denom if denom != 0 else math.nan,
        "lm_tokens": n_total,
        "unspliced_outliers": n_outliers,
    }
    if transcoder:
        out.update({k: _py(v) for k, v in acc.summary().items()}, site_out=site_out)
    return out


def _batch_losses(sae, model, tokenizer, ids_np, mask_np, site, site_out, max_norm_ratio, special, stored, acc):
    """One batch of evaluate_lm: ({"clean", "sae", "zero"}: (mean loss, count)), the number of
    positions max_norm_ratio left unspliced). stored: this batch's (clean, zero, count) from an
    earlier call (only the SAE pass runs), or None. A transcoder (site_out != site) reads `site`
    and splices at site_out; its clean pass also feeds the prediction's metrics into acc."""
    from minisae.data.activations import norm_outliers, real_token_mask

    mx = model.xp
    transcoder = getattr(sae, "is_transcoder", False)
    ids = mx.asarray(ids_np)  # (B, T)
    mask = mx.asarray(mask_np)  # (B, T)
    bos = ids == tokenizer.bos_id  # (B, T) BOS positions stay as they are
    real = mx.asarray(real_token_mask(ids_np, mask_np, tokenizer))  # (B, T)
    seen = {}  # site -> activations recorded by the splices below during one pass
    kept = {}  # "mask": (B, T, 1) the positions left as they are, from the first pass that saw `site`

    def keep_mask(acts_in):
        if "mask" not in kept:
            outliers = norm_outliers(acts_in, real, max_norm_ratio)  # (B, T)
            kept["n"] = int(outliers.sum())
            kept["mask"] = (bos | outliers)[..., None]  # (B, T, 1)
        return kept["mask"]

    def record(name):
        def fn(acts):
            seen[name] = acts
            return acts
        return fn

    def sae_output(acts_in, like):  # the SAE's reconstruction / transcoder's prediction, shaped like `like`
        B, T = acts_in.shape[:2]
        out = sae(asarray(acts_in.reshape(B * T, -1), sae.xp))  # (B*T, D_out)
        return asarray(out, mx, like.dtype).reshape(like.shape)  # (B, T, D_out)

    def splice_sae(acts):  # at site_out; for a transcoder seen["in"] was recorded earlier in this pass
        acts_in = seen["in"] if transcoder else acts
        return mx.where(keep_mask(acts_in), acts, sae_output(acts_in, acts))

    def splice_zero(acts):
        return mx.where(keep_mask(seen["in"] if transcoder else acts), acts, mx.zeros_like(acts))

    clean = {site: record("in"), site_out: record("out")} if transcoder else None
    spliced = {site: record("in"), site_out: splice_sae} if transcoder else {site: splice_sae}
    zeroed = {site: record("in"), site_out: splice_zero} if transcoder else {site: splice_zero}
    losses = {}
    names, splices = ("clean", "sae", "zero"), (clean, spliced, zeroed)
    # = cross_entropy(model.forward(ids, splice), ...) per splice without the (B, T, V) logits,
    # the layers below the site run once for all three (model.losses)
    if stored is not None:  # clean and zero from the first call: the SAE pass alone
        (loss, n), = model.losses(ids, mask, [spliced], exclude_ids=special)
        clean_loss, zero_loss, n_clean = stored
        losses = {"clean": (clean_loss, n_clean), "sae": (float(to_numpy(loss)), int(to_numpy(n))),
                  "zero": (zero_loss, n_clean)}
    else:
        for name, (loss, n) in zip(names, model.losses(ids, mask, splices, exclude_ids=special)):
            losses[name] = (float(to_numpy(loss)), int(to_numpy(n)))
            if name == "clean" and transcoder:  # seen["in"]: the sae pass recorded the same values
                rows = mask & ~bos  # (B, T) real tokens, BOS excluded
                x = asarray(seen["in"][rows], sae.xp)  # (n, D_in)
                f = sae.encode(x)  # (n, M)
                y_hat = sae.decode(f) + (sae.skip(x) if "W_skip" in sae.params else 0.0)  # (n, D_out)
                acc.update(asarray(seen["out"][rows], sae.xp), y_hat, f)
    return losses, kept.get("n", 0)


def evaluate(sae, source=None, *, n_tokens=65536, batch_size=4096, model=None, tokenizer=None,
             texts=None, site=None, seq_len=1024, lm_batch_size=2, lm_tokens=8192, text_field="text",
             site_out=None, max_norm_ratio=None):
    """evaluate_sae on `source` (when given) plus evaluate_lm (when model, tokenizer, texts, site are);
    an InputError instead of a result holding NaN or inf.

    A transcoder is evaluated on the model only (cached activations hold one site, a transcoder
    needs two): its FVU and L0 come from evaluate_lm."""
    out = {}
    if source is not None and getattr(sae, "is_transcoder", False):
        from minisae.errors import InputError

        raise InputError("a transcoder is evaluated on a model (--model, --site, --text: it reads one site and "
                         "predicts another), not on cached activations of one site")
    if source is not None:
        out.update(evaluate_sae(sae, source, n_tokens=n_tokens, batch_size=batch_size))
    if model is not None:
        if tokenizer is None or not texts or site is None:
            raise ValueError("delta LM loss needs a tokenizer, evaluation texts and a site besides the model")
        out.update(evaluate_lm(sae, model, tokenizer, texts, site, seq_len=seq_len, batch_size=lm_batch_size,
                               max_tokens=lm_tokens, text_field=text_field, site_out=site_out,
                               max_norm_ratio=max_norm_ratio))
    if not out:
        raise ValueError("nothing to evaluate: give an activation source, or a model with texts and a site")
    bad = [k for k, v in out.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:  # e.g. a transcoder whose finite but huge W_skip overflows float32: a NaN is no result
        from minisae.errors import InputError

        raise InputError(f"{getattr(sae, 'source', None) or 'the SAE'}: the evaluation gave non-finite "
                         f"{', '.join(bad)} (its outputs overflow on these activations: are its weights, e.g. "
                         "W_skip, sane?)")
    return out


def _bar(enabled, total):
    return progress_bar(total, enabled=bool(enabled), desc="LM eval", unit="tok", unit_scale=True)
