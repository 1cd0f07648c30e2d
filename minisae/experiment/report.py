"""The verdict and report.md of `minisae compare` (minisae.experiment.compare runs the SAEs; minisae.experiment.plot draws pareto.png).

Matched L0. Every (variant, seed) has one run per target L0; a metric is read at each exact
target by linear interpolation in log L0 along that seed's own runs (a target outside the L0s the
seed reached takes the nearest run's value and is marked "outside"). The controller lands within
a few per cent of its targets, so the correction is small; it keeps a variant that ran slightly
denser from being credited for it.

Measurable difference. Over seeds each (variant, target) has a mean and a standard deviation; A
and B differ measurably when |mean_A − mean_B| > sqrt(sd_A² + sd_B²), their combined spread, and
is at least MIN_EFFECT of the metric (explained variance 0.002, MCC and F1 0.005, delta LM loss
0.01 nats); anything smaller is reported as "no measurable difference", never as a win. The floor
is there because seeds are not the only noise: the same default sweep run with and without the
`fast` extra (sparse products summed in another order) moved explained variance by up to 0.001,
and a JumpReLU–Gated difference of 0.0010 against a spread of 0.0009 turned the verdict over.

Pathological runs. A run is flagged when more than half its latents are dead or its densest latent
fires on more tokens than dense_limit (10 %, or twice the rate of the data's most frequent true
feature where that is higher); a (variant, target) shows "⚠ k/n" and is drawn hollow only when
most of its seeds are flagged, so that one seed near the limit does not change the picture.

The paper's claim (Rajamanoharan et al., arXiv 2407.14435): JumpReLU SAEs reach reconstruction
fidelity at least as good as Gated and TopK SAEs at the same sparsity. Here: JumpReLU's explained
variance is not measurably below Gated's or TopK's at any target L0. Feature quality (MCC, F1;
SynthSAEBench's metrics) is judged separately: the claim does not cover it.
"""

import math

import numpy

from minisae.experiment import tuning
from minisae.training import l0control

NAMES = {"jumprelu": "JumpReLU", "gated": "Gated", "topk": "TopK", "batchtopk": "BatchTopK",
         "matryoshka": "Matryoshka"}
HIGHER_BETTER = {"explained_variance": True, "mcc": True, "f1": True, "delta_lm_loss": False}
MIN_EFFECT = {"explained_variance": tuning.FVU_FLOOR, "mcc": 0.005, "f1": 0.005, "delta_lm_loss": 0.01}  # smallest difference counted
METRIC_NAMES = {"explained_variance": "explained variance", "mcc": "MCC", "f1": "F1", "delta_lm_loss": "delta LM loss"}
SUMMARY_KEYS = ("l0", "explained_variance", "fvu", "mcc", "f1", "precision", "recall", "uniqueness", "dead_frac",
                "dense_frac", "max_firing_freq", "shrinkage", "delta_lm_loss", "loss_recovered")
# SynthSAEBench-16k, width 4096, mean of 5 runs (SAELens documentation table; arXiv 2602.14687):
# (F1, MCC, EV) at L0 = 25 and (F1, MCC) at L0 = 20.
PUBLISHED = {
    25: {"BatchTopK": (0.732, 0.757, 0.792), "Matryoshka BatchTopK": (0.879, 0.793, 0.779),
         "JumpReLU (SAELens, tanh penalty)": (0.732, 0.753, 0.795), "Standard L1": (0.556, 0.604, 0.765)},
    20: {"BatchTopK": (0.818, 0.753, None), "Matryoshka BatchTopK": (0.860, 0.746, None),
         "JumpReLU (SAELens, tanh penalty)": (0.824, 0.743, None)},
}


def _mean_sd(values):
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None
    return float(numpy.mean(v)), (float(numpy.std(v, ddof=1)) if len(v) > 1 else None)


