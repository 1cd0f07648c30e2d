"""Delta LM loss of several SAEs on the same tokens, as `minisae compare` evaluates a sweep: each SAE
alone (clean, SAE and zero-ablated passes every time) against one shared baseline (the clean and
zero-ablated losses computed for the first SAE and reused). Prints one table; the numbers agree.

    /work/venv/bin/python reference/bench_lm_eval.py --model gemma-3-270m-q4_k_m.gguf \\
        --saes runs/real/runs/*-L032-s0/sae --text corpus:sotu:test
"""

import argparse
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--saes", nargs="+", required=True)
    p.add_argument("--text", nargs="+", default=["corpus:sotu:test"])
    p.add_argument("--site", default="blocks.6.hook_resid_post")
    p.add_argument("--lm-tokens", type=int, default=2048)
    p.add_argument("--max-norm-ratio", type=float, default=5.0)
    a = p.parse_args(argv)
    import minisae
    from minisae.eval.evaluate import evaluate_lm
    from minisae.io.saefile import SAE

    model, tok = minisae.load_model(a.model), minisae.load_tokenizer(a.model)
    saes = [SAE.load(s) for s in a.saes]
    kw = dict(max_tokens=a.lm_tokens, max_norm_ratio=a.max_norm_ratio)
    times, results = {}, {}
    for name, shared in (("each SAE alone", None), ("one shared baseline", {})):
        t0 = time.perf_counter()
        results[name] = [evaluate_lm(s, model, tok, a.text, a.site, baseline=shared, **kw) for s in saes]
        times[name] = time.perf_counter() - t0
    same = results["each SAE alone"] == results["one shared baseline"]
    print(f"| {len(saes)} SAEs, delta LM loss on {a.lm_tokens} tokens | seconds |")
    print("|---|---|")
    for name, secs in times.items():
        print(f"| {name} | {secs:.1f} |")
    print(f"results identical: {same}")


if __name__ == "__main__":
    main()
