"""The `minisae` console command: train, eval, compare, cache, convert (docs/pipeline.md).

    minisae compare --out report/                       # JumpReLU vs Gated vs TopK, synthetic data
    minisae cache --model google/gemma-2-2b --site blocks.12.hook_resid_post --text c.jsonl --out acts/
    minisae train --arch jumprelu --sparsity-coeff 3e-3 --activations acts/ --steps 20000 --out run/
    minisae eval --sae run/sae --model google/gemma-2-2b --site blocks.12.hook_resid_post --text val.jsonl
    minisae convert params.npz my_sae/                   # Gemma Scope npz -> SAELens folder

Errors (minisae.MinisaeError: missing or corrupt files, bad arguments, an SAE that does not fit
the site, a full or read-only disk) end with one line on stderr and exit status 2; a training run
that diverges exits with 1; --debug shows the traceback instead.
"""

import argparse
import json
import sys
from pathlib import Path

from minisae.cliargs import OneLineParser, check_arch_flags, check_values, show_defaults
from minisae.errors import InputError, MissingInputError, OutputExistsError

EXIT_USER_ERROR, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def _check_files_exist(paths, flag):
    for p in paths:
        if not Path(p).is_file():
            raise MissingInputError(f"{flag} {p}: no such file")


def _synthetic_args(p):
    g = p.add_argument_group("synthetic data (the default source)")
    g.add_argument("--preset", choices=["toy", "synthsaebench-cpu", "synthsaebench-16k"],
                   help="synthetic data: toy = a planted dictionary with the options below (the default of "
                        "train and eval); synthsaebench-cpu = SynthSAEBench at N=2048 features, D=96 (the default "
                        "of compare); synthsaebench-16k = the published SynthSAEBench-16k (N=16384, D=768; "
                        "for GPUs). The options below apply to toy only")
    g.add_argument("--d-in", type=int, help="activation width D (default 64)")
    g.add_argument("--n-features", type=int, help="planted features F (default 256)")
    g.add_argument("--true-l0", type=float, help="mean active planted features per token (default 6)")
    g.add_argument("--max-freq", type=float, help="highest firing probability of a feature (default 0.05)")
    g.add_argument("--noise-std", type=float, help="isotropic noise per dimension (default 0.01)")
    g.add_argument("--offset-norm", type=float, help="norm of a constant offset (default 1)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the data (and of the cache shuffle)")


_SYNTHETIC_FLAGS = {"d_in": "d_in", "n_features": "n_features", "true_l0": "target_l0", "max_freq": "max_freq",
                    "noise_std": "noise_std", "offset_norm": "offset_norm", "data_seed": "seed"}


def _synthetic_dict(a, base):
    """SyntheticConfig fields: `base` with every synthetic flag given on the command line applied."""
    out = dict(base)
    out.update({field: getattr(a, flag) for flag, field in _SYNTHETIC_FLAGS.items() if getattr(a, flag) is not None})
    return out


def _synthetic_from(a):
    from minisae.compare import DEFAULT_SYNTHETIC
    from minisae.data.synthetic import SyntheticActivations, SyntheticConfig

    preset = getattr(a, "preset", None) or "toy"
    if preset != "toy":
        from minisae.data.synthsaebench import SynthSAEBench, preset_config

        given = [flag for flag in _SYNTHETIC_FLAGS if flag != "data_seed" and getattr(a, flag) is not None]
        if given:
            raise InputError(f"--{given[0].replace('_', '-')} applies to --preset toy only, not {preset}")
        return SynthSAEBench(preset_config(preset, seed=a.data_seed))
    return SyntheticActivations(SyntheticConfig(**_synthetic_dict(a, DEFAULT_SYNTHETIC)))