def matched(rows, variant, seed, metric, target):
    """`metric` of (variant, seed) at L0 = target, linear in log L0 over that seed's runs, and
    extrapolated linearly from the nearest two when the target lies at most EXTRAPOLATE (10 %)
    beyond the L0s reached; (value, inside), value None when the target is farther out."""
    pts = sorted((r["l0"], r.get(metric)) for r in rows
                 if r["variant"] == variant and r["seed"] == seed and r.get(metric) is not None and r["l0"] > 0)
    if not pts:
        return None, False
    xs, ys = numpy.log([p[0] for p in pts]), numpy.array([p[1] for p in pts], dtype=numpy.float64)
    lt = math.log(target)
    if xs[0] - 1e-9 <= lt <= xs[-1] + 1e-9:
        return float(numpy.interp(lt, xs, ys)), True
    if lt < xs[0] - EXTRAPOLATE or lt > xs[-1] + EXTRAPOLATE:
        return None, False
    if len(xs) == 1 or xs[-1] - xs[0] < 1e-9:
        return float(ys[0]), False
    i = (0, 1) if lt < xs[0] else (-2, -1)
    slope = (ys[i[1]] - ys[i[0]]) / (xs[i[1]] - xs[i[0]])
    x0, y0 = (xs[0], ys[0]) if lt < xs[0] else (xs[-1], ys[-1])
    return float(y0 + slope * (lt - x0)), False


EXTRAPOLATE = math.log(1.10)  # a target at most 10 % beyond the reached L0s is still matched

DENSE_LIMIT = 0.1  # a latent firing on more tokens than this is dense (SAEBench's rule)
DEAD_LIMIT = 0.5   # a run with more dead latents than this fraction is pathological


def dense_limit(top_feature_rate=0.0):
    """The firing rate above which a run's densest latent makes it pathological: 10 % of tokens,
    or, where the data has a true feature that fires more often (SynthSAEBench's feature 0 fires
    on 40 % of tokens), twice that feature's rate, at most 90 %. A latent tracking that feature
    (plus a few it absorbs) fires near its rate; the margin of 2× keeps a run from being flagged
    or not by the seed (the densest latents of the default compare fire on 43-59 % of tokens)."""
    return max(DENSE_LIMIT, min(2.0 * float(top_feature_rate), 0.9))


def is_pathological(row):
    """One run (a row of results.json) is pathological: more than half its latents dead, or its
    densest latent above dense_limit (the row's own, recorded at evaluation)."""
    return bool(row["dead_frac"] > DEAD_LIMIT or row["max_firing_freq"] > row.get("dense_limit", DENSE_LIMIT))


def mostly_pathological(s):
    """A (variant, target) summary is drawn hollow when most of its seeds are pathological."""
    return s["pathological"] * 2 > s["n"]


def verdicts(rows, variants, targets):
    """(summary, verdict): per (variant, target) means ± sds, and the verdicts by metric."""
    seeds = sorted({r["seed"] for r in rows})
    metrics = [m for m in HIGHER_BETTER if any(r.get(m) is not None for r in rows)]
    summary = []
    for v in variants:
        for t in targets:
            sel = [r for r in rows if r["variant"] == v and r["target"] == t]
            if not sel:
                continue
            s = {"variant": v, "target": t, "n": len(sel), "pathological": sum(is_pathological(r) for r in sel),
                 "settings": [r["setting"] for r in sel]}
            for k in SUMMARY_KEYS:
                s[k] = _mean_sd(r.get(k) for r in sel)
            for m in metrics:
                vals = [matched(rows, v, seed, m, t) for seed in seeds]
                # matched only when every seed reached the target (else the mean mixes seeds)
                s["matched_" + m] = _mean_sd(x for x, _ in vals) if all(x is not None for x, _ in vals) else (None, None)
                s["outside_" + m] = sum(1 for x, inside in vals if x is not None and not inside)
            summary.append(s)
    verdict = {m: _metric_verdict(summary, m, variants, targets) for m in metrics}
    if "explained_variance" in verdict:
        verdict["paper_claim"] = _paper_claim(verdict["explained_variance"], variants)
    return summary, verdict


def _pair_outcome(sa, sb, metric):
    (ma, da), (mb, db) = sa["matched_" + metric], sb["matched_" + metric]
    if ma is None or mb is None:
        return None
    spread = math.sqrt((da or 0.0) ** 2 + (db or 0.0) ** 2)
    floor = MIN_EFFECT.get(metric, 0.0)
    diff = ma - mb if HIGHER_BETTER[metric] else mb - ma  # > 0: a is better
    need = max(spread, floor)  # beyond the seeds' spread and at least the smallest difference counted
    better = "a" if diff > need else ("b" if -diff > need else "tie")
    return {"diff": ma - mb, "spread": spread, "floor": floor, "better": better}


