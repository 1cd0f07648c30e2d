"""`minisae compare`: JumpReLU vs Gated vs TopK over a sparsity sweep on the same activations.

    results = run_compare(CompareConfig(), "compare_out")   # synthetic data, about 10 min on 2 cores

Every variant trains with the same data, steps, batch size and width; each point of the sweep is
one λ (JumpReLU, Gated) or one k (TopK). The verdict on the paper's ordering (JumpReLU ≥ Gated ≥
TopK: lower FVU at equal L0) compares the Pareto frontiers at matched L0: each variant's frontier
(running minimum of FVU as L0 grows) is interpolated linearly in (log L0, log FVU) on a common
grid over the L0 range all variants cover, and the geometric-mean FVU ratio of each pair is
reported. A pair "A ≥ B" counts as holding when A's FVU is on average no more than TOLERANCE above
B's; the report prints the ratios so the reader can judge for themselves.

out/ holds report.md, results.json, pareto.png (matplotlib, optional: `pip install
'minisae[plot]'`) and runs/<variant>-<i>/ (each a full training folder, see minisae.train).
All three files are written atomically; an existing comparison is not overwritten unless force=True
(`--overwrite`), and a folder holding anything else is refused.
"""

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy

from minisae.errors import OutputExistsError
from minisae.io.files import atomic_path, check_output_dir, is_temp_name, make_dir, write_atomic
from minisae.progress import progress_bar
from minisae.train import TrainConfig, train

VARIANT_NAMES = {"jumprelu": "JumpReLU", "gated": "Gated", "topk": "TopK"}
ORDER = ("jumprelu", "gated", "topk")  # the paper's claimed ordering, best first
TOLERANCE = 0.02  # "A ≥ B" holds when the mean FVU ratio A/B is at most 1 + TOLERANCE

# The default setting, measured to take about 10 minutes on 2 CPU cores (see docs/pipeline.md).
DEFAULT_SYNTHETIC = dict(d_in=64, n_features=256, target_l0=6.0, max_freq=0.05, freq_exponent=1.0,
                         magnitude_mean=1.0, magnitude_std=0.25, offset_norm=1.0, noise_std=0.01, seed=0)
DEFAULT_SWEEP = {
    "jumprelu": [6e-3, 9e-3, 1.2e-2, 2e-2],
    "gated": [0.15, 0.25, 0.4, 0.6],
    "topk": [3, 6, 10, 16],
}
# Tuned in pilot runs of this setting (docs/pipeline.md): 2e-3 was too slow for all three variants
# (JumpReLU and Gated kept near-random decoders); 1e-2 was best for Gated and TopK, 3e-3 for JumpReLU.
DEFAULT_LR = {"jumprelu": 3e-3, "gated": 1e-2, "topk": 1e-2}


