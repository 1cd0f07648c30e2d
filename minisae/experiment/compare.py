"""`minisae compare`: SAE variants trained to the same target L0s on the same data, over seeds.

    results = run_compare(CompareConfig(), "compare_out")   # SynthSAEBench (CPU size), ~10 min on 2 cores

The default data is SynthSAEBench (Chanin & Garriga-Alonso, arXiv 2602.14687; minisae.data.
synthsaebench) at CPU size: far more true features than latents, Zipfian and correlated firing,
a hierarchy, and known true features, so feature quality (MCC, F1) is measured beside
reconstruction. Every variant (JumpReLU, Gated and TopK by default; BatchTopK and Matryoshka
BatchTopK with --variants) trains at each target L0 with each seed on the same activations:
TopK/BatchTopK through k, JumpReLU (the paper's L0 penalty) and Gated through the L0 controller
(minisae.training.l0control: thresholds calibrated from the data, brought down to the target over
an L0 warm-up, then held there). Each number in the report is a mean ± standard deviation over seeds (the SAE's
initialisation and the data order change with the seed; the data-generating model does not).

The verdict (minisae.experiment.report) is made at matched L0: each run's explained variance (and MCC,
F1) is read off its own seed's curve through the three targets at the exact target L0 (linear in
log L0), which corrects the small misses of the controller; a difference between two variants
smaller than their combined spread sqrt(sd_a² + sd_b²) is "no measurable difference".

The synthetic training data is generated once into out/data/ (an activation cache, the format of
`minisae cache`) and every SAE reads it from there; the evaluation set (with its true codes) is
generated once in this process, and every SAE is evaluated on it here after training.

out/ holds report.md, results.json, pareto.png (matplotlib, optional: `pip install 'minisae[plot]'`),
data/ and runs/<variant>-L0<target>-s<seed>/ (each a full training folder, see minisae.training.train).
"""

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy

from minisae.errors import DependencyError, InputError, OutputExistsError
from minisae.experiment import tuning, workers
from minisae.experiment.plot import pareto_plot
from minisae.experiment.report import DENSE_LIMIT, NAMES, dense_limit, is_pathological, render_report, verdicts
from minisae.io.files import check_output_dir, is_temp_name, make_dir, write_atomic
from minisae.progress import progress_bar
from minisae.training.train import TrainConfig

PAPER_VARIANTS = ("jumprelu", "gated", "topk")  # the JumpReLU paper's comparison (arXiv 2407.14435)

# The planted-dictionary toy of the first release (preset "toy").
DEFAULT_SYNTHETIC = dict(d_in=64, n_features=256, target_l0=6.0, max_freq=0.05, freq_exponent=1.0,
                         magnitude_mean=1.0, magnitude_std=0.25, offset_norm=1.0, noise_std=0.01, seed=0)
# Learning rates chosen in pilot runs on synthsaebench-cpu (docs/pipeline.md): the recipes' own rates
# (7e-5 JumpReLU, 3e-4 Gated) need the published 200k steps; a few thousand steps need ~1e-2.
DEFAULT_LR = {"jumprelu": 1e-2, "gated": 1e-2, "topk": 1e-2, "batchtopk": 1e-2, "matryoshka": 1e-2}
# Targets: the published sweep spans L0 15-45 around the 16k model's true L0 of 34.5; the CPU preset's
# true L0 is 10.9, so its targets are the published 15 / 25 / 40 scaled by 10.9 / 34.5.
DEFAULT_TARGETS = {"synthsaebench-cpu": [5.0, 8.0, 12.0], "synthsaebench-16k": [15.0, 25.0, 40.0], "toy": [3.0, 6.0, 10.0]}
# On a language model's activations (--model): the JumpReLU paper's Figure 2 spans L0 ≈ 10-150 on Gemma 2 9B
# (d_model 3584); a 640-wide Gemma 3 270M site at 4 × 640 latents gets three octaves in that range.
REAL_TARGETS = (16.0, 32.0, 64.0)
REAL_PILOT_LRS = (1e-3, 3e-3, 1e-2)  # compare --model: Gemma 3 270M chose 1e-3 (JumpReLU, Gated) and 3e-3 (TopK)
REAL_MAX_NORM_RATIO = 5.0  # compare --model: tokens over 5 × the median norm are left out (norm_outliers)
REAL_LATENTS_PER_WIDTH = 4  # compare --model: M = 4 × the site's width
REAL_TOKENS = 1_000_000  # compare --model: activations cached for training (--quick: REAL_QUICK_TOKENS)
REAL_QUICK_TOKENS = 16_384