def _model_args(p, *, required=False, text_help="text files (.txt: blank-line separated documents; .jsonl)"):
    g = p.add_argument_group("Gemma 2 / Gemma 3 model (the generation is read from config.json)")
    g.add_argument("--model", required=required,
                   help="local folder or Hub repo id, e.g. google/gemma-2-2b or google/gemma-3-270m")
    g.add_argument("--tokenizer", help="tokenizer.json file/folder/repo (default: the model's)")
    g.add_argument("--revision", help="Hub revision of the model")
    g.add_argument("--site", required=required, help="blocks.L.{hook_resid_post,attn.hook_z,hook_mlp_in,hook_mlp_out} or the Hugging Face "
                   "hook names of Gemma Scope 2 configs: model.layers.L.{output,self_attn.o_proj.input,"
                   "pre_feedforward_layernorm.output,post_feedforward_layernorm.output}")
    g.add_argument("--text", nargs="+", required=required, metavar="FILE", help=text_help)
    g.add_argument("--text-field", default="text", help="field of each .jsonl object holding the text (default text)")
    g.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence T (default 1024)")


def _load_model(a, xp):
    from minisae.models import load_model, load_tokenizer

    _check_files_exist(getattr(a, "text", None) or [], "--text")  # before minutes of model loading
    model = load_model(a.model, xp=xp, revision=a.revision)  # Gemma 2 or Gemma 3, from config.json
    tokenizer = load_tokenizer(a.tokenizer or a.model)
    return model, tokenizer


