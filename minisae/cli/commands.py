"""The `minisae` console command: train, eval, compare, cache, convert (docs/pipeline.md).

    minisae compare --out report/                       # JumpReLU vs Gated vs TopK, synthetic data
    minisae cache --model google/gemma-2-2b --site blocks.12.hook_resid_post --text c.jsonl --out acts/
    minisae train --arch jumprelu --sparsity-coeff 3e-3 --activations acts/ --steps 20000 --out run/
    minisae eval --sae run/sae --model google/gemma-2-2b --site blocks.12.hook_resid_post --text val.jsonl
    minisae convert params.npz my_sae/                   # Gemma Scope npz -> SAELens folder

Errors (minisae.MinisaeError: missing or corrupt files, bad arguments, an SAE that does not fit
the site, a full or read-only disk) end with one line on stderr and exit status 2; a training run
that diverges exits with 1; --debug shows the traceback instead. The flags are built in
minisae.cli.parser and checked in minisae.cli.args.
"""

import contextlib
import io
import json
import os
import sys
from pathlib import Path

from minisae.cli.args import check_arch_flags, check_values
from minisae.cli.parser import build_parser
from minisae.errors import InputError, MissingInputError, OutputExistsError

EXIT_USER_ERROR, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def _check_files_exist(paths, flag):
    from minisae.data.activations import corpus_ref, text_source_ids

    for p in paths:
        if corpus_ref(p) is not None:
            text_source_ids([p])  # an unknown or missing corpus: one line saying how to install it
        elif not Path(p).is_file():
            raise MissingInputError(f"{flag} {p}: no such file")


_SYNTHETIC_FLAGS = {"d_in": "d_in", "n_features": "n_features", "true_l0": "target_l0", "max_freq": "max_freq",
                    "noise_std": "noise_std", "offset_norm": "offset_norm", "data_seed": "seed"}


def _synthetic_dict(a, base):
    """SyntheticConfig fields: `base` with every synthetic flag given on the command line applied."""
    out = dict(base)
    out.update({field: getattr(a, flag) for flag, field in _SYNTHETIC_FLAGS.items() if getattr(a, flag) is not None})
    return out


def _synthetic_from(a):
    from minisae.experiment.compare import DEFAULT_SYNTHETIC
    from minisae.data.synthetic import SyntheticActivations, SyntheticConfig

    preset = getattr(a, "preset", None) or "toy"
    if preset != "toy":
        from minisae.data.synthsaebench import SynthSAEBench, preset_config

        given = [flag for flag in _SYNTHETIC_FLAGS if flag != "data_seed" and getattr(a, flag) is not None]
        if given:
            raise InputError(f"--{given[0].replace('_', '-')} applies to --preset toy only, not {preset}")
        return SynthSAEBench(preset_config(preset, seed=a.data_seed))
    return SyntheticActivations(SyntheticConfig(**_synthetic_dict(a, DEFAULT_SYNTHETIC)))


def _load_model(a, xp):
    from minisae.io.hub import HubError
    from minisae.models import load_model, load_tokenizer

    _check_files_exist(getattr(a, "text", None) or [], "--text")  # before minutes of model loading
    try:  # the tokenizer first: a missing one is found in a second, not after the model's load
        tokenizer = load_tokenizer(a.tokenizer or a.model)
    except HubError as e:  # e.g. a local checkpoint without tokenizer.json
        if a.tokenizer:
            raise
        raise HubError(f"{e}; give one with --tokenizer (a tokenizer.json file, a folder holding it, or a Hub repo)") from None
    model = load_model(a.model, xp=xp, revision=a.revision)  # Gemma 2 or Gemma 3, from config.json
    return model, tokenizer


# ---------------------------------------------------------------------------------------------

def cmd_train(a):
    from minisae.training.train import train

    if a.shards > 1 or a.accumulate > 1 or a.dist_backend != "auto" or _launched_by_mpiexec():
        from minisae import dist
        from minisae.training.train import train_parallel

        backend = a.dist_backend
        if backend == "auto" and a.backend == "cupy" and dist.launched_by_mpiexec() > 1:
            backend = "nccl"  # CuPy arrays move through NCCL
        comm = dist.world(backend)
        with dist.abort_on_error(comm):
            source, cfg = comm.together(lambda: _train_inputs(a))  # an error here is every rank's
            res = train_parallel(cfg, source, a.out, shards=a.shards, accumulate=a.accumulate, comm=comm,
                                 resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress)
        if comm.rank != 0:
            return
    else:
        source, cfg = _train_inputs(a)
        res = train(cfg, source, a.out, resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress)
    print(f"SAE written to {Path(a.out) / 'sae'}")
    if res.summary:
        print(_summary_line(res.summary))