@dataclasses.dataclass
class CompareConfig:
    d_sae: int = 512                      # M, latents of every SAE
    steps: int = 12000                    # optimiser steps per SAE
    batch_size: int = 512                 # tokens per step
    sweep: dict = dataclasses.field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_SWEEP.items()})
    lr: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_LR))  # per variant
    warmup_steps: int = 200               # cosine lr warm-up
    sparsity_warmup_steps: int = 2400     # linear λ warm-up (JumpReLU, Gated)
    decay_frac: float = 0.2               # linear lr decay over the last 20% of steps
    dead_window_tokens: int = 200_000     # TopK AuxK / dead statistics window
    threshold_init: float | None = None   # JumpReLU θ at init (None = SPEC's 0.001)
    bandwidth: float = 0.001              # JumpReLU kernel bandwidth ε (SPEC)
    seed: int = 0
    backend: str = "numpy"
    dtype: str = "float32"
    eval_tokens: int = 32768
    synthetic: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_SYNTHETIC))
    lm_tokens: int = 8192                 # scored tokens for delta LM loss (Gemma 2 runs)
    lm_batch_size: int = 2
    seq_len: int = 1024
    jobs: int | None = None               # training processes; None = min(2, CPUs) on NumPy, 1 on CuPy

    def train_config(self, architecture, setting):
        extra = {"k": int(setting)} if architecture == "topk" else {"sparsity_coeff": float(setting)}
        return TrainConfig(
            architecture=architecture, d_sae=self.d_sae, steps=self.steps, batch_size=self.batch_size,
            lr=self.lr.get(architecture), warmup_steps=self.warmup_steps,
            sparsity_warmup_steps=self.sparsity_warmup_steps, decay_frac=self.decay_frac,
            dead_window_tokens=self.dead_window_tokens, seed=self.seed, backend=self.backend,
            dtype=self.dtype, threshold_init=self.threshold_init,
            bandwidth=self.bandwidth, eval_tokens=self.eval_tokens, checkpoint_every=max(1, self.steps // 4),
            log_every=max(1, self.steps // 50), **extra)


def quick_config():
    """A tiny sweep (seconds) for smoke tests: D=16, F=64 planted features, M=64 latents. JumpReLU
    starts at θ = 0.1 here: 150 steps cannot move log θ far from SPEC's 0.001."""
    return CompareConfig(
        d_sae=64, steps=150, batch_size=256, warmup_steps=10, sparsity_warmup_steps=40, eval_tokens=4096,
        dead_window_tokens=4096, threshold_init=0.1, lr={"jumprelu": 1e-2, "gated": 1e-2, "topk": 1e-2},
        sweep={"jumprelu": [0.02, 0.08], "gated": [0.1, 0.4], "topk": [3, 10]},
        synthetic=dict(DEFAULT_SYNTHETIC, d_in=16, n_features=64, target_l0=3.0, max_freq=0.1),
        lm_tokens=256, seq_len=64)


def run_compare(cfg, out_dir, *, source=None, model=None, tokenizer=None, eval_texts=None, site=None,
                data_description=None, force=False, resume=False, progress=True):
    """Train the sweep, evaluate every SAE, write report.md / results.json / pareto.png; return results.

    With cfg.jobs > 1 the SAEs train in that many worker processes, each with single-threaded BLAS
    (on small matrices one BLAS thread per process beats threads fighting over the cores); the
    source is rebuilt in each worker from its description, so it must be synthetic or a cache
    (any other source trains in this process). Workers are spawned, so a script that calls this
    with jobs > 1 needs the usual `if __name__ == "__main__":` guard.
    """
    out = Path(out_dir)
    check_output_dir(out, "compare report", is_own=is_compare_folder)
    if (out / "report.md").exists() or (out / "results.json").exists() or (out / "runs").exists():
        if not (force or resume):
            raise OutputExistsError(f"{out} already holds a comparison; pass --overwrite to start it over "
                                    "or --resume to finish an interrupted sweep")
    if source is None:
        from minisae.data.synthetic import SyntheticActivations, SyntheticConfig

        source = SyntheticActivations(SyntheticConfig(**cfg.synthetic))
        data_description = data_description or _synthetic_description(source)
    jobs = [(arch, i, s) for arch in ORDER for i, s in enumerate(cfg.sweep.get(arch, []))]
    if not jobs:
        raise ValueError("the sweep is empty: give at least one λ or k")
    for arch, _, setting in jobs:  # every setting checked (k <= d_sae, λ >= 0, ...) before any SAE trains
        cfg.train_config(arch, setting).resolved(int(source.d_in))
    make_dir(out)
    spec = _source_spec(source)
    n_workers = cfg.jobs if cfg.jobs is not None else (min(2, os.cpu_count() or 1) if cfg.backend == "numpy" else 1)
    n_workers = max(1, min(n_workers, len(jobs))) if spec is not None else 1
    t_start = time.time()
    rows = [None] * len(jobs)
    outer = _bar(progress, len(jobs))

    def finish(j, summary, seconds):
        arch, i, setting = jobs[j]
        row = {"architecture": arch, "setting_name": _setting_label(arch), "setting": setting,
               "run_dir": str(Path("runs") / f"{arch}-{i}")}
        row.update({k: v for k, v in summary.items() if k != "firing_freq"})
        row["train_seconds"] = round(seconds, 2)
        rows[j] = row
        outer.set_postfix(L0=f"{row['l0']:.1f}", FVU=f"{row['fvu']:.4f}")
        outer.update(1)

    args = [(cfg.train_config(a, s), str(out / "runs" / f"{a}-{i}"), resume, force) for a, i, s in jobs]
    try:
        if n_workers == 1:
            for j, (arch, i, setting) in enumerate(jobs):
                outer.set_description(f"{VARIANT_NAMES[arch]} {_setting_label(arch)}={setting:g}")
                finish(j, *_train_job(source, *args[j], progress="nested" if progress else False))
        else:
            outer.set_description(f"{len(jobs)} SAEs, {n_workers} processes")
            _run_in_workers(spec, args, n_workers, finish)
    finally:
        outer.close()
    if model is not None:
        from minisae.evaluate import evaluate_lm
        from minisae.io.saefile import SAE

        for row in rows:
            sae = SAE.load(out / row["run_dir"] / "sae", xp=model.xp)
            row.update(evaluate_lm(sae, model, tokenizer, eval_texts, site, seq_len=cfg.seq_len,
                                   batch_size=cfg.lm_batch_size, max_tokens=cfg.lm_tokens, progress=progress))
    results = {
        "config": dataclasses.asdict(cfg),
        "data": data_description or {"type": type(source).__name__, "d_in": source.d_in},
        "runs": rows,
        "verdict": {"fvu": ordering_verdict(rows, "fvu")},
        "wall_seconds": round(time.time() - t_start, 1),
    }
    if rows and all(r.get("delta_lm_loss") is not None for r in rows):
        results["verdict"]["delta_lm_loss"] = ordering_verdict(rows, "delta_lm_loss")
    results["plot"] = pareto_plot(rows, out / "pareto.png")
    _write_atomic(out / "results.json", json.dumps(results, indent=2, default=_json_default) + "\n")
    _write_atomic(out / "report.md", render_report(results))
    return results


def _train_job(source, train_cfg, run_dir, resume, force, progress=False):
    t0 = time.time()
    res = train(train_cfg, source, run_dir, resume=resume, overwrite=force, progress=progress)
    return {k: v for k, v in res.summary.items() if k != "firing_freq"}, time.time() - t0


def _source_spec(source):
    """A picklable description a worker rebuilds the source from (None: train in this process)."""
    from minisae.data.activations import ActivationStore
    from minisae.data.synthetic import SyntheticActivations

    if isinstance(source, SyntheticActivations):
        return ("synthetic", dataclasses.asdict(source.cfg))
    if isinstance(source, ActivationStore):
        return ("activations", str(source.folder), source.seed, int(source.holdout_rows.size))
    return None


_WORKER_SOURCE = {}


def _worker_job(spec, *args):
    key = json.dumps(spec)
    if key not in _WORKER_SOURCE:  # one source per worker process, built on its first job
        if spec[0] == "synthetic":
            from minisae.data.synthetic import SyntheticActivations, SyntheticConfig

            _WORKER_SOURCE[key] = SyntheticActivations(SyntheticConfig(**spec[1]))
        else:
            from minisae.data.activations import ActivationStore

            _WORKER_SOURCE[key] = ActivationStore(spec[1], seed=spec[2], holdout_tokens=spec[3])
    return _train_job(_WORKER_SOURCE[key], *args)


_ONE_THREAD = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _run_in_workers(spec, args, n_workers, finish):
    import concurrent.futures
    import multiprocessing

    saved = {k: os.environ.get(k) for k in _ONE_THREAD}
    os.environ.update({k: "1" for k in _ONE_THREAD})  # read by each worker's BLAS at start-up
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
            futures = {pool.submit(_worker_job, spec, *a): j for j, a in enumerate(args)}
            try:
                for fut in concurrent.futures.as_completed(futures):
                    finish(futures[fut], *fut.result())
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# the verdict: Pareto frontiers compared at matched L0

def frontier(points):
    """Pareto frontier of (L0, y) points: sorted by L0, y replaced by its running minimum."""
    pts = sorted((float(l0), float(y)) for l0, y in points if l0 > 0 and math.isfinite(y))
    out, best = [], math.inf
    for l0, y in pts:
        best = min(best, y)
        out.append((l0, best))
    return out


def interpolate(front, l0s):
    """Frontier values at l0s, linear in (log L0, log y) (log dropped for y ≤ 0)."""
    xs = numpy.log([p[0] for p in front])
    ys = numpy.array([p[1] for p in front])
    positive = bool((ys > 0).all())
    yv = numpy.log(ys) if positive else ys
    v = numpy.interp(numpy.log(l0s), xs, yv)
    return numpy.exp(v) if positive else v


def ordering_verdict(rows, metric="fvu", n_grid=25):
    """Pairwise comparison of the variants' frontiers of `metric` against L0 at matched L0."""
    fronts = {a: frontier([(r["l0"], r[metric]) for r in rows if r["architecture"] == a]) for a in ORDER}
    fronts = {a: f for a, f in fronts.items() if f}
    pairs = []
    for a, b in ((ORDER[0], ORDER[1]), (ORDER[1], ORDER[2]), (ORDER[0], ORDER[2])):
        if a not in fronts or b not in fronts:
            continue
        lo = max(fronts[a][0][0], fronts[b][0][0])
        hi = min(fronts[a][-1][0], fronts[b][-1][0])
        pair = {"a": a, "b": b, "l0_range": [lo, hi]}
        if lo > hi:
            pair.update(overlap=False, holds=None)
        else:
            grid = numpy.exp(numpy.linspace(math.log(lo), math.log(hi), n_grid)) if hi > lo else numpy.array([lo])
            ya, yb = interpolate(fronts[a], grid), interpolate(fronts[b], grid)
            if metric == "fvu":
                ratio = float(numpy.exp(numpy.mean(numpy.log(ya / yb))))
                pair.update(overlap=True, mean_ratio=ratio, frac_a_better=float(numpy.mean(ya <= yb)),
                            holds=ratio <= 1.0 + TOLERANCE)
            else:  # delta LM loss may be ≤ 0: compare mean differences instead of ratios
                diff = float(numpy.mean(ya - yb))
                scale = float(numpy.mean(numpy.abs(yb))) or 1.0
                pair.update(overlap=True, mean_diff=diff, frac_a_better=float(numpy.mean(ya <= yb)),
                            holds=diff <= TOLERANCE * scale)
        pairs.append(pair)
    main = [p for p in pairs if (p["a"], p["b"]) in ((ORDER[0], ORDER[1]), (ORDER[1], ORDER[2]))]
    if len(main) < 2 or any(p["holds"] is None for p in main):
        holds = None
    else:
        holds = all(p["holds"] for p in main)
    return {"metric": metric, "holds": holds, "pairs": pairs, "text": _verdict_text(metric, holds, pairs)}


def _verdict_text(metric, holds, pairs):
    name = "FVU" if metric == "fvu" else "delta LM loss"
    claim = f"JumpReLU ≥ Gated ≥ TopK (lower {name} at equal L0)"
    if holds is None:
        head = f"The paper's ordering {claim} cannot be judged here: the variants' L0 ranges do not overlap enough."
    elif holds:
        head = f"The paper's ordering {claim} holds on this data (within {TOLERANCE:.0%})."
    else:
        failed = [f"{VARIANT_NAMES[p['a']]} ≥ {VARIANT_NAMES[p['b']]}" for p in pairs
                  if p["holds"] is False and (p["a"], p["b"]) != (ORDER[0], ORDER[2])]
        head = (f"The paper's ordering {claim} does NOT hold on this data: "
                + " and ".join(failed) + " fail" + ("s" if len(failed) == 1 else "") + ".")
    lines = [head]
    for p in pairs:
        a, b = VARIANT_NAMES[p["a"]], VARIANT_NAMES[p["b"]]
        if not p["overlap"]:
            lines.append(f"- {a} vs {b}: L0 ranges do not overlap; no matched comparison.")
            continue
        lo, hi = p["l0_range"]
        better = f"{a} is lower at {p['frac_a_better']:.0%} of matched L0 values in [{lo:.3g}, {hi:.3g}]"
        if metric == "fvu":
            lines.append(f"- {a} vs {b}: mean FVU ratio {a}/{b} = {p['mean_ratio']:.3f}; {better}.")
        else:
            lines.append(f"- {a} vs {b}: mean difference {a} − {b} = {p['mean_diff']:+.4g} nats; {better}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the report

def render_report(results):
    rows, cfg = results["runs"], results["config"]
    has_lm = any(r.get("delta_lm_loss") is not None for r in rows)
    has_rec = any(r.get("mmcs") is not None for r in rows)
    data = results["data"]
    lines = ["# minisae compare: JumpReLU vs Gated vs TopK", ""]
    lines.append("## Setting\n")
    lines.append("- Data: " + ", ".join(f"{k}={v}" for k, v in data.items()))
    lines.append(f"- Every SAE: d_sae={cfg['d_sae']}, {cfg['steps']} steps × {cfg['batch_size']} tokens, "
                 f"seed {cfg['seed']}, backend {cfg['backend']}, learning rates "
                 + ", ".join(f"{VARIANT_NAMES[a]} {lr:g}" for a, lr in cfg["lr"].items() if lr is not None))
    lines.append(f"- Evaluation: {cfg['eval_tokens']} held-out tokens"
                 + (f"; delta LM loss on {rows[0].get('lm_tokens')} scored tokens" if has_lm else ""))
    lines.append(f"- Wall time: {results['wall_seconds']:.0f} s\n")
    lines.append("## Verdict\n")
    for v in results["verdict"].values():
        lines.append(v["text"] + "\n")
    head = ["setting", "L0", "FVU"]
    if has_lm:
        head += ["ΔLM loss", "loss rec."]
    head += ["dead %", "dense %", "γ"]
    if has_rec:
        head += ["MMCS", "recovered %"]
    for arch in ORDER:
        sel = [r for r in rows if r["architecture"] == arch]
        if not sel:
            continue
        lines.append(f"## {VARIANT_NAMES[arch]}\n")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in sel:
            cells = [f"{r['setting_name']}={r['setting']:g}", f"{r['l0']:.2f}", f"{r['fvu']:.4f}"]
            if has_lm:
                cells += [_fmt(r.get("delta_lm_loss"), "{:.4f}"), _fmt(r.get("loss_recovered"), "{:.3f}")]
            cells += [f"{100 * r['dead_frac']:.1f}", f"{100 * r['dense_frac']:.1f}", f"{r['rel_recon_bias']:.3f}"]
            if has_rec:
                cells += [_fmt(r.get("mmcs"), "{:.3f}"), _fmt(r.get("frac_recovered"), "{:.1%}", strip="%")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("## Pareto plot\n")
    if results["plot"] == "pareto.png":
        lines.append("![FVU (and delta LM loss) against L0](pareto.png)\n")
    else:
        lines.append(f"No plot: {results['plot']}\n")
    lines.append("Columns: L0 = mean active latents per token; FVU = fraction of variance unexplained; "
                 "dead = never fired on the evaluation tokens; dense = fired on > 10% of them; "
                 "γ = relative reconstruction bias (1 = no shrinkage)"
                 + ("; MMCS = mean max cosine similarity of the planted directions with decoder rows, "
                    "recovered = planted directions matched at cosine ≥ 0.9" if has_rec else "")
                 + ("; ΔLM loss = CE with the SAE spliced in minus clean CE (nats), loss rec. = "
                    "(CE_zero − CE_sae) / (CE_zero − CE_clean)" if has_lm else "") + ".")
    return "\n".join(lines) + "\n"


def _fmt(v, spec, strip=None):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    s = spec.format(v)
    return s.rstrip(strip) if strip else s


def pareto_plot(rows, path):
    """Write FVU (and delta LM loss) against L0; returns "pareto.png" or why no plot was made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'minisae[plot]')"
    has_lm = any(r.get("delta_lm_loss") is not None for r in rows)
    panels = [("fvu", "FVU")] + ([("delta_lm_loss", "delta LM loss (nats)")] if has_lm else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for arch, marker in zip(ORDER, "os^"):
            pts = sorted((r["l0"], r[key]) for r in rows if r["architecture"] == arch and r.get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=VARIANT_NAMES[arch])
        ax.set_xscale("log")
        if key == "fvu":
            ax.set_yscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path.name


def _setting_label(arch):
    return "k" if arch == "topk" else "λ"


def _synthetic_description(source):
    c = source.cfg
    return {"type": "synthetic", "d_in": c.d_in, "n_features": c.n_features, "true_l0": round(source.expected_l0, 3),
            "max_freq": c.max_freq, "offset_norm": c.offset_norm, "noise_std": c.noise_std, "seed": c.seed}


def _write_atomic(path, text):
    write_atomic(path, text)


_COMPARE_NAMES = {"runs", "activations", "report.md", "results.json", "pareto.png"}


def is_compare_folder(folder):
    """True when `folder` holds what run_compare writes and nothing else."""
    names = {p.name for p in Path(folder).iterdir() if not is_temp_name(p.name)}
    return bool(names) and names <= _COMPARE_NAMES


def _json_default(o):
    if isinstance(o, numpy.generic):
        return o.item()
    if isinstance(o, numpy.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _bar(enabled, total):
    return progress_bar(total, enabled=bool(enabled), desc="compare", unit="SAE", position=0)