def _metric_verdict(summary, metric, variants, targets):
    by = {(s["variant"], s["target"]): s for s in summary}
    pairs = [(a, b) for i, a in enumerate(variants) for b in variants[i + 1:]]
    per_target = []
    for t in targets:
        entry = {"target": t, "pairs": []}
        for a, b in pairs:
            if (a, t) in by and (b, t) in by:
                o = _pair_outcome(by[a, t], by[b, t], metric)
                if o:
                    entry["pairs"].append({"a": a, "b": b, **o})
        per_target.append(entry)
    return {"metric": metric, "per_target": per_target, "text": _metric_text(metric, per_target, by)}


def _difference_text(diff, spread, tie, floor=0.0):
    """'difference 0.0153 > combined spread 0.0148': as many decimals (3 to 6) as it takes for the
    two numbers to read differently and neither to read 0 unless it is; a spread of exactly 0 (one
    seed each: no sd) is said in words; where the floor (MIN_EFFECT) decided, it is named."""
    d = 3
    while d < 6 and (round(abs(diff), d) == round(spread, d) or round(spread, d) == 0 < spread
                     or round(abs(diff), d) == 0 < abs(diff)):
        d += 1
    shown = f"{diff:+.{d}f}" if tie else f"{abs(diff):.{d}f}"
    if floor > spread and (tie and abs(diff) > spread or not tie):  # the floor, not the seeds, decided
        rel = "below" if tie else "≥"
        return f"difference {shown} {rel} {floor:g}, the smallest difference counted; combined spread {spread:.{d}f}"
    if spread == 0:
        return f"difference {shown}; one seed each, so no spread to weigh it against"
    return f"difference {shown}, combined spread {spread:.{d}f}" if tie else \
        f"difference {shown} > combined spread {spread:.{d}f}"


def _metric_text(metric, per_target, by):
    name = METRIC_NAMES[metric]
    lines = []
    for e in per_target:
        t = e["target"]
        vals = ", ".join(f"{NAMES[v]} {_pm(*s['matched_' + metric])}" for (v, tt), s in by.items()
                         if tt == t and s["matched_" + metric][0] is not None)
        missed = [f"{NAMES[v]} (its runs reached L0 {_pm(*s['l0'], '{:.2f}')})" for (v, tt), s in by.items()
                  if tt == t and s["matched_" + metric][0] is None]
        lines.append(f"- L0 = {t:g}: {vals or 'no variant reached it'}."
                     + (f" Not reached, so not compared: {', '.join(missed)}." if missed else ""))
        for p in e["pairs"]:
            a, b = NAMES[p["a"]], NAMES[p["b"]]
            why = _difference_text(p["diff"], p["spread"], tie=p["better"] == "tie", floor=p.get("floor", 0.0))
            if p["better"] == "tie":
                lines.append(f"  - {a} vs {b}: no measurable difference ({why}).")
            else:
                win, lose = (a, b) if p["better"] == "a" else (b, a)
                lines.append(f"  - {win} better than {lose} ({why}).")
    return f"**{name[0].upper() + name[1:]} at matched L0** (mean ± sd over seeds):\n" + "\n".join(lines)


