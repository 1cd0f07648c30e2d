"""The verdict, report.md and pareto.png of `minisae compare` (minisae.eval.compare runs the SAEs).

Matched L0. Every (variant, seed) has one run per target L0; a metric is read at each exact
target by linear interpolation in log L0 along that seed's own runs (a target outside the L0s the
seed reached takes the nearest run's value and is marked "outside"). The controller lands within
a few per cent of its targets, so the correction is small; it keeps a variant that ran slightly
denser from being credited for it.

Measurable difference. Over seeds each (variant, target) has a mean and a standard deviation; A
and B differ measurably when |mean_A − mean_B| > sqrt(sd_A² + sd_B²), their combined spread;
anything smaller is reported as "no measurable difference", never as a win.

The paper's claim (Rajamanoharan et al., arXiv 2407.14435): JumpReLU SAEs reach reconstruction
fidelity at least as good as Gated and TopK SAEs at the same sparsity. Here: JumpReLU's explained
variance is not measurably below Gated's or TopK's at any target L0. Feature quality (MCC, F1;
SynthSAEBench's metrics) is judged separately: the claim does not cover it.
"""

import math
import os
from pathlib import Path

import numpy

NAMES = {"jumprelu": "JumpReLU", "gated": "Gated", "topk": "TopK", "batchtopk": "BatchTopK",
         "matryoshka": "Matryoshka"}
HIGHER_BETTER = {"explained_variance": True, "mcc": True, "f1": True, "delta_lm_loss": False}
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
            s = {"variant": v, "target": t, "n": len(sel), "pathological": sum(r["pathological"] for r in sel),
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
    diff = ma - mb if HIGHER_BETTER[metric] else mb - ma  # > 0: a is better
    better = "a" if diff > spread else ("b" if diff < -spread else "tie")
    return {"diff": ma - mb, "spread": spread, "better": better}


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
            if p["better"] == "tie":
                lines.append(f"  - {a} vs {b}: no measurable difference (difference {p['diff']:+.3f}, "
                             f"combined spread {p['spread']:.3f}).")
            else:
                win, lose = (a, b) if p["better"] == "a" else (b, a)
                lines.append(f"  - {win} better than {lose} (difference {abs(p['diff']):.3f} > combined "
                             f"spread {p['spread']:.3f}).")
    return f"**{name[0].upper() + name[1:]} at matched L0** (mean ± sd over seeds):\n" + "\n".join(lines)


def _paper_claim(ev_verdict, variants):
    if "jumprelu" not in variants or not ({"gated", "topk"} & set(variants)):
        return {"holds": None, "text": "The paper's claim needs JumpReLU and Gated or TopK among --variants."}
    worse, better = [], []
    for e in ev_verdict["per_target"]:
        for p in e["pairs"]:
            if "jumprelu" not in (p["a"], p["b"]) or not ({p["a"], p["b"]} & {"gated", "topk"}):
                continue
            other = p["b"] if p["a"] == "jumprelu" else p["a"]
            jump_wins = (p["better"] == "a") == (p["a"] == "jumprelu") and p["better"] != "tie"
            if p["better"] == "tie":
                continue
            (better if jump_wins else worse).append(f"{NAMES[other]} at L0 = {e['target']:g}")
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
                f"measurably below {', '.join(worse)}{note}."}
    if better:
        return {"holds": True, "text": f"{claim}: **it holds here** — JumpReLU is measurably better than "
                f"{', '.join(better)} and never measurably worse{note}."}
    return {"holds": True, "text": f"{claim}: **it holds here only as a tie** — no measurable difference at any "
            f"target L0{note}."}


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