def build_parser():
    parser = OneLineParser(prog="minisae", description="Sparse autoencoders (JumpReLU, Gated, TopK) "
                                     "in NumPy/CuPy, trained and evaluated on synthetic data or Gemma 2 / Gemma 3 activations.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ---- train -------------------------------------------------------------------------------
    p = sub.add_parser("train", help="train one SAE", description="Train one SAE (the Gemma Scope recipe, "
                       "arXiv:2408.05147) on synthetic "
                       "data (default) or cached activations; checkpoints, metrics.jsonl and the SAE go to --out.")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--arch", choices=["jumprelu", "gated", "topk", "batchtopk"], default="jumprelu",
                   help="SAE variant (default jumprelu); batchtopk keeps the top B·k pre-activations of the "
                        "whole batch and is saved as a JumpReLU with one global threshold")
    p.add_argument("--d-sae", type=int, default=1024, help="latents M (default 1024)")
    p.add_argument("--sparsity-coeff", "--lambda", dest="sparsity_coeff", type=float, help="λ (jumprelu, gated)")
    p.add_argument("--k", type=int, help="latents kept per token (topk; batchtopk: on average)")
    p.add_argument("--matryoshka", type=_prefix_list, metavar="M1,M2,...",
                   help="Matryoshka loss over nested latent prefixes, e.g. 128,512,2048 (batchtopk, jumprelu; "
                        "d_sae is appended as the last prefix if missing)")
    p.add_argument("--threshold-rate", type=float, default=0.01,
                   help="batchtopk: averaging rate of the running inference threshold (default 0.01)")
    p.add_argument("--lr", type=float, help="learning rate (default per architecture: 7e-5 JumpReLU, 3e-4 Gated, 2e-4/sqrt(M/2^14) TopK)")
    p.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--tokens", type=int, help="training tokens (instead of --steps)")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step B")
    p.add_argument("--warmup-steps", type=int, default=1000, help="cosine lr warm-up (default 1000)")
    p.add_argument("--sparsity-warmup-steps", type=int, default=10000, help="linear λ warm-up (default 10000)")
    p.add_argument("--decay-frac", type=float, default=0.0, help="linear lr decay over this final fraction")
    p.add_argument("--bandwidth", type=float, help="JumpReLU kernel bandwidth ε (default 0.001)")
    p.add_argument("--penalty", choices=["l0", "quadratic", "tanh"], default="l0",
                   help="JumpReLU sparsity penalty per token: l0 = λ·L0 (the paper, default); quadratic = "
                        "λ·(2/L0*)·(L0 − L0*)² around --target-l0 (Gemma Scope 2, Eq. 5); tanh = "
                        "λ·Σ_i tanh(c·f_i·‖d_i‖) (SAELens' option, c = --tanh-scale)")
    p.add_argument("--tanh-scale", type=float, default=4.0, help="c of the tanh penalty (default 4, SAELens')")
    p.add_argument("--pre-act-coeff", type=float, default=0.0,
                   help="JumpReLU (SAELens' option): coeff·Σ relu(θ − pre)·‖d‖ over dead latents (default 0 = off)")
    p.add_argument("--ste-to-input", action="store_true",
                   help="JumpReLU (SAELens' option): pass the threshold's straight-through gradient to the "
                        "pre-activations too")
    p.add_argument("--target-l0", type=float, help="train to this L0 (latents per token), every variant: TopK and "
                   "BatchTopK take k = round(L0*); Gated and JumpReLU (--penalty l0 or tanh) adjust λ every step by a "
                   "proportional-integral controller on log λ, starting from --sparsity-coeff (default 0.1 Gated, "
                   "0.01 JumpReLU); with --penalty quadratic it is the penalty's L0*")
    p.add_argument("--threshold-lr-mult", type=float, default=1.0, help="JumpReLU: learning rate of θ = this × --lr "
                   "(default 1: the paper's single learning rate; 0.1 keeps θ from outrunning the weights)")
    p.add_argument("--threshold-param", choices=["log", "raw"], default="log",
                   help="JumpReLU: train log θ (log, the paper, default) or θ itself (raw, as SAELens ≥ 6.48)")
    p.add_argument("--threshold-init", type=float, help="JumpReLU θ at init (default 0.001)")
    p.add_argument("--freq-coeff", type=float, default=0.0,
                   help="JumpReLU: weight μ of minisae's frequency penalty μ·Σ_i max(p_i − target, 0)², "
                        "p_i the fraction of the batch latent i fires on (default 0 = off)")
    p.add_argument("--freq-target", type=float, default=0.1,
                   help="firing fraction above which the frequency penalty acts (default 0.1)")
    p.add_argument("--aux-k", type=int, help="TopK AuxK k' (default min(512, D/2))")
    p.add_argument("--aux-coeff", type=float, help="TopK AuxK weight (default 1/32)")
    p.add_argument("--dead-window-tokens", type=int, default=10_000_000, help="tokens without firing = dead")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="parameter and compute dtype")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=50, help="steps between metrics.jsonl lines")
    p.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens evaluated at the end")
    p.add_argument("--activations", help="cache folder written by `minisae cache` (default: synthetic data)")
    p.add_argument("--holdout-tokens", type=int, default=0, help="cached tokens kept out of training for evaluation")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a checkpoint")
    g = p.add_argument_group("past one process (docs/scale.md); launch with mpiexec -n P minisae train ...")
    g.add_argument("--shards", type=int, default=1, help="latent shards S; the P processes form P/S data-parallel "
                   "replicas (default 1)")
    g.add_argument("--accumulate", type=int, default=1, help="micro-batches per process per step (default 1)")
    g.add_argument("--shuffle-buffer", type=int, metavar="TOKENS", help="read --activations as a stream: whole "
                   "shards in a seeded order, rows shuffled within windows of this many tokens, the next window "
                   "loaded in the background (for caches larger than memory, bfloat16 caches, object storage)")
    g.add_argument("--dist-backend", choices=["auto", "mpi", "nccl"], default="auto",
                   help="collectives: auto = MPI under mpiexec, NCCL with --backend cupy (default); the NCCL "
                   "backend has never run (no GPU during development)")
    _common(p)
    _synthetic_args(p)

    # ---- eval --------------------------------------------------------------------------------
    p = sub.add_parser("eval", help="evaluate an SAE", description="L0, FVU, dead and dense latents and more "
                       "for an SAE (SAELens folder, "
                       "Gemma Scope params.npz or a Hub reference) on activations, plus delta LM loss and loss "
                       "recovered when a Gemma 2 / Gemma 3 model, site and text are given. Without a data option, a run "
                       "folder's own data (its config.json) is used.")
    p.add_argument("--sae", required=True, help="SAE folder, params.npz, or Hub org/repo/path")
    p.add_argument("--activations", help="cache folder written by `minisae cache`")
    p.add_argument("--synthetic", action="store_true", help="evaluate on synthetic data (the options below)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="tokens evaluated")
    p.add_argument("--lm-tokens", type=int, default=8192, help="scored tokens for delta LM loss")
    p.add_argument("--lm-batch-size", type=int, default=2, help="sequences per forward pass for delta LM loss")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--site-out", help="transcoders: the site the prediction replaces (default: the transcoder's "
                   "hook_name_out, e.g. model.layers.L.post_feedforward_layernorm.output for Gemma Scope 2); "
                   "--site (default: its hook_name) is the site it reads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    _model_args(p)
    _common(p)
    _synthetic_args(p)

    # ---- compare -----------------------------------------------------------------------------
    p = sub.add_parser("compare", help="SAE variants at matched L0 over seeds (SynthSAEBench by default)",
                       description="Train SAE variants (JumpReLU, Gated and TopK by default) to the same target "
                       "L0s with several seeds on the same activations and write report.md, results.json and "
                       "pareto.png into --out: explained variance and, on synthetic data, feature quality (MCC, "
                       "F1) at matched L0, mean ± sd over seeds, and a verdict on the JumpReLU paper's claim. "
                       "Data: SynthSAEBench at CPU size by default (--preset), or a Gemma 2 / Gemma 3 model, site "
                       "and text. The default run takes about 10 minutes on 2 idle CPU cores.")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a comparison")
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep (runs resume from checkpoints)")
    p.add_argument("--quick", action="store_true", help="a tiny comparison for smoke tests (seconds)")
    p.add_argument("--variants", nargs="+", choices=["jumprelu", "gated", "topk", "batchtopk", "matryoshka"],
                   help="SAE variants (default jumprelu gated topk: the paper's three; matryoshka = Matryoshka "
                        "BatchTopK)")
    p.add_argument("--targets", type=float, nargs="+", metavar="L0", help="target L0s (default 5 8 12 for "
                   "synthsaebench-cpu, 15 25 40 for synthsaebench-16k, 3 6 10 for toy; 2 4 with --quick)")
    p.add_argument("--seeds", type=int, help="seeds per variant and target (default 3; 2 with --quick)")
    p.add_argument("--d-sae", type=int, help="latents per SAE (default 512; 32 with --quick; 4096 with --preset "
                   "synthsaebench-16k; 4 × site width with --model)")
    p.add_argument("--steps", type=int, help="steps per SAE (default 3000; 250 with --quick; 195313 = 200M samples "
                   "with --preset synthsaebench-16k)")
    p.add_argument("--batch-size", type=int, help="tokens per step (default 512; 128 with --quick; 1024 with "
                   "--preset synthsaebench-16k)")
    p.add_argument("--lr", type=float, help="learning rate of every variant (default 0.01; 3e-4 with --preset "
                   "synthsaebench-16k, the published setting)")
    p.add_argument("--threshold-lr-mult", type=float, help="JumpReLU θ learning rate = this × lr (default 1: the "
                   "paper's single learning rate)")
    p.add_argument("--jobs", type=int, help="training processes (default min(2, CPUs) on numpy, 1 on cupy)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="with --model: activations to cache (default 1M)")
    p.add_argument("--eval-text", nargs="+", metavar="FILE", help="with --model: texts for delta LM loss (default --text)")
    _model_args(p)
    _common(p)
    _synthetic_args(p)

    # ---- cache -------------------------------------------------------------------------------
    p = sub.add_parser("cache", help="cache Gemma 2 / Gemma 3 activations to disk", description="Run a Gemma 2 or "
                       "Gemma 3 model over "
                       "text and store the activations at one site (BOS/EOS/pad dropped) as float32 shards "
                       "plus manifest.json. Resumable: rerun the same command after an interruption.")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--max-tokens", type=int, help="stop after this many cached tokens")
    p.add_argument("--shard-tokens", type=int, default=65536, help="tokens per shard file")
    p.add_argument("--no-resume", action="store_true", help="refuse a folder that already holds a cache")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a cache")
    _model_args(p, required=True)
    _common(p)

    # ---- convert -----------------------------------------------------------------------------
    p = sub.add_parser("convert", help="convert SAEs between SAELens, Gemma Scope and Gemma Scope 2 files",
                       description="Convert an SAE or transcoder between a SAELens folder (cfg.json + "
                       "sae_weights.safetensors; every architecture), a Gemma Scope params.npz (JumpReLU SAEs "
                       "only) and a Gemma Scope 2 folder (params.safetensors + config.json; JumpReLU SAEs and "
                       "transcoders). A conversion the target format cannot hold is refused with the reason. "
                       "The output format is --to, else gemma-scope for an OUTPUT ending in .npz, else saelens.")
    p.add_argument("input", help="SAELens folder, params.npz, Gemma Scope 2 folder, or Hub reference "
                   "(e.g. google/gemma-scope-2-270m-pt/resid_post/layer_9_width_16k_l0_small)")
    p.add_argument("output", help="output .npz file or folder")
    p.add_argument("--to", choices=["saelens", "gemma-scope", "gemma-scope-2"],
                   help="output format (default: from OUTPUT, see above)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing SAE folder or .npz file")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    show_defaults(parser)
    return parser


def _prefix_list(text):
    """'128,512,2048' -> [128, 512, 2048] (argparse type)."""
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 128,512,2048, found {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one prefix size")
    return sizes


def _common(p):
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="array backend (default numpy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


# ---------------------------------------------------------------------------------------------

def cmd_train(a):
    from minisae.train import TrainConfig, train

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
        sparsity_warmup_steps=a.sparsity_warmup_steps, decay_frac=a.decay_frac, seed=a.seed, backend=a.backend,
        dtype=a.dtype, dead_window_tokens=a.dead_window_tokens, aux_k=a.aux_k,
        aux_coeff=TrainConfig.aux_coeff if a.aux_coeff is None else a.aux_coeff,
        checkpoint_every=a.checkpoint_every, log_every=a.log_every, eval_tokens=a.eval_tokens)
    if a.shards > 1 or a.accumulate > 1 or a.dist_backend != "auto" or _launched_by_mpiexec():
        from minisae import dist
        from minisae.parallel import train_parallel

        backend = a.dist_backend
        if backend == "auto" and a.backend == "cupy" and dist.launched_by_mpiexec() > 1:
            backend = "nccl"  # CuPy arrays move through NCCL
        comm = dist.world(backend)
        with dist.abort_on_error(comm):
            res = train_parallel(cfg, source, a.out, shards=a.shards, accumulate=a.accumulate, comm=comm,
                                 resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress)
        if comm.rank != 0:
            return
    else:
        res = train(cfg, source, a.out, resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress)
    print(f"SAE written to {Path(a.out) / 'sae'}")
    if res.summary:
        print(_summary_line(res.summary))


def _launched_by_mpiexec():
    from minisae.dist import launched_by_mpiexec

    return launched_by_mpiexec() > 1


def _activation_store(folder, seed, holdout):
    from minisae.data.activations import ActivationStore

    return ActivationStore(folder, seed=seed, holdout_tokens=holdout)


def _summary_line(s):
    keys = ["l0", "fvu", "dead_frac", "dense_frac", "rel_recon_bias", "mmcs", "frac_recovered",
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
    from minisae.evaluate import evaluate
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
                   text_field=a.text_field, site_out=a.site_out)
    print(_summary_line(out))
    if a.json:
        from minisae.io.files import write_atomic

        write_atomic(a.json, json.dumps(out, indent=2) + "\n")


def cmd_compare(a):
    from minisae.compare import CompareConfig, is_compare_folder, quick_config, run_compare
    from minisae.io.files import check_output_dir
    from minisae.xp import get_xp

    cfg = quick_config() if a.quick else CompareConfig()
    cfg.backend, cfg.seq_len = a.backend, a.seq_len
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
    for name in ("d_sae", "steps", "batch_size", "jobs", "seeds", "threshold_lr_mult"):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    if a.variants:
        cfg.variants = list(dict.fromkeys(a.variants))
    if a.targets:
        cfg.targets = list(a.targets)
    if a.lr is not None:
        cfg.lr = {v: a.lr for v in cfg.lr}
    kw = {}
    check_output_dir(a.out, "compare report", is_own=is_compare_folder)
    if a.eval_text and not a.model:
        raise InputError("--eval-text scores delta LM loss and needs --model, --site and --text")
    if a.model:
        if not (a.site and a.text):
            raise InputError("--model needs --site and --text")
        _check_files_exist(a.text, "--text")
        _check_files_exist(a.eval_text or [], "--eval-text")
        from minisae.data.activations import ActivationStore, cache_activations

        model, tokenizer = _load_model(a, get_xp(a.backend))
        if a.d_sae is None:
            cfg.d_sae = 4 * model.site_width(a.site)
        acts = Path(a.out) / "activations"
        man = cache_activations(model, tokenizer, a.text, a.site, acts, seq_len=a.seq_len,
                                max_tokens=a.tokens, text_field=a.text_field, model_name=a.model,
                                progress=not a.no_progress)
        holdout = min(cfg.eval_tokens, man["count"] // 10)
        cfg.eval_tokens = holdout
        source = ActivationStore(acts, seed=a.data_seed, holdout_tokens=holdout)
        kw = dict(source=source, model=model, tokenizer=tokenizer, eval_texts=a.eval_text or a.text, site=a.site,
                  data_description={"type": type(model).__name__.removesuffix("Model").lower(),  # gemma2 / gemma3
                                    "model": a.model, "site": a.site, "d_in": source.d_in,
                                    "cached_tokens": source.count, "held_out_tokens": holdout})
    res = run_compare(cfg, a.out, force=a.overwrite, resume=a.resume, progress=not a.no_progress, **kw)
    print(f"report: {Path(a.out) / 'report.md'}  ({res['wall_seconds']:.0f} s)")
    claim = res["verdict"].get("paper_claim")
    if claim:
        print(claim["text"].replace("**", ""))


def cmd_cache(a):
    from minisae.data.activations import cache_activations, is_cache_folder
    from minisae.io.files import check_output_dir
    from minisae.xp import get_xp

    check_output_dir(a.out, "activation cache", is_own=is_cache_folder)  # before the model is loaded
    model, tokenizer = _load_model(a, get_xp(a.backend))
    man = cache_activations(model, tokenizer, a.text, a.site, a.out, seq_len=a.seq_len, batch_size=a.batch_size,
                            max_tokens=a.max_tokens, shard_tokens=a.shard_tokens, resume=not a.no_resume, overwrite=a.overwrite,
                            text_field=a.text_field, model_name=a.model, progress=not a.no_progress)
    print(f"{man['count']} tokens of {man['site']} (d_in {man['d_in']}) in {len(man['shards'])} shards at {a.out}")


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
    """Entry point of the `minisae` command; returns the exit status."""
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        check_values(parser, a)  # before any work: ranges, and options the chosen --arch would ignore
        check_arch_flags(a)
        COMMANDS[a.command](a)
    except KeyboardInterrupt:
        print(f"\nminisae {a.command}: interrupted (runs resume from their last checkpoint with --resume)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        status = _exit_status(e)
        if a.debug or status is None:
            raise
        print(f"minisae {a.command}: error: {_message(e)}", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