def _paper_claim(ev_verdict, variants):
    if "jumprelu" not in variants or not ({"gated", "topk"} & set(variants)):
        return {"holds": None, "text": "The paper's claim needs JumpReLU and Gated or TopK among --variants."}
    worse, better = {}, {}  # other variant -> the targets where JumpReLU is measurably worse / better
    for e in ev_verdict["per_target"]:
        for p in e["pairs"]:
            if "jumprelu" not in (p["a"], p["b"]) or not ({p["a"], p["b"]} & {"gated", "topk"}):
                continue
            other = p["b"] if p["a"] == "jumprelu" else p["a"]
            jump_wins = (p["better"] == "a") == (p["a"] == "jumprelu") and p["better"] != "tie"
            if p["better"] == "tie":
                continue
            (better if jump_wins else worse).setdefault(NAMES[other], []).append(f"{e['target']:g}")
    claim = ("The JumpReLU paper (arXiv 2407.14435) claims reconstruction at least as good as Gated and TopK "
             "at the same sparsity")
    judged = [e for e in ev_verdict["per_target"]
              if any("jumprelu" in (p["a"], p["b"]) for p in e["pairs"])]
    if not judged:
        return {"holds": None, "text": f"{claim}: **it cannot be judged here** — JumpReLU and the others did not "
                "reach a common target L0 (see the table)."}
    skipped = [f"{e['target']:g}" for e in ev_verdict["per_target"] if e not in judged]
    note = (f" (L0 = {', '.join(skipped)} not judged: JumpReLU or both others did not reach it)" if skipped else "")
    if worse:
        return {"holds": False, "text": f"{claim}: **it does not hold here** — JumpReLU's explained variance is "
                f"measurably below {_at_targets(worse)}{note}."}
    if better:
        return {"holds": True, "text": f"{claim}: **it holds here** — JumpReLU is measurably better than "
                f"{_at_targets(better)} and never measurably worse{note}."}
    return {"holds": True, "text": f"{claim}: **it holds here only as a tie** — no measurable difference at any "
            f"target L0{note}."}