def render_report(results):
    cfg, data, summary, verdict = results["config"], results["data"], results["summary"], results["verdict"]
    rows = results["runs"]
    names = ", ".join(NAMES[v] for v in cfg["variants"])
    lines = [f"# minisae compare: {names} at matched L0", ""]
    lines.append("## Setting\n")
    dat = {k: v for k, v in data.items() if k != "config"}
    lines.append("- Data: " + ", ".join(f"{k}={v}" for k, v in dat.items()))
    lines.append(f"- Every SAE: d_sae={cfg['d_sae']}, {cfg['steps']} steps × {cfg['batch_size']} tokens, lr "
                 + ", ".join(f"{NAMES[v]} {cfg['lr'].get(v, 0):g}" for v in cfg["variants"])
                 + f"; target L0s {', '.join(f'{t:g}' for t in sorted({r['target'] for r in rows}))}; "
                 f"{cfg['seeds']} seeds (SAE init and data order); backend {cfg['backend']}")
    if "jumprelu" in cfg["variants"]:
        lines.append(f"- JumpReLU: the paper's L0 penalty, θ starts {'at %g' % cfg['threshold_init'] if cfg['threshold_init'] else 'calibrated to the target'}, "
                     f"ε = {cfg['bandwidth']:g}, θ learning rate = {cfg['threshold_lr_mult']:g} × lr"
                     + (" (the paper's single learning rate)" if cfg["threshold_lr_mult"] == 1 else
                        " (minisae's --threshold-lr-mult; the paper uses one learning rate)"))
    lines.append("- L0: TopK/BatchTopK k = target; JumpReLU and Gated: thresholds calibrated to the target, then moved "
                 "every step by the L0 controller (minisae.training.l0control); JumpReLU's λ fixed, Gated's bounded")
    lines.append(f"- Evaluation: {cfg['eval_tokens']} held-out tokens per SAE")
    lines.append(f"- Wall time: {results['wall_seconds']:.0f} s\n")
    lines.append("## Verdict\n")
    if "paper_claim" in verdict:
        lines.append(verdict["paper_claim"]["text"] + "\n")
    for m in HIGHER_BETTER:
        if m in verdict:
            lines.append(verdict[m]["text"] + "\n")
    lines.append("Differences count only when larger than the combined spread sqrt(sd_a² + sd_b²) over seeds; "
                 "values are read at the exact target L0 along each seed's runs (linear in log L0).\n")
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
    limit = max((r.get("dense_limit", 0.1) for r in rows), default=0.1)
    why = ("" if limit <= 0.1 else f" (here {limit:.0%}, 1.25 × the rate of the data's most frequent true feature: "
           "a latent tracking that feature is not pathological)")
    lines.append(dead_latent_sentence(data, cfg["d_sae"]) + " A run is flagged pathological (⚠, drawn hollow) "
                 f"when more than half its latents are dead or any latent fires on more than 10 % of tokens{why}.\n")
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


# ---------------------------------------------------------------------------------------------
# pareto.png

def pareto_plot(results, path):
    """EV (and MCC, F1 or delta LM loss) against L0 with error bars over seeds; returns
    "pareto.png" or why no plot was made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        return "matplotlib is not installed (pip install 'minisae[plot]')"
    summary, verdict, cfg = results["summary"], results["verdict"], results["config"]
    panels = [m for m in ("explained_variance", "mcc", "f1", "delta_lm_loss")
              if any(s.get(m, (None,))[0] is not None for s in summary)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.0), squeeze=False)
    markers = dict(zip(NAMES, "osD^v"))
    colors = dict(zip(NAMES, ("C0", "C1", "C2", "C3", "C4")))
    for ax, m in zip(axes[0], panels):
        for v in cfg["variants"]:
            sel = sorted((s for s in summary if s["variant"] == v), key=lambda s: s["target"])
            if not sel:
                continue
            xs = [s["l0"][0] for s in sel]
            ys = [s[m][0] for s in sel]
            ax.plot(xs, ys, color=colors[v], alpha=0.5)
            for s, x, y in zip(sel, xs, ys):
                hollow = s["pathological"] > 0
                ax.errorbar(x, y, xerr=s["l0"][1] or 0, yerr=s[m][1] or 0, fmt=markers[v], color=colors[v],
                            mfc="none" if hollow else colors[v], capsize=3, ms=7,
                            label=NAMES[v] if s is sel[0] else None)
                ax.annotate(f"{s['target']:g}: {_setting_span(s['settings'])}", (x, y), textcoords="offset points",
                            xytext=(4, -11), fontsize=7, color=colors[v])
        better = "higher" if HIGHER_BETTER[m] else "lower"
        ax.set_xlabel("L0, active latents per token (mean ± sd over seeds)")
        ax.set_ylabel(f"{METRIC_NAMES[m]} ({better} is better)")
        for axis in (ax.xaxis, ax.yaxis):
            fmt = ScalarFormatter(useOffset=False)
            fmt.set_scientific(False)
            axis.set_major_formatter(fmt)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    data = results["data"]
    fig.suptitle(f"minisae compare on {data.get('type', 'data')} (N={data.get('n_features', '?')} features, "
                 f"D={data.get('d_in')}): {cfg['d_sae']} latents, {cfg['steps']} steps, {cfg['seeds']} seeds — "
                 "labels: target L0: λ or k; hollow = pathological run", fontsize=10)
    claim = verdict.get("paper_claim", {}).get("text", "")
    fig.text(0.01, 0.01, "Verdict: " + claim.replace("**", ""), fontsize=8, wrap=True, va="bottom")
    fig.tight_layout(rect=(0, 0.07, 1, 0.94))
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path.name
