"""Fair recipes for `minisae compare`: a pilot sweep per variant, the plateau check, and how far
the verdict depends on the recipe.

A comparison of SAE variants says something about the methods only when each variant trains
at settings that suit it, long enough to stop improving, and when the ordering does not hinge on
one lucky setting. Three rules, each a function here:

1. Pilot sweep. Before the main sweep, every variant trains once (seed 0, the middle target L0,
   the main sweep's length) at each setting of a small grid: its learning rate and, for JumpReLU,
   the bandwidth ε of the threshold's pseudo-derivative. (JumpReLU's θ start is not a grid axis:
   the trainer calibrates it from the data.) Each pilot SAE is scored on
   held-out tokens; the best setting is the variant's recipe, the runner-up its "next-best".
   Only runs that met the target (L0 within PILOT_L0_TOL) are eligible, so no variant is
   credited for having run denser.

       score = FVU on held-out tokens (lower is better): 1 − explained variance

2. Plateau. A run has plateaued when the last 20 % of its training changes its logged FVU by
   less than the seeds' spread of the final metric:

       change = FVU(window at the end) − FVU(window at 80 % of the steps)
       plateau ⇔ |change| ≤ max(sd over seeds of the final FVU, PLATEAU_FLOOR)

   each window the mean of the log rows within ±5 % of the steps around its point (the training
   batches' FVU is noisy; the windows average it).

3. Sensitivity. At the pilot's target every pair of variants is ordered by its score with both
   at their best settings, then again with one of them at its next-best setting. Where an
   ordering flips, the verdict depends on the recipe, and the report says so with the numbers.

Legend: a row is one trained SAE's summary (a dict with variant, setting, l0, fvu, target, ...).
"""

import math

import numpy

PILOT_LRS = (3e-3, 1e-2, 3e-2)      # around the 1e-2 that pilot runs on synthsaebench-cpu chose
PILOT_BANDWIDTHS = (1e-3, 1e-2)     # JumpReLU's ε: Gemma Scope's 0.001, and 0.01 (a tenfold wider kernel)
PILOT_L0_TOL = 0.10                 # a pilot run is eligible when |L0 / target − 1| ≤ this
FVU_FLOOR = 0.002                   # held-out FVUs closer than this order neither way (the verdict's smallest EV difference)
PLATEAU_TAIL = 0.20                 # the last fifth of training
PLATEAU_WINDOW = 0.05               # ± this fraction of the steps around each point is averaged
PLATEAU_FLOOR = 1e-3                # FVU changes below this count as flat, whatever the seeds' spread


def pilot_grid(variants, *, lrs=PILOT_LRS, bandwidths=PILOT_BANDWIDTHS):
    """{variant: [setting, ...]}; a setting is a dict of TrainConfig fields (lr, and JumpReLU's bandwidth)."""
    grid = {}
    for v in variants:
        if v == "jumprelu":
            grid[v] = [{"lr": float(lr), "bandwidth": float(bw)} for lr in lrs for bw in bandwidths]
        else:
            grid[v] = [{"lr": float(lr)} for lr in lrs]
    return grid


def setting_tag(setting):
    """A folder-safe name of a setting: {"lr": 0.01, "bandwidth": 0.001} -> "lr1e-02-bw1e-03"."""
    short = {"lr": "lr", "bandwidth": "bw"}
    return "-".join(f"{short.get(k, k)}{v:.0e}" for k, v in sorted(setting.items(), key=lambda kv: kv[0] != "lr"))


def setting_text(setting):
    """A setting as the report prints it: "lr 1e-02, ε 1e-03"."""
    names = {"lr": "lr", "bandwidth": "ε"}
    return ", ".join(f"{names.get(k, k)} {v:.0e}" for k, v in sorted(setting.items(), key=lambda kv: kv[0] != "lr"))


def eligible(row, tol=PILOT_L0_TOL):
    """True when the run met its target L0 within tol (relative) and its score is finite."""
    fvu = row.get("fvu")
    return (fvu is not None and math.isfinite(fvu) and row.get("l0") is not None
            and abs(row["l0"] / row["target"] - 1.0) <= tol)


def pick(rows, variant, *, tol=PILOT_L0_TOL):
    """(best, next_best) pilot rows of `variant` by held-out FVU among the eligible ones; either may be
    None (no eligible run; a one-setting grid has no next-best)."""
    ranked = sorted((r for r in rows if r["variant"] == variant and eligible(r, tol)), key=lambda r: r["fvu"])
    return (ranked[0] if ranked else None), (ranked[1] if len(ranked) > 1 else None)


