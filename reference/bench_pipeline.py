"""The real experiment end to end, minisae beside transformers + SAELens doing the same work.

Three stages on Gemma 3 270M, on the same tokens and sizes for both sides:

  forward   one full forward pass of 1 x 1024 tokens to (1, 1024, V) logits (V = 262,144)
  capture   N tokens' activations at the site (default blocks.6.hook_resid_post), rows of 1024
            tokens, `--capture-rows` rows per call, computing nothing after the site's layer
            (minisae: model.capture; transformers: a forward hook on the layer that stops the pass)
  train     an SAE of width M (4096) for S steps of batch 1024 on those activations (BOS and PAD
            positions left out, as a real run does): TopK (k = 32) and JumpReLU (target L0 = 32)
            minisae: minisae.training.train.train (what `minisae train` runs), progress off
            SAELens: sae_lens.SAETrainer(...).fit() on TopKTrainingSAE / JumpReLUTrainingSAE with
            the settings that train well here (decoder init norm 1.0, b_dec at the data mean, data
            scaled to E|x|^2 = d_in as its expected_average_only_in does, no wandb); its defaults
            (decoder norm 0.1, b_dec 0) leave most latents dead on this model. JumpReLU uses its
            quadratic L0 penalty with target_l0 = 32 (Gemma Scope 2), TopK the same lr as minisae
  eval      delta LM loss of the TopK SAE on T held-out tokens (rows of 1024, one row per call):
            three passes per row (clean, SAE spliced in, zero-ablated; BOS positions kept), the
            mean next-token loss over real targets (PAD, EOS, BOS targets excluded)
            minisae: model.losses(ids, mask, [clean, sae, zero]) (what evaluate_lm calls)
            transformers + SAELens: three model(input_ids, labels=...) calls with a forward hook on
            the layer splicing the SAELens SAE's reconstruction in (labels -100 where excluded)

Quality is reported beside time (held-out FVU, L0, dead % on held-out tokens of the same split,
and the three losses), so no speed is bought with a worse SAE. Each side runs in its own
subprocess per round (the reference in a venv with torch, transformers and sae-lens); rounds
alternate which side goes first; tables show min and median over rounds and the ratio
reference / minisae of the medians (> 1: minisae faster). Threads: OMP / OpenBLAS / MKL and
torch.set_num_threads all set to --threads. The load average of the machine is printed with
each run (the numbers mean little on a loaded machine).

Run (repository root; the model folder holds config.json, model.safetensors and tokenizer.json):
    /work/venv/bin/python reference/bench_pipeline.py --model /work/models/gemma-3-270m-hf \\
        --ref-python /work/benchvenv/bin/python
    ... --quick       (a few thousand tokens, 20 steps, one round: checks that both sides run)
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = ("forward", "capture", "train_topk", "train_jumprelu", "eval")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/work/models/gemma-3-270m-hf")
    p.add_argument("--ref-python", default="/work/benchvenv/bin/python",
                   help="python with torch, transformers and sae-lens")
    p.add_argument("--site", default="blocks.6.hook_resid_post")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=8 * 1024, help="N: training tokens captured")
    p.add_argument("--heldout", type=int, default=2 * 1024, help="held-out tokens for FVU / L0 / dead")
    p.add_argument("--capture-rows", type=int, default=4, help="rows of --seq tokens per capture call")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--eval-tokens", type=int, default=2 * 1024, help="T: delta-LM-loss tokens")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small sizes, one round")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.heldout, a.steps, a.eval_tokens, a.rounds = 4 * 1024, 2 * 1024, 20, 1024, 1
    return a


# ---------------------------------------------------------------- tokens (parent, minisae venv)

def make_tokens(a, scratch):
    """ids / masks of the training, held-out and evaluation rows, written to scratch/tokens.npz."""
    import numpy as np

    from minisae.data.activations import iter_batches
    from minisae.data.corpora import write_corpus
    from minisae.models import load_tokenizer

    tok = load_tokenizer(a.model)
    rows = {}
    for split, need in (("train", (a.tokens + a.heldout) // a.seq), ("test", a.eval_tokens // a.seq)):
        path = Path(scratch) / f"sotu_{split}.jsonl"
        write_corpus("sotu", path, split)
        ids, masks = [], []
        for _, i, m in iter_batches(tok, [path], a.seq, 1):
            if i.shape[1] == a.seq and m.all():  # full rows only: every side sees exactly seq tokens per row
                ids.append(i)
                masks.append(m)
            if len(ids) == need:
                break
        if len(ids) < need:
            raise SystemExit(f"sotu {split}: only {len(ids)} full rows of {a.seq} tokens, need {need}")
        rows[split] = (np.concatenate(ids), np.concatenate(masks))
    n_train = a.tokens // a.seq
    special = np.array([tok.pad_id, tok.eos_id, tok.bos_id])
    np.savez(Path(scratch) / "tokens.npz", train_ids=rows["train"][0][:n_train], train_mask=rows["train"][1][:n_train],
             held_ids=rows["train"][0][n_train:], held_mask=rows["train"][1][n_train:],
             eval_ids=rows["test"][0], eval_mask=rows["test"][1], special=special)


def load_tokens(scratch):
    import numpy as np

    return dict(np.load(Path(scratch) / "tokens.npz"))


def layer_of(site):
    return int(site.split(".")[1])


def quality(x, f, xh):
    """Held-out FVU, mean L0 and dead fraction (no latent fires on any held-out token); numpy."""
    import numpy as np

    x, f, xh = (np.asarray(v, dtype=np.float64) for v in (x, f, xh))
    fvu = ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    active = f != 0
    return dict(fvu=float(fvu), l0=float(active.sum(1).mean()), dead=float((active.sum(0) == 0).mean()))


CPU = {}  # stage -> CPU seconds of this process (all its threads) during the stage's timed call


def timed(fn, key=None):
    """(wall seconds, fn()); with key, CPU[key] = the process's CPU seconds over the call."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    if key is not None:
        CPU[key] = time.process_time() - c0
    return wall, out