def _and(items):
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _at_targets(by_variant):
    """{'Gated': ['8', '12'], 'TopK': ['5']} -> 'Gated at L0 = 8 and 12, and TopK at L0 = 5'."""
    parts = [f"{name} at L0 = {_and(targets)}" for name, targets in by_variant.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + ", and " + parts[-1]


def _pm(mean, sd, spec="{:.3f}"):
    if mean is None:
        return "–"
    return spec.format(mean) + ("" if sd is None else " ± " + spec.format(sd))


# ---------------------------------------------------------------------------------------------
# report.md

def dead_latent_sentence(data, d_sae):
    n = data.get("n_features")
    if data.get("type") == "synthsaebench" or (n and n > d_sae):
        return (f"Dead latents are not expected here: the data has {n} true features for {d_sae} latents, so "
                "every latent has features to learn; a run with many dead latents failed to train them.")
    if n:
        return (f"Some dead latents are expected here: {d_sae} latents for {n} planted features leave at least "
                f"{max(0.0, 1 - n / d_sae):.0%} of them without a feature of their own.")
    return ("Dead latents are not expected on real activations, which hold far more features than any SAE has "
            "latents; a run with many dead latents failed to train them.")


def wall_time_text(results):
    """'320 s', or for a resumed sweep the calls it took: '333 s over 2 calls (320 s, then 13 s
    resumed with --resume)', and, where a call before was interrupted, the runs' own times."""
    calls = results.get("calls") or [{"seconds": results["wall_seconds"], "resumed": False}]
    train = results.get("train_seconds")
    if len(calls) == 1 and not calls[0]["resumed"]:
        return f"{results['wall_seconds']:.0f} s"
    parts = [f"{c['seconds']:.0f} s" + (" resumed with --resume" if c["resumed"] else "") for c in calls]
    text = (f"{results['wall_seconds']:.0f} s over {len(calls)} calls ({', then '.join(parts)})" if len(calls) > 1
            else f"{parts[0]}")
    if not any(not c["resumed"] for c in calls):  # the first call was interrupted: its time is unknown
        text += "; the interrupted call before it is not counted"
    if train is not None:
        text += f"; the runs' recorded training times sum to {train:.0f} s"
    return text


def pathological_sentence(rows):
    """The rule that flags a run (⚠ k/n: k of its n seeds), with this sweep's own limit and the
    firing rates its densest latents actually reached."""
    limit = max((r.get("dense_limit", DENSE_LIMIT) for r in rows), default=DENSE_LIMIT)
    top = max((r.get("top_feature_rate") or 0.0 for r in rows), default=0.0)
    rule = (f"{limit:.0%} of the evaluation tokens (twice the {top:.0%} of the data's most frequent true "
            "feature: a latent tracking that feature is not pathological)" if limit > DENSE_LIMIT
            else f"{limit:.0%} of the evaluation tokens")
    text = (f"A run is flagged pathological (⚠ k/n: k of the n seeds) when more than half its latents are dead "
            f"or its densest latent fires on more than {rule}; a point is drawn hollow in the plot when most "
            "of its seeds are flagged.")
    rates = [r["max_firing_freq"] for r in rows if r.get("max_firing_freq") is not None]
    if rates:
        flagged = sum(is_pathological(r) for r in rows)
        text += (f" Here the densest latent of each run fired on {min(rates):.0%}–{max(rates):.0%} of tokens; "
                 f"{flagged} of {len(rows)} runs are flagged.")
    return text


def render_report(results):
    cfg, data, summary, verdict = results["config"], results["data"], results["summary"], results["verdict"]
    rows = results["runs"]
    names = ", ".join(NAMES[v] for v in cfg["variants"])
    lines = [f"# minisae compare: {names} at matched L0", ""]
    lines.append("## Setting\n")
    dat = {k: v for k, v in data.items() if k != "config"}
    lines.append("- Data: " + ", ".join(f"{k}={v}" for k, v in dat.items()))
    recipes = results.get("recipes") or {v: {"lr": cfg["lr"].get(v, 0)} for v in cfg["variants"]}
    lines.append(f"- Every SAE: d_sae={cfg['d_sae']}, {cfg['steps']} steps × {cfg['batch_size']} tokens; "
                 + ", ".join(f"{NAMES[v]} {tuning.setting_text(recipes[v])}" for v in cfg["variants"])
                 + (" (picked by the pilot sweep, see Recipes)" if results.get("pilot") else "")
                 + f"; target L0s {', '.join(f'{t:g}' for t in sorted({r['target'] for r in rows}))}; "
                 f"{cfg['seeds']} seeds (SAE init and data order); backend {cfg['backend']}")
    if "jumprelu" in cfg["variants"]:
        lines.append(f"- JumpReLU: the paper's L0 penalty, θ starts {'at %g' % cfg['threshold_init'] if cfg['threshold_init'] else 'calibrated from the data'}, "
                     f"ε = {recipes['jumprelu'].get('bandwidth', cfg['bandwidth']):g}, θ learning rate = {cfg['threshold_lr_mult']:g} × lr"
                     + (" (the paper's single learning rate)" if cfg["threshold_lr_mult"] == 1 else
                        " (minisae's --threshold-lr-mult; the paper uses one learning rate)"))
    warmup = cfg.get("l0_warmup_steps")
    warmup = f"{warmup} steps" if warmup is not None else "a third of the steps"
    start = l0control.START_DENSITY
    lines.append(f"- L0: TopK/BatchTopK k = target; JumpReLU and Gated: thresholds calibrated to min("
                 f"{l0control.START_FACTOR:g} × target, d_sae × {start['jumprelu']:g}, Gated d_sae × {start['gated']:g}) "
                 f"on batch 0, brought down to the target over {warmup} and held there by the L0 controller "
                 "(minisae.training.l0control); λ moves within bounds (JumpReLU's to where Adam's push on θ "
                 "balances, Gated's by the L0 error)")
    lines.append(f"- Evaluation: {cfg['eval_tokens']} held-out tokens per SAE")
    if cfg.get("max_norm_ratio"):
        lines.append(f"- Massive activations: tokens whose activation norm exceeds {cfg['max_norm_ratio']:g} × their "
                     f"batch's median were left out of the cache ({data.get('outlier_tokens_left_out', '?')} tokens) "
                     "and left unspliced in delta LM loss (their next-token losses still count)")
    lines.append(f"- Wall time: {wall_time_text(results)}\n")
    lines.append("## Verdict\n")
    if "paper_claim" in verdict:
        lines.append(verdict["paper_claim"]["text"] + "\n")
    for m in HIGHER_BETTER:
        if m in verdict:
            lines.append(verdict[m]["text"] + "\n")
    lines.append("Differences count only when larger than the combined spread sqrt(sd_a² + sd_b²) over seeds "
                 f"and at least the smallest difference counted (explained variance {MIN_EFFECT['explained_variance']:g}, "
                 f"MCC and F1 {MIN_EFFECT['mcc']:g}, delta LM loss {MIN_EFFECT['delta_lm_loss']:g}); "
                 "values are read at the exact target L0 along each seed's runs (linear in log L0).\n")
    lines += tuning.sensitivity_lines(results, NAMES)
    lines.append("## Results\n")
    has_gt = any(r.get("mcc") is not None or r.get("f1") is not None for r in rows)
    has_lm = any(r.get("delta_lm_loss") is not None for r in rows)
    head = ["variant", "target", "setting", "L0", "EV"]
    head += ["MCC", "F1", "precision", "recall", "uniq."] if has_gt else []
    head += ["ΔLM loss"] if has_lm else []
    head += ["dead %", "dense %", "shrinkage", "flag"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for s in summary:
        lam = _setting_span(s["settings"])
        cells = [NAMES[s["variant"]], f"{s['target']:g}", lam, _pm(*s["l0"], "{:.2f}"), _pm(*s["explained_variance"])]
        if has_gt:
            cells += [_pm(*s["mcc"]), _pm(*s["f1"]), _pm(*s["precision"]), _pm(*s["recall"]), _pm(*s["uniqueness"])]
        if has_lm:
            cells += [_pm(*s["delta_lm_loss"], "{:.4f}")]
        dead, dense = s["dead_frac"], s["dense_frac"]
        cells += [_pm(100 * dead[0], None if dead[1] is None else 100 * dead[1], "{:.1f}"),
                  _pm(100 * dense[0], None if dense[1] is None else 100 * dense[1], "{:.1f}"), _pm(*s["shrinkage"])]
        flag = f"⚠ {s['pathological']}/{s['n']} pathological" if s["pathological"] else ""
        cells.append(flag)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(dead_latent_sentence(data, cfg["d_sae"]) + " " + pathological_sentence(rows) + "\n")
    lines += tuning.recipe_lines(results, NAMES) + tuning.plateau_lines(results, NAMES)
    if str(data.get("config", {}).get("n_features", "")) == "16384" or cfg.get("preset") == "synthsaebench-16k":
        lines += _published_lines()
    lines.append("## Plot\n")
    if results["plot"] == "pareto.png":
        lines.append("![explained variance and feature quality against L0](pareto.png)\n")
    else:
        lines.append(f"No plot: {results['plot']}\n")
    lines.append("Columns: L0 = mean active latents per token (mean ± sd over seeds, as every cell); EV = explained "
                 "variance 1 − FVU (higher is better)"
                 + ("; MCC = mean |cos| of the decoder rows matched one-to-one to true features (Hungarian); "
                    "F1, precision, recall = each latent as a detector of its best-matching true feature, averaged "
                    "over latents; uniq. = distinct best-matching features / latents" if has_gt else "")
                 + ("; ΔLM loss = CE with the SAE spliced in minus clean CE (nats, lower is better)" if has_lm else "")
                 + "; dead = never fired on the evaluation tokens; dense = fired on > 10 % of them; shrinkage = "
                 "mean ‖x̂‖ / ‖x‖. The table shows raw values; the verdict's are matched to the exact target.")
    return "\n".join(lines) + "\n"


def _setting_span(settings):
    if len(set(settings)) == 1:
        return settings[0]
    if all(s.startswith("λ=") for s in settings):
        vals = sorted(float(s[2:]) for s in settings if s[2:] != "?")
        return f"λ={vals[0]:.3g}–{vals[-1]:.3g}" if vals else "λ=?"
    return ", ".join(sorted(set(settings)))


def _published_lines():
    out = ["## Published (SynthSAEBench-16k, width 4096, 200M samples, mean of 5 runs)\n",
           "| L0 | SAE | F1 | MCC | EV |", "|---|---|---|---|---|"]
    for l0, table in PUBLISHED.items():
        for name, (f1, mcc, ev) in table.items():
            out.append(f"| {l0} | {name} | {f1:.3f} | {mcc:.3f} | {'–' if ev is None else f'{ev:.3f}'} |")
    out.append("\nSource: the SAELens documentation's SynthSAEBench table (Chanin & Garriga-Alonso, arXiv "
               "2602.14687). Their JumpReLU is SAELens' (tanh sparsity penalty), not the paper's L0 penalty.\n")
    return out
