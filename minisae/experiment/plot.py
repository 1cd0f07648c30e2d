"""pareto.png of `minisae compare`: explained variance (and MCC, F1 or delta LM loss) against L0, one
line per variant, error bars over seeds, every point labelled with its target and λ or k, the
labels placed off each other, the markers and the legend (minisae.experiment.report writes the words).
"""

import os
import textwrap
from pathlib import Path

from minisae.experiment.report import HIGHER_BETTER, METRIC_NAMES, NAMES, _setting_span, mostly_pathological


def pareto_plot(results, path):
    """EV (and MCC, F1 or delta LM loss) against L0 with error bars over seeds; returns
    "pareto.png" or why no plot was made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'minisae[plot]')"
    fig = pareto_figure(results)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=FIG_DPI)
    plt.close(fig)
    os.replace(tmp, path)
    return path.name


FIG_DPI = 110
RAW_L0_NOTE = ("Points sit at the L0 each run reached (raw, mean over seeds); the verdict compares values "
               "read at the exact target L0 along each seed's runs (matched L0, see report.md).")


def pareto_figure(results):
    """The matplotlib Figure of pareto.png (laid out, labels placed; the caller saves and closes it)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    summary, verdict, cfg = results["summary"], results["verdict"], results["config"]
    panels = [m for m in ("explained_variance", "mcc", "f1", "delta_lm_loss")
              if any(s.get(m, (None,))[0] is not None for s in summary)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.0), squeeze=False, dpi=FIG_DPI)
    markers = dict(zip(NAMES, "osD^v"))
    colors = dict(zip(NAMES, ("C0", "C1", "C2", "C3", "C4")))
    labels = {}  # axis -> [(x, y, text, color)]
    for ax, m in zip(axes[0], panels):
        labels[ax] = []
        for v in cfg["variants"]:
            sel = sorted((s for s in summary if s["variant"] == v), key=lambda s: s["target"])
            if not sel:
                continue
            xs = [s["l0"][0] for s in sel]
            ys = [s[m][0] for s in sel]
            ax.plot(xs, ys, color=colors[v], alpha=0.5)
            for s, x, y in zip(sel, xs, ys):
                ax.errorbar(x, y, xerr=s["l0"][1] or 0, yerr=s[m][1] or 0, fmt=markers[v], color=colors[v],
                            mfc="none" if mostly_pathological(s) else colors[v], capsize=3, ms=7,
                            label=NAMES[v] if s is sel[0] else None)
                flag = f" ⚠{s['pathological']}/{s['n']}" if s["pathological"] else ""
                labels[ax].append((x, y, f"{s['target']:g}: {_setting_span(s['settings'])}{flag}", colors[v]))
        better = "higher" if HIGHER_BETTER[m] else "lower"
        ax.set_xlabel("L0 reached, active latents per token (raw, mean ± sd over seeds)")
        ax.set_ylabel(f"{METRIC_NAMES[m]} ({better} is better)")
        for axis in (ax.xaxis, ax.yaxis):
            fmt = ScalarFormatter(useOffset=False)
            fmt.set_scientific(False)
            axis.set_major_formatter(fmt)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if HIGHER_BETTER[m] else "upper right")  # away from the curves' far end
        ax.margins(0.12)  # room for the labels at the edges
    fig.suptitle(f"minisae compare on {_data_text(results['data'])}: {cfg['d_sae']} latents, {cfg['steps']} steps, "
                 f"{cfg['seeds']} seeds\nlabels: target L0: λ or k (⚠ k/n: k of n seeds pathological); "
                 "hollow = most seeds pathological", fontsize=10)
    claim = verdict.get("paper_claim", {}).get("text", "")
    width = int(60 * len(panels))  # characters of 8-point text across the figure
    notes = textwrap.wrap(RAW_L0_NOTE, width) + textwrap.wrap("Verdict: " + claim.replace("**", ""), width)
    line = 0.035 * 5.0 / fig.get_figheight()  # one 8-point line in figure units
    for i, text in enumerate(reversed(notes)):  # bottom up, one line each: nothing overlaps
        fig.text(0.01, 0.01 + i * line, text, fontsize=8, va="bottom")
    fig.tight_layout(rect=(0, 0.02 + len(notes) * line, 1, 0.92))
    for ax, points in labels.items():
        place_labels(ax, points)
    return fig


def _data_text(data):
    """What the data was, for the title: synthetic (N features, D) or a model's site (D)."""
    if data.get("n_features"):
        return f"{data.get('type', 'data')} (N={data['n_features']} features, D={data.get('d_in')})"
    if data.get("site"):
        return f"{Path(str(data.get('model', data.get('type', 'model')))).name} {data['site']} (D={data.get('d_in')})"
    return f"{data.get('type', 'data')} (D={data.get('d_in')})"


# candidate offsets of a label from its point, in points (x, y) with the text's alignment
_OFFSETS = [((5, -12), "left"), ((5, 5), "left"), ((-5, -12), "right"), ((-5, 5), "right"),
            ((5, -22), "left"), ((5, 15), "left"), ((-5, -22), "right"), ((-5, 15), "right"),
            ((0, -30), "center"), ((0, 24), "center")]


def place_labels(ax, points, fontsize=7):
    """Annotate each (x, y, text, color) of `ax` at the candidate offset whose text box overlaps
    least (in display pixels) with the labels placed before it, every marker of the axis, and the
    legend; returns the annotations. Call after the figure's layout is final."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    marker_px = 7 * fig.dpi / 72.0 / 2 + 2  # half a marker (ms 7) and a little air
    centres = [ax.transData.transform((x, y)) for x, y, _, _ in points]  # display pixels
    taken = [(cx - marker_px, cy - marker_px, cx + marker_px, cy + marker_px) for cx, cy in centres]
    legend = ax.get_legend()
    if legend is not None:
        b = legend.get_window_extent(renderer)
        taken.append((b.x0, b.y0, b.x1, b.y1))
    frame = ax.get_window_extent(renderer)
    out = []
    for x, y, text, color in points:
        best = None
        for (dx, dy), ha in _OFFSETS:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                              color=color, ha=ha)
            b = ann.get_window_extent(renderer)
            box = (b.x0, b.y0, b.x1, b.y1)
            cost = sum(_overlap(box, t) for t in taken)
            cost += b.width * b.height - _overlap(box, (frame.x0, frame.y0, frame.x1, frame.y1))  # outside
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        taken.append(best[2])
        out.append(best[1])
    return out


def _overlap(a, b):
    """Area shared by boxes a and b, each (x0, y0, x1, y1)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0
