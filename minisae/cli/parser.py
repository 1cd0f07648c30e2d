"""The `minisae` command's argument parser: every subcommand's flags, their help and defaults.

    parser = build_parser()          # minisae.cli.main parses with it, then checks (minisae.cli.args)

Flag groups shared by several subcommands (synthetic data, the Gemma model and its site, backend
and progress) are added by the helpers below, so they read the same in every --help.
"""

import argparse

from minisae import __version__
from minisae.cli.args import OneLineParser, show_defaults


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


def _norm_ratio(text):
    if text.strip().lower() == "none":
        return "none"
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 1 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 1 or 'none', found {text!r}")
    return value


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
    g.add_argument("--max-norm-ratio", type=_norm_ratio, metavar="R", help="tokens whose activation norm at the "
                   "site exceeds R × the batch's median (massive activations, e.g. 0.3%% of Gemma 3 270M's layer-6 "
                   "tokens at 10-20 ×) are left out of the cache and left unspliced in delta LM loss; 'none' keeps "
                   "them (default: none; compare --model: 5)")


def build_parser():
    parser = OneLineParser(prog="minisae", description="Sparse autoencoders (JumpReLU, Gated, TopK) "
                                     "in NumPy/CuPy, trained and evaluated on synthetic data or Gemma 2 / Gemma 3 activations.")
    parser.add_argument("--version", action="version", version=f"minisae {__version__}")
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
    p.add_argument("--sparsity-coeff", "--lambda", dest="sparsity_coeff", type=float, metavar="LAMBDA",
                   help="sparsity coefficient λ; required for jumprelu and gated unless --target-l0 is given (then the "
                   "controller moves λ from here, default 0.01 JumpReLU, 0.03 Gated)")
    p.add_argument("--k", type=int, help="latents kept per token (topk; batchtopk: on average); required for them unless --target-l0 "
                   "is given (k = round(L0*))")
    p.add_argument("--matryoshka", type=_prefix_list, metavar="M1,M2,...",
                   help="Matryoshka loss over nested latent prefixes, e.g. 128,512,2048 (batchtopk, jumprelu; "
                        "d_sae is appended as the last prefix if missing)")
    p.add_argument("--threshold-rate", type=float, default=0.01,
                   help="batchtopk: averaging rate of the running inference threshold (default 0.01)")
    p.add_argument("--lr", type=float, help="learning rate (default per architecture: 7e-5 JumpReLU, 3e-4 Gated, 2e-4/sqrt(M/2^14) TopK)")
    p.add_argument("--steps", type=int, help="optimiser steps; required (or --tokens)")
    p.add_argument("--tokens", type=int, help="training tokens, instead of --steps (steps = tokens / --batch-size, rounded up)")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step B")
    p.add_argument("--warmup-steps", type=int, help="cosine lr warm-up (default: 5 %% of the steps, at most 1000)")
    p.add_argument("--sparsity-warmup-steps", type=int,
                   help="linear λ warm-up (default: 20 %% of the steps, at most 10000)")
    p.add_argument("--l0-warmup-steps", type=int,
                   help="with --target-l0 (jumprelu, gated): the controller's target descends from min(8·L0*, d_sae/4; Gated d_sae/10) "
                        "to L0* over these steps, so every latent fires often while the dictionary forms "
                        "(default: a third of the steps, at most 30000, where lr × steps >= 1, the weights can "
                        "travel far enough for it to pay; else 0 = start at L0*)")
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
                   "BatchTopK take k = round(L0*); JumpReLU (every penalty) and Gated start their thresholds at "
                   "the quantile of batch 0 that gives the L0 warm-up's start (--l0-warmup-steps), then a controller "
                   "moves them every step toward the warm-up's target and L0* after it; λ (--sparsity-coeff) moves "
                   "too: JumpReLU's to where Adam's push on θ balances (within a factor 100; fixed with --penalty "
                   "quadratic, where it is also the penalty's L0*), Gated's by the L0 error (within a factor 245)")
    p.add_argument("--threshold-lr-mult", type=float, default=1.0, help="JumpReLU: learning rate of θ = this × --lr "
                   "(default 1: the paper's single learning rate; 0.1 keeps θ from outrunning the weights)")
    p.add_argument("--threshold-param", choices=["log", "raw"], default="log",
                   help="JumpReLU: train log θ (log, the paper, default) or θ itself (raw, as SAELens ≥ 6.48)")
    p.add_argument("--threshold-init", type=float,
                   help="JumpReLU θ at init (default 0.001; with --target-l0 calibrated to the target)")
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
                       "and text. Run times, measured and dated: docs/benchmarks.md and docs/pipeline.md.")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a comparison")
    p.add_argument("--resume", action="store_true", help="finish an interrupted sweep (runs resume from checkpoints)")
    p.add_argument("--quick", action="store_true", help="a tiny comparison for smoke tests (12 SAEs of 32 latents, 250 steps each, after a pilot sweep of 6); with --model: 16384 cached tokens, sequences of at most 128 tokens")
    p.add_argument("--variants", nargs="+", choices=["jumprelu", "gated", "topk", "batchtopk", "matryoshka"],
                   help="SAE variants (default jumprelu gated topk: the paper's three; matryoshka = Matryoshka "
                        "BatchTopK)")
    p.add_argument("--targets", type=float, nargs="+", metavar="L0", help="target L0s (default 5 8 12 for "
                   "synthsaebench-cpu, 15 25 40 for synthsaebench-16k, 3 6 10 for toy, 16 32 64 with --model; 2 4 "
                   "with --quick)")
    p.add_argument("--seeds", type=int, help="seeds per variant and target (default 3; 2 with --quick)")
    p.add_argument("--d-sae", type=int, help="latents per SAE (default 512; 32 with --quick; 4096 with --preset "
                   "synthsaebench-16k; 4 × site width with --model, except with --quick)")
    p.add_argument("--steps", type=int, help="steps per SAE (default 3000; 250 with --quick; 195313 = 200M samples "
                   "with --preset synthsaebench-16k)")
    p.add_argument("--batch-size", type=int, help="tokens per step (default 512; 128 with --quick; 1024 with "
                   "--preset synthsaebench-16k)")
    p.add_argument("--lr", type=float, help="one learning rate for every variant, without the pilot sweep (default: "
                   "each variant's own, picked by the pilot sweep; 3e-4 with --preset synthsaebench-16k, the "
                   "published setting)")
    p.add_argument("--no-pilot", action="store_true", help="skip the pilot sweep: every variant at 0.01 (or --lr) "
                   "and JumpReLU at ε 0.001")
    p.add_argument("--pilot-lrs", type=float, nargs="+", metavar="LR", help="learning rates of the pilot sweep "
                   "(default 3e-3 1e-2 3e-2; 1e-3 3e-3 1e-2 with --model; 1e-2 3e-2 with --quick); JumpReLU crosses them with ε 1e-3 and 1e-2")
    p.add_argument("--threshold-lr-mult", type=float, help="JumpReLU θ learning rate = this × lr (default 1: the "
                   "paper's single learning rate)")
    p.add_argument("--jobs", type=int, help="training processes (default min(2, CPUs) on numpy, 1 on cupy)")
    p.add_argument("--tokens", type=int, help="with --model: activations to cache (default 1M; 16384 with --quick)")
    p.add_argument("--eval-text", nargs="+", metavar="FILE", help="with --model: texts for delta LM loss (default --text)")
    p.add_argument("--lm-tokens", type=int, help="with --model: scored tokens for each SAE's delta LM loss "
                   "(default 8192; 256 with --quick)")
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