# ---------------------------------------------------------------- minisae worker

def worker_minisae(a):
    import numpy as np

    from minisae.models import load_model
    from minisae.training import optim
    from minisae.training.train import TrainConfig, train

    t = load_tokens(a.scratch)
    res = {"times": {}, "quality": {}}
    load_s, model = timed(lambda: load_model(a.model))
    res["load_s"] = load_s
    one = t["eval_ids"][:1]
    model.forward(one)  # warm-up (pages the weights in)
    res["times"]["forward"] = timed(lambda: model.forward(one), "forward")[0]

    def capture(ids, mask):  # (n, D) activations at real, non-BOS positions
        keep = mask & ~np.isin(ids, t["special"])  # (R, T)
        out = []
        for r0 in range(0, ids.shape[0], a.capture_rows):
            acts = model.capture(ids[r0:r0 + a.capture_rows], a.site)  # (r, T, D)
            out.append(acts[keep[r0:r0 + a.capture_rows]])
        return np.concatenate(out)

    res["times"]["capture"], pool = timed(lambda: capture(t["train_ids"], t["train_mask"]), "capture")
    held = capture(t["held_ids"], t["held_mask"])

    class Pool:
        d_in = pool.shape[1]

        def batch(self, step, batch_size):
            n = pool.shape[0] // batch_size
            i = step % n
            return pool[i * batch_size:(i + 1) * batch_size].copy()

        def sample(self, n, **_):
            return pool[:n]

    saes = {}
    warm = max(1, a.steps // 10)
    for variant in ("topk", "jumprelu"):
        extra = dict(k=a.k) if variant == "topk" else dict(target_l0=float(a.k), sparsity_warmup_steps=warm)
        cfg = TrainConfig(variant, d_sae=a.d_sae, steps=a.steps, batch_size=a.batch, warmup_steps=warm,
                          checkpoint_every=10 ** 9, log_every=10 ** 9, eval_tokens=0,
                          norm_sample_tokens=min(65536, pool.shape[0]), **extra)
        with tempfile.TemporaryDirectory() as run:
            s, result = timed(lambda: train(cfg, Pool(), Path(run) / "run", progress=False), f"train_{variant}")
        sae = result.sae
        f = sae.encode(held)
        res["quality"][variant] = quality(held, f, sae.decode(f))
        res["times"][f"train_{variant}"] = s
        saes[variant] = sae
    res["lr"] = {"topk": optim.topk_lr(a.d_sae)}

    sae = saes["topk"]
    site = a.site

    def evaluate():
        sums, n_all = [0.0, 0.0, 0.0], 0
        for r in range(t["eval_ids"].shape[0]):
            ids, mask = t["eval_ids"][r:r + 1], t["eval_mask"][r:r + 1]
            keep = (ids == t["special"][2])[..., None]  # (1, T, 1) BOS positions stay as they are

            def splice_sae(acts):
                B, T, D = acts.shape
                return np.where(keep, acts, sae(acts.reshape(B * T, D)).reshape(B, T, D))

            def splice_zero(acts):
                return np.where(keep, acts, np.zeros_like(acts))

            out = model.losses(ids, mask, [None, {site: splice_sae}, {site: splice_zero}],
                               exclude_ids=t["special"])
            n = out[0][1]
            for i in range(3):
                sums[i] += out[i][0] * n
            n_all += n
        return [s / n_all for s in sums] + [n_all]

    res["times"]["eval"], (clean, spliced, zero, n) = timed(evaluate, "eval")
    res["quality"]["lm"] = dict(ce_clean=clean, ce_sae=spliced, ce_zero=zero, delta=spliced - clean, tokens=n)
    return res


# ---------------------------------------------------------------- transformers + SAELens worker

def worker_reference(a):
    import numpy as np
    import torch
    import transformers
    from sae_lens import (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, LoggingConfig, SAETrainer,
                          TopKTrainingSAE, TopKTrainingSAEConfig)
    from sae_lens.config import SAETrainerConfig

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t = load_tokens(a.scratch)
    res = {"times": {}, "quality": {}}
    load_s, model = timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval())
    res["load_s"] = load_s
    layer = model.model.layers[layer_of(a.site)]
    one = torch.from_numpy(t["eval_ids"][:1])
    with torch.inference_mode():
        model(input_ids=one, use_cache=False)  # warm-up
        res["times"]["forward"] = timed(lambda: model(input_ids=one, use_cache=False).logits, "forward")[0]

    class Stop(Exception):
        pass

    grabbed = {}

    def stop_here(module, args, output):
        grabbed["acts"] = output[0] if isinstance(output, tuple) else output
        raise Stop  # compute nothing after the site's layer

    special = torch.from_numpy(t["special"])

    def capture(ids_np, mask_np):
        ids, mask = torch.from_numpy(ids_np), torch.from_numpy(mask_np)
        keep = mask & ~torch.isin(ids, special)
        out = []
        h = layer.register_forward_hook(stop_here)
        try:
            with torch.inference_mode():
                for r0 in range(0, ids.shape[0], a.capture_rows):
                    try:
                        model(input_ids=ids[r0:r0 + a.capture_rows], use_cache=False)
                    except Stop:
                        pass
                    out.append(grabbed.pop("acts")[keep[r0:r0 + a.capture_rows]])
        finally:
            h.remove()
        return torch.from_numpy(torch.cat(out).numpy().copy())  # a plain tensor (not inference-mode)

    res["times"]["capture"], pool = timed(lambda: capture(t["train_ids"], t["train_mask"]), "capture")
    held = capture(t["held_ids"], t["held_mask"])
    D = pool.shape[1]
    warm = max(1, a.steps // 10)
    res["lr_topk"] = float(json.loads(os.environ["BENCH_TOPK_LR"]))  # minisae's TopK lr (Gao et al.'s rule)
    saes = {}
    for variant in ("topk", "jumprelu"):
        def run():
            # SAELens's expected_average_only_in scale (E|x|^2 = d_in), applied to the data here
            scale = D ** 0.5 / pool.norm(dim=1).mean()
            data = pool * scale

            def provider():
                n = data.shape[0] // a.batch
                i = 0
                while True:
                    yield data[(i % n) * a.batch:(i % n + 1) * a.batch]
                    i += 1

            if variant == "topk":
                sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=a.d_sae, k=a.k, decoder_init_norm=1.0))
                lr = res["lr_topk"]
            else:
                sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
                    d_in=D, d_sae=a.d_sae, decoder_init_norm=1.0, jumprelu_sparsity_loss_mode="quadratic",
                    target_l0=float(a.k), l0_warm_up_steps=warm))
                lr = 7e-5  # Gemma Scope's (and minisae's JumpReLU default)
            with torch.no_grad():
                sae.b_dec.copy_(data.mean(0))  # b_dec centred at the data mean
            cfg = SAETrainerConfig(total_training_samples=a.steps * a.batch, train_batch_size_samples=a.batch,
                                   lr=lr, lr_end=lr, lr_warm_up_steps=warm, logger=LoggingConfig(log_to_wandb=False))
            SAETrainer(cfg, sae, provider()).fit()
            return sae, scale

        s, (sae, scale) = timed(run, f"train_{variant}")
        with torch.no_grad():
            x = held * scale
            f = sae.encode(x)
            res["quality"][variant] = quality(x.numpy(), f.numpy(), sae.decode(f).numpy())
        res["times"][f"train_{variant}"] = s
        saes[variant] = (sae, scale)

    sae, scale = saes["topk"]
    mode = {}

    def splice(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if mode["m"] == "clean":
            return None
        keep = mode["bos"]  # (1, T, 1)
        new = torch.zeros_like(h) if mode["m"] == "zero" else sae(h * scale) / scale
        new = torch.where(keep, h, new)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    def evaluate():
        sums, n_all = [0.0, 0.0, 0.0], 0
        h = layer.register_forward_hook(splice)
        try:
            with torch.inference_mode():
                for r in range(t["eval_ids"].shape[0]):
                    ids = torch.from_numpy(t["eval_ids"][r:r + 1])
                    mask = torch.from_numpy(t["eval_mask"][r:r + 1])
                    labels = ids.clone()
                    labels[~mask | torch.isin(ids, special)] = -100
                    n = int((labels[:, 1:] != -100).sum())
                    mode["bos"] = (ids == special[2])[..., None]
                    for i, m in enumerate(("clean", "sae", "zero")):
                        mode["m"] = m
                        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
                        sums[i] += float(loss) * n
                    n_all += n
        finally:
            h.remove()
        return [s / n_all for s in sums] + [n_all]

    res["times"]["eval"], (clean, spliced, zero, n) = timed(evaluate, "eval")
    res["quality"]["lm"] = dict(ce_clean=clean, ce_sae=spliced, ce_zero=zero, delta=spliced - clean, tokens=n)
    return res


# ---------------------------------------------------------------- parent

def run_worker(a, side, scratch):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(a.threads)
    from minisae.training import optim

    env["BENCH_TOPK_LR"] = json.dumps(optim.topk_lr(a.d_sae))
    env["TQDM_DISABLE"] = "1"
    python = sys.executable if side == "minisae" else a.ref_python
    out = Path(scratch) / f"{side}.json"
    cmd = [python, os.path.abspath(__file__), "--worker", side, "--scratch", scratch, "--model", a.model,
           "--site", a.site, "--seq", str(a.seq), "--capture-rows", str(a.capture_rows), "--d-sae", str(a.d_sae),
           "--k", str(a.k), "--steps", str(a.steps), "--batch", str(a.batch), "--threads", str(a.threads)]
    load = os.getloadavg()[0]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{side} worker failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    res = json.loads(out.read_text())
    res["load_before"], res["load_after"] = load, os.getloadavg()[0]
    return res


def versions(python):
    code = ("import json, platform, numpy;\ntry:\n import torch, transformers, sae_lens\n"
            " v = dict(torch=torch.__version__, transformers=transformers.__version__, sae_lens=sae_lens.__version__)\n"
            "except ImportError:\n v = {}\n"
            "print(json.dumps(dict(python=platform.python_version(), numpy=numpy.__version__, **v)))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


def summarise(rounds, a, key="times"):
    """{stage: {side: (min, median)}} over rounds, end to end = capture + train (both) + eval."""
    out = {}
    for stage in STAGES + ("end_to_end",):
        out[stage] = {}
        for side in ("minisae", "reference"):
            ts = []
            for r in rounds:
                tm = r[side][key]
                ts.append(sum(tm[s] for s in ("capture", "train_topk", "train_jumprelu", "eval"))
                          if stage == "end_to_end" else tm[stage])
            out[stage][side] = (min(ts), statistics.median(ts))
    return out


def print_tables(a, rounds, summary, info, cpu):
    N, S, T = a.tokens, a.steps, a.eval_tokens
    work = {"forward": f"1 x {a.seq} tokens to logits", "capture": f"{N} tokens at {a.site}",
            "train_topk": f"TopK k={a.k}, M={a.d_sae}, {S} steps x {a.batch}",
            "train_jumprelu": f"JumpReLU L0*={a.k}, M={a.d_sae}, {S} steps x {a.batch}",
            "eval": f"delta LM loss, {T} tokens x 3 passes", "end_to_end": "capture + both trainings + eval"}
    print(f"\n{info['date']}  {info['cpu']}  threads {a.threads}  load average {info['load']}")
    print(f"minisae: {info['minisae_env']}   reference: {info['ref_env']}\n")
    print("| stage | work | minisae s (min / median) | transformers + SAELens s (min / median) | ratio (median) | ratio (min) |")
    print("|---|---|---|---|---|---|")
    for stage, row in summary.items():
        m, r = row["minisae"], row["reference"]
        print(f"| {stage} | {work[stage]} | {m[0]:.2f} / {m[1]:.2f} | {r[0]:.2f} / {r[1]:.2f} | "
              f"{r[1] / m[1]:.2f}x | {r[0] / m[0]:.2f}x |")
    print("\nCPU seconds (all threads of the worker; less sensitive to a loaded machine than wall time):")
    print("| stage | minisae CPU s (median) | reference CPU s (median) | ratio |")
    print("|---|---|---|---|")
    for stage, row in cpu.items():
        m, r = row["minisae"][1], row["reference"][1]
        print(f"| {stage} | {m:.2f} | {r:.2f} | {r / m:.2f}x |")
    tok = {"forward": a.seq, "capture": N}
    print("\nthroughput (median): " + ", ".join(
        f"{s} {tok[s] / summary[s]['minisae'][1]:.0f} vs {tok[s] / summary[s]['reference'][1]:.0f} tokens/s"
        for s in tok))
    print("\nquality (last round; held-out tokens of the training split):")
    print("| SAE | side | held-out FVU | L0 | dead % |")
    print("|---|---|---|---|---|")
    last = rounds[-1]
    for v in ("topk", "jumprelu"):
        for side in ("minisae", "reference"):
            q = last[side]["quality"][v]
            print(f"| {v} | {side} | {q['fvu']:.4f} | {q['l0']:.1f} | {100 * q['dead']:.1f} |")
    print("\ndelta LM loss (TopK SAE, last round):")
    print("| side | CE clean | CE with SAE | CE zero-ablated | delta LM loss | tokens |")
    print("|---|---|---|---|---|---|")
    for side in ("minisae", "reference"):
        q = last[side]["quality"]["lm"]
        print(f"| {side} | {q['ce_clean']:.4f} | {q['ce_sae']:.4f} | {q['ce_zero']:.4f} | {q['delta']:.4f} | {q['tokens']} |")
    print("\nload average (1 min) before / after each worker: " + "; ".join(
        f"r{i} {s} {r[s]['load_before']:.1f}/{r[s]['load_after']:.1f}"
        for i, r in enumerate(rounds) for s in ("minisae", "reference")))


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        res = {"minisae": worker_minisae, "reference": worker_reference}[a.worker](a)
        res["cpu"] = CPU
        (Path(a.scratch) / f"{a.worker}.json").write_text(json.dumps(res))
        return
    import minisae  # noqa: F401
    from minisae.threads import blas_controller

    ctl = blas_controller()
    if ctl is not None:
        ctl.limit(limits=a.threads, user_api="blas")
    with tempfile.TemporaryDirectory() as scratch:
        make_tokens(a, scratch)
        rounds = []
        for r in range(a.rounds):
            order = ("minisae", "reference") if r % 2 == 0 else ("reference", "minisae")
            rounds.append({side: run_worker(a, side, scratch) for side in order})
            print(f"round {r}: " + ", ".join(f"{s} {json.dumps({k: round(v, 2) for k, v in rounds[-1][s]['times'].items()})}"
                                             for s in order), flush=True)
            report(a, rounds)  # after every round: a cut-short run still leaves its tables


def report(a, rounds):
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu,
                load=" ".join(f"{x:.1f}" for x in os.getloadavg()), minisae_env=versions(sys.executable),
                ref_env=versions(a.ref_python))
    summary, cpu_summary = summarise(rounds, a), summarise(rounds, a, "cpu")
    print_tables(a, rounds, summary, info, cpu_summary)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(args=vars(a), info=info, rounds=rounds, summary=summary,
                                                cpu=cpu_summary), indent=1))


if __name__ == "__main__":
    main()