def model_defaults(width, *, quick=False):
    """What a comparison on a language model's activations at a site `width` wide changes from
    the synthetic defaults, as {CompareConfig field: value}, plus "tokens" (how many to cache):
    M = REAL_LATENTS_PER_WIDTH × width, the pilot grid REAL_PILOT_LRS (the synthetic grid's
    rates collapse JumpReLU and Gated there), the targets REAL_TARGETS, tokens over
    REAL_MAX_NORM_RATIO × their batch's median norm left out (massive activations,
    docs/real_model.md), REAL_TOKENS cached. quick (a smoke test) keeps quick_config's sizes,
    targets and grid. `minisae compare --model` applies each where its flag is not given."""
    out = {"max_norm_ratio": REAL_MAX_NORM_RATIO, "tokens": REAL_QUICK_TOKENS if quick else REAL_TOKENS}
    if not quick:
        out.update(d_sae=REAL_LATENTS_PER_WIDTH * width, pilot_lrs=list(REAL_PILOT_LRS), targets=list(REAL_TARGETS))
    return out


@dataclasses.dataclass
class CompareConfig:
    preset: str = "synthsaebench-cpu"     # data: synthsaebench-cpu | synthsaebench-16k | toy
    variants: list = dataclasses.field(default_factory=lambda: list(PAPER_VARIANTS))
    targets: list | None = None           # target L0s; None = DEFAULT_TARGETS[preset]
    seeds: int = 3                        # seeds 0 .. seeds-1 per (variant, target)
    d_sae: int = 512                      # M, latents of every SAE
    steps: int = 3000                     # optimiser steps per SAE
    batch_size: int = 512                 # tokens per step
    lr: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_LR))  # per variant
    warmup_steps: int = 100               # cosine lr warm-up
    sparsity_warmup_steps: int = 300      # linear λ warm-up (the L0 controller acts from step 0)
    l0_warmup_steps: int | None = None    # the controller's target descends to each target over these (None: a third of the steps)
    decay_frac: float = 0.1               # linear lr decay over the last 10% of steps
    dead_window_tokens: int = 200_000     # TopK AuxK / dead statistics window
    threshold_init: float | None = None   # JumpReLU θ at init; None: calibrated to each target (l0control)
    threshold_lr_mult: float = 1.0        # JumpReLU θ learning rate × this (1 = the paper's single lr)
    bandwidth: float = 0.001              # JumpReLU kernel bandwidth ε (Gemma Scope's)
    cache_tokens: int = 1 << 19           # synthetic data generated once (longer runs re-read it, reshuffled)
    backend: str = "numpy"
    dtype: str = "float32"
    eval_tokens: int = 16384
    synthetic: dict = dataclasses.field(default_factory=dict)  # overrides of the preset's data config
    lm_tokens: int = 8192                 # scored tokens for delta LM loss (Gemma runs)
    lm_batch_size: int = 2
    max_norm_ratio: float | None = None   # Gemma runs: tokens over this × the median norm not cached, not spliced
    seq_len: int = 1024
    jobs: int | None = None               # training processes; None = min(2, CPUs) on NumPy, 1 on CuPy
    pilot: bool = True                    # pick each variant's lr (JumpReLU: and ε) by a pilot sweep first
    pilot_lrs: list = dataclasses.field(default_factory=lambda: list(tuning.PILOT_LRS))
    pilot_bandwidths: list = dataclasses.field(default_factory=lambda: list(tuning.PILOT_BANDWIDTHS))

    def target_list(self):
        return list(self.targets) if self.targets else list(DEFAULT_TARGETS.get(self.preset, [5.0, 8.0, 12.0]))

    def pilot_target(self):
        """The target L0 the pilot sweep runs at: the middle one."""
        targets = sorted(self.target_list())
        return targets[len(targets) // 2]

    def default_recipe(self, variant):
        """The setting a variant trains at without a pilot sweep: --lr (and JumpReLU's --bandwidth)."""
        return {"lr": self.lr.get(variant), **({"bandwidth": self.bandwidth} if variant == "jumprelu" else {})}

    def train_config(self, variant, target, seed, recipe=None):
        """The TrainConfig of one SAE; `recipe` (a pilot setting: lr, bandwidth) overrides the defaults."""
        arch = "batchtopk" if variant == "matryoshka" else variant
        recipe = recipe or self.default_recipe(variant)
        extra = {}
        if arch == "jumprelu":
            extra = dict(threshold_init=self.threshold_init, threshold_lr_mult=self.threshold_lr_mult,
                         bandwidth=recipe.get("bandwidth", self.bandwidth))
        if variant == "matryoshka":  # nested prefixes M/4 < M/2 < M (Bussmann et al., arXiv 2503.17547)
            extra["matryoshka"] = [self.d_sae // 4, self.d_sae // 2, self.d_sae]
        return TrainConfig(
            architecture=arch, d_sae=self.d_sae, target_l0=float(target), steps=self.steps,
            batch_size=self.batch_size, lr=recipe.get("lr", self.lr.get(variant)), warmup_steps=self.warmup_steps,
            sparsity_warmup_steps=self.sparsity_warmup_steps,
            l0_warmup_steps=self.l0_warmup_steps if arch in ("jumprelu", "gated") else None, decay_frac=self.decay_frac,
            dead_window_tokens=self.dead_window_tokens, seed=seed, backend=self.backend, dtype=self.dtype,
            eval_tokens=0, checkpoint_every=max(1, self.steps // 4), log_every=max(1, self.steps // 50), **extra)


def quick_config():
    """A tiny comparison (seconds) for smoke tests: SynthSAEBench at N=256, D=16, M=32 latents."""
    return CompareConfig(
        d_sae=32, steps=250, batch_size=128, warmup_steps=10, sparsity_warmup_steps=20, eval_tokens=2048,
        dead_window_tokens=4096, targets=[2.0, 4.0], seeds=2, cache_tokens=8192,
        synthetic=dict(n_features=256, d_in=16, n_roots=2, corr_rank=4, ortho_steps=5, ortho_lr=1e-2),
        lm_tokens=256, seq_len=64, pilot_lrs=[1e-2, 3e-2], pilot_bandwidths=[1e-3])


def make_source(cfg):
    """The data source of a synthetic preset (SynthSAEBench or the toy planted dictionary)."""
    if cfg.preset == "toy":
        from minisae.data.synthetic import SyntheticActivations, SyntheticConfig

        return SyntheticActivations(SyntheticConfig(**{**DEFAULT_SYNTHETIC, **cfg.synthetic}))
    from minisae.data.synthsaebench import SynthSAEBench, preset_config

    return SynthSAEBench(preset_config(cfg.preset, **cfg.synthetic))


def _preset_d_in(cfg):
    if cfg.preset == "toy":
        return int({**DEFAULT_SYNTHETIC, **cfg.synthetic}["d_in"])
    from minisae.data.synthsaebench import preset_config

    return int(preset_config(cfg.preset, **cfg.synthetic).d_in)


def _check(cfg):
    bad = [v for v in cfg.variants if v not in NAMES]
    if bad or not cfg.variants:
        raise InputError(f"--variants: expected some of {', '.join(NAMES)}, found {bad or 'none'}")
    if cfg.seeds < 1 or any(not (0 < t <= cfg.d_sae) for t in cfg.target_list()):
        raise InputError(f"expected seeds >= 1 and targets in (0, d_sae={cfg.d_sae}], found {cfg.seeds}, "
                         f"{cfg.target_list()}")


def run_compare(cfg, out_dir, *, source=None, model=None, tokenizer=None, eval_texts=None, site=None,
                data_description=None, force=False, resume=False, progress=True):
    """Train every (variant, target, seed), evaluate, write report.md / results.json / pareto.png.

    `source` (an ActivationStore of real activations, with `model` for delta LM loss) replaces the
    synthetic preset. With cfg.jobs > 1 the SAEs train in worker processes with single-threaded
    BLAS (on small matrices one BLAS thread per process beats threads fighting over the cores);
    workers are spawned, so a script calling this with jobs > 1 needs the `if __name__ ==
    "__main__":` guard."""
    _check(cfg)
    out = Path(out_dir)
    check_output_dir(out, "compare report", is_own=is_compare_folder)
    if (out / "report.md").exists() or (out / "results.json").exists() or (out / "runs").exists():
        if not (force or resume):
            raise OutputExistsError(f"{out} already holds a comparison; pass --overwrite to start it over "
                                    "or --resume to finish an interrupted sweep")
    for v, t, seed in [(v, t, 0) for v in cfg.variants for t in cfg.target_list()]:
        # every setting checked (k <= d_sae, λ > 0, ...) before any data is made or SAE trains
        cfg.train_config(v, t, seed).resolved(int(source.d_in) if source is not None else _preset_d_in(cfg))
    earlier, earlier_secs = _earlier_calls(out) if resume else ([], {})  # a finished sweep's times are kept
    t_start = time.time()
    eval_source = source
    if source is None:
        try:
            import scipy.optimize  # noqa: F401  (MCC's Hungarian matching)
        except ImportError:
            raise DependencyError("minisae compare reports MCC, which needs scipy: pip install 'minisae[metrics]'") from None
        make_dir(out)
        synth = make_source(cfg)
        from minisae.data.synthsaebench import write_cache

        n_cache = min(cfg.steps * cfg.batch_size, cfg.cache_tokens)
        write_cache(synth, out / "data", n_cache, batch_size=cfg.batch_size, progress=progress)
        data_description = data_description or _describe(synth, n_cache)
        eval_source = _FixedEval(synth, cfg.eval_tokens)
    else:
        make_dir(out)
    recipes = {v: cfg.default_recipe(v) for v in cfg.variants}
    pilot = None
    if cfg.pilot:
        pilot = _run_pilot(cfg, out, source, eval_source, resume, force, progress)
        recipes.update({v: c["setting"] for v, c in pilot["chosen"].items() if c is not None})
    seeds = list(range(cfg.seeds))
    jobs = [(v, t, s) for v in cfg.variants for t in cfg.target_list() for s in seeds]
    runs = [(cfg.train_config(v, t, s, recipes[v]), _run_dir(v, t, s), s) for v, t, s in jobs]
    labels = [f"{NAMES[v]} L0={t:g} seed {s}" for v, t, s in jobs]
    seconds = _train_runs(cfg, out, source, runs, labels, resume, force, progress)
    seconds = [secs + earlier_secs.get(_run_dir(*job), 0.0) for job, secs in zip(jobs, seconds)]
    lm_baseline = {}  # the clean and zero-ablated losses, the same for every SAE: computed once
    rows = [_evaluate_run(out, cfg, job, secs, eval_source, model, tokenizer, eval_texts, site, progress, lm_baseline)
            for job, secs in zip(jobs, seconds)]
    for row in rows:
        row["recipe"] = recipes[row["variant"]]
    results = {
        "config": dataclasses.asdict(cfg),
        "data": data_description or {"type": type(source).__name__, "d_in": source.d_in},
        "runs": rows,
        "recipes": recipes,
        "pilot": pilot,
        "plateau": _plateaus(cfg, rows),
    }
    # wall time over every call that wrote this sweep; an interrupted call's time is unknown, but
    # each run's metrics.jsonl keeps its own training time (train_seconds)
    results["calls"] = earlier + [{"seconds": round(time.time() - t_start, 1), "resumed": bool(resume)}]
    results["wall_seconds"] = round(sum(c["seconds"] for c in results["calls"]), 1)
    results["train_seconds"] = round(sum(r["train_seconds"] for r in rows), 1)
    results["summary"], results["verdict"] = verdicts(rows, cfg.variants, cfg.target_list())
    results["plot"] = pareto_plot(results, out / "pareto.png")
    write_atomic(out / "results.json", json.dumps(results, indent=2, default=_json_default) + "\n")
    write_atomic(out / "report.md", render_report(results))
    return results


def _run_dir(variant, target, seed):
    return str(Path("runs") / f"{variant}-L0{target:g}-s{seed}")


def _pilot_dir(variant, setting):
    return str(Path("pilot") / f"{variant}-{tuning.setting_tag(setting)}")


def _train_runs(cfg, out, source, runs, labels, resume, force, progress, *, allow_fail=False, desc="compare"):
    """Train runs [(TrainConfig, run_dir, seed)] (in worker processes where the source can be rebuilt
    there); returns each run's seconds, or with allow_fail (None, message) for a run that diverged."""
    from minisae.data.activations import ActivationStore

    if source is None:
        specs = [("activations", str(out / "data"), seed, 0) for _, _, seed in runs]
    else:
        specs = [workers.source_spec(source)] * len(runs)
    n_workers = cfg.jobs if cfg.jobs is not None else (min(2, os.cpu_count() or 1) if cfg.backend == "numpy" else 1)
    n_workers = max(1, min(n_workers, len(runs))) if all(specs) else 1
    seconds = [None] * len(runs)
    bar = _bar(progress, len(runs), desc)

    def finish(j, secs):
        seconds[j] = secs
        bar.update(1)

    # a worker's arguments (its runs train without progress bars)
    args = [(train_cfg, str(out / run_dir), resume, force, False, allow_fail) for train_cfg, run_dir, _ in runs]
    try:
        if n_workers == 1:
            for j, (_, _, seed) in enumerate(runs):
                bar.set_description(labels[j])
                src = source if source is not None else ActivationStore(out / "data", seed=seed)
                train_cfg, run_dir, _ = runs[j]
                finish(j, workers.train_job(src, train_cfg, str(out / run_dir), resume, force,
                                            "nested" if progress else False, allow_fail))
        else:
            bar.set_description(f"{desc}: {len(runs)} SAEs, {n_workers} processes")
            workers.run_in_workers(specs, args, n_workers, finish)
    finally:
        bar.close()
    return seconds


def _run_pilot(cfg, out, source, eval_source, resume, force, progress):
    """Every variant once (seed 0, the middle target) at each pilot setting; the best and next-best
    by FVU on held-out tokens (minisae.experiment.tuning). Runs that diverge count as failed, not fatal."""
    from minisae.eval.evaluate import evaluate_sae
    from minisae.io.saefile import SAE

    target = cfg.pilot_target()
    grid = tuning.pilot_grid(cfg.variants, lrs=cfg.pilot_lrs, bandwidths=cfg.pilot_bandwidths)
    cells = [(v, setting) for v in cfg.variants for setting in grid[v]]
    runs = [(cfg.train_config(v, target, 0, setting), _pilot_dir(v, setting), 0) for v, setting in cells]
    labels = [f"pilot {NAMES[v]} {tuning.setting_text(setting)}" for v, setting in cells]
    outcomes = _train_runs(cfg, out, source, runs, labels, resume, force, progress, allow_fail=True, desc="pilot")
    rows = []
    for (v, setting), (_, run_dir, _), (secs, failure) in zip(cells, runs, outcomes):
        row = {"variant": v, "setting": setting, "target": float(target), "run_dir": run_dir,
               "train_seconds": round(secs, 2), "l0": None, "fvu": None, "failed": failure}
        if failure is None:
            summary = evaluate_sae(SAE.load(out / run_dir / "sae"), eval_source, n_tokens=cfg.eval_tokens)
            row.update({k: summary.get(k) for k in ("l0", "fvu", "explained_variance", "dead_frac", "mcc", "f1")})
        rows.append(row)
    picks = {v: tuning.pick(rows, v) for v in cfg.variants}
    orderings, flips = tuning.sensitivity(rows, cfg.variants)
    return {"target": float(target), "grid": grid, "runs": rows, "chosen": {v: p[0] for v, p in picks.items()},
            "next_best": {v: p[1] for v, p in picks.items()}, "orderings": orderings, "flips": flips}


def _plateaus(cfg, rows):
    """Per (variant, target): the logged FVU's change over the last fifth of training (each row's
    fvu_tail_change) against the seeds' spread of the held-out FVU (minisae.experiment.tuning.plateau)."""
    result = []
    for v in cfg.variants:
        for t in cfg.target_list():
            sel = [r for r in rows if r["variant"] == v and r["target"] == float(t)]
            changes = [r.get("fvu_tail_change") for r in sel]
            result.append({"variant": v, "target": float(t),
                           **tuning.plateau(changes, [r.get("fvu") for r in sel])})
    return result


def _read_log(run):
    """A run's metrics.jsonl rows ([] when it has none)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _FixedEval:
    """The evaluation set of a synthetic source, generated once with its true codes."""

    def __init__(self, source, n):
        self.d_in, self.directions = source.d_in, source.directions
        rates = source.expected_firing() if hasattr(source, "expected_firing") else source.frequencies
        # a run's densest latent is pathological above 10 % of tokens, or, where the data has a
        # true feature that frequent (SynthSAEBench's feature 0: 40 %), twice its rate (report.dense_limit)
        self.top_rate = float(numpy.max(rates))
        self.dense_limit = dense_limit(self.top_rate)
        self.x, self.codes = source.eval_sample(n, return_codes=True)  # (n, D), (n, N)

    def eval_sample(self, n, *, return_codes=False):
        return (self.x[:n], self.codes[:n]) if return_codes else self.x[:n]


def _evaluate_run(out, cfg, job, secs, eval_source, model, tokenizer, eval_texts, site, progress, lm_baseline=None):
    from minisae.eval.evaluate import evaluate_lm, evaluate_sae
    from minisae.io.saefile import SAE

    variant, target, seed = job
    run = out / _run_dir(*job)
    sae = SAE.load(run / "sae")
    summary = evaluate_sae(sae, eval_source, n_tokens=cfg.eval_tokens)
    freq = numpy.asarray(summary.pop("firing_freq"))
    log = _read_log(run)  # read once: training time, final λ, the tail of the FVU curve
    row = {"variant": variant, "target": float(target), "seed": seed, "run_dir": _run_dir(*job),
           "train_seconds": round(max(secs, _recorded_seconds(log)), 2), **summary,
           "max_firing_freq": float(freq.max()) if freq.size else 0.0, "fvu_tail_change": tuning.tail_change(log)}
    train_cfg = json.loads((run / "config.json").read_text())["train"]
    if train_cfg["architecture"] in ("topk", "batchtopk"):
        row["setting"] = f"k={train_cfg['k']}"
    else:
        lam = _final_lambda(log)
        row["sparsity_coeff"] = lam
        row["setting"] = f"λ={lam:.3g}" if lam is not None else "λ=?"
    row["dense_limit"] = getattr(eval_source, "dense_limit", DENSE_LIMIT)
    row["top_feature_rate"] = getattr(eval_source, "top_rate", None)
    row["pathological"] = is_pathological(row)
    if model is not None:
        lm_sae = sae if model.xp is sae.xp else SAE.load(run / "sae", xp=model.xp)  # on the model's backend
        row.update(evaluate_lm(lm_sae, model, tokenizer, eval_texts, site, seq_len=cfg.seq_len,
                               batch_size=cfg.lm_batch_size, max_tokens=cfg.lm_tokens, progress=progress,
                               max_norm_ratio=cfg.max_norm_ratio, baseline=lm_baseline))
    return row


def _earlier_calls(out):
    """What the results.json already in `out` (a finished sweep being resumed) recorded: its calls
    [{"seconds", "resumed"}, ...] and each run's training seconds {run_dir: s}; ([], {}) when
    there is none or it cannot be read."""
    try:
        old = json.loads((out / "results.json").read_text())
        calls = old.get("calls") or [{"seconds": float(old["wall_seconds"]), "resumed": False}]
        return ([{"seconds": float(c["seconds"]), "resumed": bool(c["resumed"])} for c in calls],
                {str(r["run_dir"]): float(r["train_seconds"]) for r in old["runs"]})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [], {}


def _recorded_seconds(log):
    """A run's training time as its metrics.jsonl rows recorded it: each session's elapsed_s counts
    from its own start (a resumed run starts again from 0), so the session maxima are summed."""
    total = last = 0.0
    for row in log:
        elapsed = float(row.get("elapsed_s", 0.0))
        if elapsed < last:  # a new session began
            total += last
        last = elapsed
    return total + last


def _final_lambda(log):
    """The λ a run ended with: the one used at its last step (metrics.jsonl's last row; runs log
    their last step). The saved SAE keeps no λ (cfg.json has none), and the controller state in the
    checkpoint gives the λ for the step after the last, one update further."""
    return float(log[-1].get("sparsity_coeff")) if log else None


def _describe(source, n_cache):
    info = source.describe() if hasattr(source, "describe") else {"type": "synthetic", **source.cfg.to_dict()}
    info.pop("expected_l0", None)
    info = {**info, "d_in": source.d_in, "n_features": source.n_features,
            "true_l0": round(float(getattr(source, "expected_l0", 0.0)), 3), "cached_training_tokens": n_cache}
    info.pop("config", None)
    info["config"] = source.cfg.to_dict()
    return info


_COMPARE_NAMES = {"runs", "pilot", "data", "activations", "report.md", "results.json", "pareto.png"}


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


def _bar(enabled, total, desc="compare"):
    return progress_bar(total, enabled=bool(enabled), desc=desc, unit="SAE", position=0)