def _train_inputs(a):
    """(source, TrainConfig) of `minisae train`'s flags."""
    from minisae.training.train import TrainConfig

    if a.shuffle_buffer is not None:
        from minisae.data.stream import ShardStream

        if not a.activations or a.holdout_tokens:
            raise ValueError("--shuffle-buffer streams an activation cache: give --activations, and no --holdout-tokens")
        source = ShardStream(a.activations, seed=a.data_seed, buffer_tokens=a.shuffle_buffer)
    else:
        source = _activation_store(a.activations, a.data_seed, a.holdout_tokens) if a.activations else _synthetic_from(a)
    cfg = TrainConfig(
        architecture=a.arch, d_sae=a.d_sae, sparsity_coeff=a.sparsity_coeff, k=a.k, lr=a.lr,
        bandwidth=TrainConfig.bandwidth if a.bandwidth is None else a.bandwidth,
        penalty=a.penalty, target_l0=a.target_l0, threshold_param=a.threshold_param, threshold_init=a.threshold_init,
        threshold_lr_mult=a.threshold_lr_mult,
        freq_coeff=a.freq_coeff, freq_target=a.freq_target, matryoshka=a.matryoshka, tanh_scale=a.tanh_scale,
        pre_act_coeff=a.pre_act_coeff, ste_to_input=a.ste_to_input,
        threshold_rate=a.threshold_rate,
        steps=a.steps, tokens=a.tokens, batch_size=a.batch_size, warmup_steps=a.warmup_steps,
        sparsity_warmup_steps=a.sparsity_warmup_steps, l0_warmup_steps=a.l0_warmup_steps, decay_frac=a.decay_frac,
        seed=a.seed, backend=a.backend,
        dtype=a.dtype, dead_window_tokens=a.dead_window_tokens, aux_k=a.aux_k,
        aux_coeff=TrainConfig.aux_coeff if a.aux_coeff is None else a.aux_coeff,
        checkpoint_every=a.checkpoint_every, log_every=a.log_every, eval_tokens=a.eval_tokens)
    return source, cfg


def _launched_by_mpiexec():
    from minisae.dist import launched_by_mpiexec

    return launched_by_mpiexec() > 1


def _activation_store(folder, seed, holdout):
    from minisae.data.activations import ActivationStore

    return ActivationStore(folder, seed=seed, holdout_tokens=holdout)


def _summary_line(s):
    keys = ["l0", "fvu", "dead_frac", "dense_frac", "rel_recon_bias", "mmcs", "frac_recovered", "mcc", "f1",
            "delta_lm_loss", "loss_recovered"]
    return "  ".join(f"{k}={s[k]:.4g}" for k in keys if isinstance(s.get(k), (int, float)))


def _run_source(sae_path):
    """The data source recorded in a training run folder (<run>/config.json beside <run>/sae)."""
    cfg_path = Path(sae_path) / ".." / "config.json"
    if not cfg_path.is_file():
        return None
    from minisae.errors import FileFormatError
    from minisae.io.files import read_json

    info = read_json(cfg_path).get("source", {})
    if not isinstance(info, dict):
        raise FileFormatError(f"{cfg_path}: 'source' must be a JSON object, found {info!r:.80}")
    if info.get("type") == "activations":
        if not isinstance(info.get("folder"), str):
            raise FileFormatError(f"{cfg_path}: source.folder must be a string, found {info.get('folder')!r:.80}")
        return _activation_store(info["folder"], info.get("seed", 0), info.get("holdout_tokens", 0))
    if isinstance(info.get("config"), dict) and info.get("type") == "SyntheticActivations":
        from minisae.data.synthetic import SyntheticActivations, SyntheticConfig

        try:
            return SyntheticActivations(SyntheticConfig(**info["config"]))
        except TypeError as e:  # an unknown field
            raise FileFormatError(f"{cfg_path}: source.config does not fit the synthetic data ({e})") from None
    if "config" in info and info.get("type") == "synthsaebench":
        from minisae.data.synthsaebench import SynthSAEBench, SynthSAEBenchConfig

        try:
            return SynthSAEBench(SynthSAEBenchConfig(**info["config"]))
        except TypeError as e:  # an unknown field
            raise FileFormatError(f"{cfg_path}: source.config does not fit SynthSAEBench ({e})") from None
    return None