def window_mean(log_rows, key, at, *, width=PLATEAU_WINDOW):
    """Mean of `key` over the log rows whose step lies within ±width·last_step of at·last_step
    (at least the one row nearest to that point)."""
    pts = [(r["step"], r[key]) for r in log_rows if r.get(key) is not None and math.isfinite(r[key])]
    if not pts:
        return None
    last = max(s for s, _ in pts)
    centre, half = at * last, width * last
    inside = [v for s, v in pts if abs(s - centre) <= half]
    if not inside:
        inside = [min(pts, key=lambda p: abs(p[0] - centre))[1]]
    return float(numpy.mean(inside))


def tail_change(log_rows, key="fvu", *, tail=PLATEAU_TAIL):
    """`key` at the end minus `key` at (1 − tail) of training, each a window mean (None without rows).
    The end window is centred on the last step, so it holds the last half window of rows."""
    start, end = window_mean(log_rows, key, 1.0 - tail), window_mean(log_rows, key, 1.0)
    return None if start is None or end is None else end - start


def plateau(changes, final_values, *, floor=PLATEAU_FLOOR):
    """Whether one (variant, target) has plateaued: {"change", "spread", "plateau"}.

    changes: the tail change of each seed's run; final_values: each seed's final metric. The mean
    change is compared with the seeds' standard deviation of the final metric (or `floor`)."""
    ch = [c for c in changes if c is not None]
    if not ch:
        return {"change": None, "spread": None, "plateau": None}
    vals = [v for v in final_values if v is not None and math.isfinite(v)]
    spread = float(numpy.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    change = float(numpy.mean(ch))
    return {"change": change, "spread": spread, "plateau": abs(change) <= max(spread, floor)}


def sensitivity(pilot_rows, variants, *, tol=PILOT_L0_TOL):
    """Pairs whose ordering at the pilot target flips when one variant takes its next-best setting.

    Returns (orderings, flips): for each pair (a, b) with both best settings known, the FVUs and
    which is better; each flip names the variant moved to its next-best, both FVUs and the new
    order. Lower FVU is better; scores within FVU_FLOOR order neither way (no flip is read from a tie)."""
    chosen = {v: pick(pilot_rows, v, tol=tol) for v in variants}
    orderings, flips = [], []
    pairs = [(a, b) for i, a in enumerate(variants) for b in variants[i + 1:]]
    for a, b in pairs:
        (best_a, next_a), (best_b, next_b) = chosen[a], chosen[b]
        if best_a is None or best_b is None:
            continue
        base = _order(best_a["fvu"], best_b["fvu"])
        orderings.append({"a": a, "b": b, "fvu_a": best_a["fvu"], "fvu_b": best_b["fvu"], "better": base})
        for moved, ra, rb in ((a, next_a, best_b), (b, best_a, next_b)):
            if ra is None or rb is None:
                continue
            new = _order(ra["fvu"], rb["fvu"])
            if base != "tie" and new != "tie" and new != base:
                flips.append({"a": a, "b": b, "moved": moved, "setting": (ra if moved == a else rb)["setting"],
                              "fvu_a": ra["fvu"], "fvu_b": rb["fvu"], "better": new, "was": base})
    return orderings, flips


def _order(fvu_a, fvu_b):
    """Which of two held-out FVUs is better, or "tie" when they differ by less than FVU_FLOOR."""
    return "a" if fvu_b - fvu_a >= FVU_FLOOR else ("b" if fvu_a - fvu_b >= FVU_FLOOR else "tie")


# ---------------------------------------------------------------------------------------------
# report.md sections

def sensitivity_lines(results, names):
    """The verdict's dependence on the recipe, in words with the numbers (for report.md's Verdict)."""
    pilot = results.get("pilot")
    if not pilot:
        return ["Sensitivity to the recipe: not measured (no pilot sweep: --no-pilot); every variant trained at "
                "one fixed setting, so the verdict describes that recipe, not the methods.\n"]
    t = pilot["target"]
    if not pilot["orderings"]:
        return [f"Sensitivity to the recipe: not measured (no pair of variants had a pilot run within "
                f"±{PILOT_L0_TOL:.0%} of L0 = {t:g}).\n"]
    order = "; ".join(f"{names[o['a']]} {o['fvu_a']:.4f} vs {names[o['b']]} {o['fvu_b']:.4f}" for o in pilot["orderings"])
    if not pilot["flips"]:
        return [f"Sensitivity to the recipe: at the pilot's L0 = {t:g} (one seed) no ordering of two variants "
                f"flips when either takes its next-best pilot setting (held-out FVU at the best settings: {order}; "
                f"FVUs within {FVU_FLOOR:g} count as a tie).\n"]
    flips = "; ".join(
        f"with {names[f['moved']]} at {setting_text(f['setting'])}, {names[f['a']]} {f['fvu_a']:.4f} vs "
        f"{names[f['b']]} {f['fvu_b']:.4f}" for f in pilot["flips"])
    return [f"Sensitivity to the recipe: **the ordering depends on the recipe.** At the pilot's L0 = {t:g} (one "
            f"seed), with every variant at its best setting: {order}; it flips {flips} (held-out FVU, lower is "
            "better). Read the verdict as holding for the chosen recipes only.\n"]


def recipe_lines(results, names):
    """The pilot grid, each run's held-out score, and the choices (report.md's Recipes section)."""
    pilot = results.get("pilot")
    lines = ["## Recipes\n"]
    if not pilot:
        lines.append("No pilot sweep (--no-pilot): " + ", ".join(
            f"{names[v]} at {setting_text(s)}" for v, s in results.get("recipes", {}).items()) + ".\n")
        return lines
    lines.append(f"Each variant's setting was picked by a pilot sweep: one SAE per setting (seed 0, L0 = "
                 f"{pilot['target']:g}, the main sweep's length), scored by FVU on held-out tokens among the runs "
                 f"within ±{PILOT_L0_TOL:.0%} of the target. JumpReLU's θ start is not swept: the trainer "
                 "calibrates it from the data.\n")
    lines += ["| variant | setting | L0 | FVU (held-out) | |", "|---|---|---|---|---|"]
    for r in pilot["runs"]:
        best, nxt = pilot["chosen"].get(r["variant"]), pilot["next_best"].get(r["variant"])
        mark = ("**chosen**" if best is not None and r["setting"] == best["setting"] else
                "next-best" if nxt is not None and r["setting"] == nxt["setting"] else
                ("failed: " + r["failed"][:60]) if r.get("failed") else
                "" if eligible(r) else "missed the target")
        l0 = "–" if r["l0"] is None else f"{r['l0']:.2f}"
        fvu = "–" if r["fvu"] is None else f"{r['fvu']:.4f}"
        lines.append(f"| {names[r['variant']]} | {setting_text(r['setting'])} | {l0} | {fvu} | {mark} |")
    lines.append("")
    fallback = [v for v, c in pilot["chosen"].items() if c is None]
    if fallback:
        lines.append("No pilot run of " + ", ".join(names[v] for v in fallback) + f" met the target within "
                     f"±{PILOT_L0_TOL:.0%}, so " + ("it" if len(fallback) == 1 else "they") + " trained at the default "
                     "setting (" + ", ".join(setting_text(results["recipes"][v]) for v in fallback) + ").\n")
    return lines


def plateau_lines(results, names):
    """Whether each (variant, target) trained to a plateau (report.md's Plateau section)."""
    rows = results.get("plateau") or []
    lines = ["## Trained to a plateau?\n",
             f"The training batches' FVU over the last {PLATEAU_TAIL:.0%} of steps (mean over seeds of each run's "
             f"end window minus its window at {1 - PLATEAU_TAIL:.0%}) against the seeds' standard deviation of "
             f"the held-out FVU (at least {PLATEAU_FLOOR:g}).\n",
             "| variant | target | FVU change, last 20 % | seeds' sd | plateau |", "|---|---|---|---|---|"]
    for p in rows:
        ch = "–" if p["change"] is None else f"{p['change']:+.4f}"
        sd = "–" if p["spread"] is None else f"{p['spread']:.4f}"
        ok = {True: "yes", False: "**no**", None: "–"}[p["plateau"]]
        lines.append(f"| {names[p['variant']]} | {p['target']:g} | {ch} | {sd} | {ok} |")
    still = [p for p in rows if p["plateau"] is False]
    lines.append("")
    if still:
        lines.append(f"{len(still)} of {len(rows)} settings were still changing at the end (the last tenth "
                     "decays the learning rate): more steps would move them, so differences of that size are not "
                     "the methods'.\n")
    return lines