def cmd_eval(a):
    from minisae.eval.evaluate import describe_eval_data, evaluate
    from minisae.io.saefile import SAE
    from minisae.xp import get_xp

    _check_files_exist(a.text or [], "--text")  # before the SAE (maybe from the Hub) and the model load
    if a.json and Path(a.json).exists() and not a.overwrite:
        raise OutputExistsError(f"{a.json}: exists; pass --overwrite to replace it")
    if a.json and not Path(a.json).resolve().parent.is_dir():
        raise MissingInputError(f"--json {a.json}: its folder does not exist")
    xp = get_xp(a.backend)
    sae = SAE.load(a.sae, xp=xp)
    if a.activations:
        source = _activation_store(a.activations, a.data_seed, 0)
    elif a.synthetic:
        source = _synthetic_from(a)
    else:
        source = _run_source(a.sae) if Path(a.sae).is_dir() else None
    model = tokenizer = None
    if a.model:
        site = a.site or sae.cfg["metadata"].get("hook_name")  # a Gemma Scope 2 file names its own site
        if not (site and a.text):
            raise InputError("--model needs --site (or an SAE whose cfg names its hook) and --text for delta LM loss")
        a.site = site
        model, tokenizer = _load_model(a, xp)
    elif sae.is_transcoder and source is not None:
        raise InputError("a transcoder is evaluated on a model: give --model, --text (and --site unless its cfg "
                         "names it), not cached or synthetic activations")
    if source is None and model is None:
        raise InputError("nothing to evaluate on: give --activations, --synthetic, or --model/--site/--text")
    out = evaluate(sae, source, n_tokens=a.eval_tokens, model=model, tokenizer=tokenizer, texts=a.text,
                   site=a.site, seq_len=a.seq_len, lm_batch_size=a.lm_batch_size, lm_tokens=a.lm_tokens,
                   text_field=a.text_field, site_out=a.site_out, max_norm_ratio=_ratio(a.max_norm_ratio))
    if source is not None:  # which data, held out or not, how many (minisae.eval.evaluate)
        where = None if a.activations or a.synthetic else f"the run's own data, {Path(a.sae).parent / 'config.json'}"
        _say_what_is_evaluated(*describe_eval_data(source, a.eval_tokens, where=where))
    if model is not None:
        short = out["lm_tokens"] < a.lm_tokens
        _say_what_is_evaluated(f"delta LM loss on {out['lm_tokens']} scored tokens of {', '.join(a.text)}",
                               f"--lm-tokens {a.lm_tokens} is more than the texts hold" if short else None)
    print(_summary_line(out))
    if a.json:
        from minisae.io.files import write_atomic

        write_atomic(a.json, json.dumps(out, indent=2) + "\n")


def _say_what_is_evaluated(note, warning):
    print(note)
    if warning:
        print(f"minisae eval: warning: {warning}", file=sys.stderr)


def cmd_compare(a):
    from minisae.experiment.compare import CompareConfig, is_compare_folder, model_defaults, quick_config, run_compare
    from minisae.io.files import check_output_dir
    from minisae.xp import get_xp

    cfg = quick_config() if a.quick else CompareConfig()
    cfg.backend = a.backend
    cfg.seq_len = min(a.seq_len, 128) if a.quick else a.seq_len  # --quick: a smoke test's short sequences
    if a.preset:
        cfg.preset = a.preset
    if cfg.preset == "toy":
        cfg.synthetic = {k: v for k, v in _synthetic_dict(a, {}).items()}
    else:
        given = [flag for flag in _SYNTHETIC_FLAGS if flag != "data_seed" and getattr(a, flag) is not None]
        if given:
            raise InputError(f"--{given[0].replace('_', '-')} applies to --preset toy only, not {cfg.preset}")
        if a.data_seed:
            cfg.synthetic = {**cfg.synthetic, "seed": a.data_seed}
    if cfg.preset == "synthsaebench-16k" and not a.quick:  # the published benchmark setting (GPU)
        cfg.d_sae, cfg.steps, cfg.batch_size = 4096, 195_313, 1024
        cfg.lr = {v: 3e-4 for v in cfg.lr}
        cfg.warmup_steps, cfg.sparsity_warmup_steps, cfg.decay_frac = 1000, 10_000, 0.0
        cfg.cache_tokens, cfg.eval_tokens, cfg.dead_window_tokens = 1 << 24, 65536, 10_000_000
        cfg.pilot = False  # the published recipe, not a pilot at 200M samples per run
    for name in ("d_sae", "steps", "batch_size", "jobs", "seeds", "threshold_lr_mult"):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    if a.variants:
        cfg.variants = list(dict.fromkeys(a.variants))
    if a.threshold_lr_mult is not None and "jumprelu" not in cfg.variants:
        raise InputError(f"--threshold-lr-mult sets JumpReLU's θ learning rate; --variants {' '.join(cfg.variants)} "
                         "has no JumpReLU: leave it out")
    if a.targets:
        cfg.targets = list(a.targets)
    if a.lr is not None:
        cfg.lr = {v: a.lr for v in cfg.lr}
        cfg.pilot = False  # a learning rate fixed by hand replaces the pilot's choice
    if a.no_pilot:
        cfg.pilot = False
    if a.pilot_lrs:
        if not cfg.pilot:
            raise InputError("--pilot-lrs sets the pilot sweep's grid; it cannot go with --no-pilot or --lr")
        if any(not (0 < lr < 1) for lr in a.pilot_lrs):
            raise InputError(f"--pilot-lrs: expected learning rates in (0, 1), found {a.pilot_lrs}")
        cfg.pilot_lrs = list(a.pilot_lrs)
    kw = {}
    check_output_dir(a.out, "compare report", is_own=is_compare_folder)
    if (a.eval_text or a.lm_tokens is not None or a.max_norm_ratio is not None) and not a.model:
        flag = "--eval-text" if a.eval_text else "--lm-tokens" if a.lm_tokens is not None else "--max-norm-ratio"
        what = "a real model's activations" if flag == "--max-norm-ratio" else "delta LM loss"
        raise InputError(f"{flag} is for {what} and needs --model, --site and --text")
    if a.model:
        if not (a.site and a.text):
            raise InputError("--model needs --site and --text")
        _check_files_exist(a.text, "--text")
        _check_files_exist(a.eval_text or [], "--eval-text")
        from minisae.data.activations import ActivationStore, cache_activations

        model, tokenizer = _load_model(a, get_xp(a.backend))
        defaults = model_defaults(model.site_width(a.site), quick=a.quick)  # where no flag says otherwise
        given = {"d_sae": a.d_sae is not None, "pilot_lrs": bool(a.pilot_lrs), "targets": bool(a.targets),
                 "max_norm_ratio": a.max_norm_ratio is not None}
        for name, value in defaults.items():
            if name != "tokens" and not given[name]:
                setattr(cfg, name, value)
        if a.max_norm_ratio is not None:
            cfg.max_norm_ratio = _ratio(a.max_norm_ratio)
        if a.lm_tokens is not None:
            cfg.lm_tokens = a.lm_tokens
        acts = Path(a.out) / "activations"
        tokens = a.tokens if a.tokens is not None else defaults["tokens"]
        man = cache_activations(model, tokenizer, a.text, a.site, acts, seq_len=a.seq_len,
                                max_tokens=tokens, text_field=a.text_field, model_name=a.model,
                                progress=not a.no_progress, max_norm_ratio=cfg.max_norm_ratio)
        holdout = min(cfg.eval_tokens, man["count"] // 10)
        cfg.eval_tokens = holdout
        source = ActivationStore(acts, seed=a.data_seed, holdout_tokens=holdout)
        kw = dict(source=source, model=model, tokenizer=tokenizer, eval_texts=a.eval_text or a.text, site=a.site,
                  data_description={"type": type(model).__name__.removesuffix("Model").lower(),  # gemma2 / gemma3
                                    "model": a.model, "site": a.site, "d_in": source.d_in,
                                    "cached_tokens": source.count, "held_out_tokens": holdout,
                                    "max_norm_ratio": cfg.max_norm_ratio, "outlier_tokens_left_out": man.get("outliers", 0)})
    res = run_compare(cfg, a.out, force=a.overwrite, resume=a.resume, progress=not a.no_progress, **kw)
    print(f"report: {Path(a.out) / 'report.md'}  ({res['wall_seconds']:.0f} s)")
    claim = res["verdict"].get("paper_claim")
    if claim:
        print(claim["text"].replace("**", ""))


def _ratio(value):
    """--max-norm-ratio as the library takes it: a number, or None for 'none' / not given."""
    return None if value in (None, "none") else value


def cmd_cache(a):
    from minisae.data.activations import cache_activations, is_cache_folder
    from minisae.io.files import check_output_dir
    from minisae.xp import get_xp

    check_output_dir(a.out, "activation cache", is_own=is_cache_folder)  # before the model is loaded
    model, tokenizer = _load_model(a, get_xp(a.backend))
    man = cache_activations(model, tokenizer, a.text, a.site, a.out, seq_len=a.seq_len, batch_size=a.batch_size,
                            max_tokens=a.max_tokens, shard_tokens=a.shard_tokens, resume=not a.no_resume, overwrite=a.overwrite,
                            text_field=a.text_field, model_name=a.model, progress=not a.no_progress,
                            max_norm_ratio=_ratio(a.max_norm_ratio))
    dropped = f", {man['outliers']} outlier tokens left out" if man.get("outliers") else ""
    print(f"{man['count']} tokens of {man['site']} (d_in {man['d_in']}) in {len(man['shards'])} shards at {a.out}{dropped}")


def cmd_convert(a):
    from minisae.io.saefile import SAE

    sae = SAE.load(a.input)
    to = a.to or ("gemma-scope" if a.output.endswith(".npz") else "saelens")
    if to == "gemma-scope":
        path = sae.save_gemma_scope(a.output, overwrite=a.overwrite)
    elif to == "gemma-scope-2":
        path = sae.save_gemma_scope_2(a.output, overwrite=a.overwrite)
    else:
        path = sae.save(a.output, overwrite=a.overwrite)
    print(f"{sae.architecture} SAE (d_in {sae.d_in}, d_sae {sae.d_sae}) written to {path}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare, "cache": cmd_cache, "convert": cmd_convert}


def _exit_status(e):
    """The exit status for exception `e`, or None for a bug (which keeps its traceback)."""
    from minisae.errors import MinisaeError

    if isinstance(e, MinisaeError):
        return e.exit_status
    if isinstance(e, (OSError, ValueError, MemoryError)):  # a file, an argument, memory: the user's to fix
        return EXIT_USER_ERROR
    return None


def _message(e):
    from minisae.errors import MinisaeError, one_line

    msg = one_line(e)
    if isinstance(e, MemoryError) and not isinstance(e, MinisaeError):
        msg = f"out of memory ({msg}): try a smaller --d-sae, --batch-size or --seq-len"
    return msg


def main(argv=None):
    """Entry point of the `minisae` command; returns the exit status.

    Under mpiexec every rank runs it with the same arguments: an error every rank meets (an
    argument, or one the ranks agreed on: minisae.dist.on_every_rank) is printed by rank 0 alone,
    and every rank exits with its status; an error of one rank alone aborts the run
    (minisae.dist.abort_on_error)."""
    from minisae.dist.comm import launch_rank, launched_by_mpiexec

    quiet = launch_rank() != 0  # not rank 0 of an mpiexec run: rank 0 speaks for every rank
    parser = build_parser()
    args_checked = False
    try:
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            a = parser.parse_args(argv)  # the same argv on every rank: the same error
    except SystemExit as e:  # an argument error (status 2), --help or --version (0)
        if e.code and launched_by_mpiexec() > 1:
            _silence_stderr()
        raise
    try:
        check_values(parser, a)  # before any work: ranges, and options the chosen --arch would ignore
        check_arch_flags(a)
        args_checked = True
        COMMANDS[a.command](a)
    except KeyboardInterrupt:
        print(f"\nminisae {a.command}: interrupted (runs resume from their last checkpoint with --resume)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        status = _exit_status(e)
        if a.debug or status is None:
            raise
        if not (quiet and (not args_checked or getattr(e, "on_every_rank", False))):
            print(f"minisae {a.command}: error: {_message(e)}", file=sys.stderr)
        if launched_by_mpiexec() > 1:  # `python -m mpi4py` turns the status into MPI_Abort, whose own
            _silence_stderr()           # "application called MPI_Abort" line would be a second one
        return status
    return 0


def _silence_stderr():
    sys.stderr.flush()
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
