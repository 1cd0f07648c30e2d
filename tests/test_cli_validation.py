"""Every class of bad command line ends, before any work, in one line on stderr with exit status 2;
--help shows every default and never cites "SPEC" (a document the repository does not hold); and
every `minisae ...` command in README.md and docs/ parses, passes the same checks, and (for train)
resolves to a complete training config."""

import re
import shlex
import time
from pathlib import Path

import pytest
from test_cli import TINY_TRAIN, _error_line

from minisae.cli import build_parser, main
from minisae.cli.args import check_arch_flags, check_values
from minisae.experiment.compare import DEFAULT_SYNTHETIC, CompareConfig, quick_config
from minisae.training.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["train", "eval", "compare", "cache", "convert"]


def _train(tmp_path, *extra):
    return ["train", "--out", str(tmp_path / "run")] + TINY_TRAIN + list(extra)


@pytest.mark.parametrize("extra, words", [
    (["--arch", "jumprelu", "--lambda", "1e-2", "--batch-size", "0"], "--batch-size: expected an integer >= 1, found 0"),
    (["--arch", "jumprelu", "--lambda", "1e-2", "--lr", "-1"], "--lr: expected a number > 0, found -1"),
    (["--arch", "jumprelu", "--lambda", "1e-2", "--lr", "nan"], "--lr: expected a number > 0, found nan"),
    (["--arch", "jumprelu", "--lambda", "-3"], "--sparsity-coeff: expected a number >= 0"),
    (["--arch", "jumprelu", "--lambda", "1e-2", "--decay-frac", "1.5"], "--decay-frac: expected a number in [0, 1]"),
    (["--arch", "topk", "--k", "4", "--lambda", "1e-2"], "--sparsity-coeff/--lambda does not apply to --arch topk"),
    (["--arch", "jumprelu", "--lambda", "1e-2", "--k", "4"], "--k does not apply to --arch jumprelu"),
    (["--arch", "gated", "--lambda", "1e-2", "--bandwidth", "0.1"], "--bandwidth does not apply to --arch gated"),
    (["--arch", "jumprelu", "--lambda", "1e-2", "--aux-k", "4"], "--aux-k does not apply to --arch jumprelu"),
    (["--arch", "topk", "--k", "40"], "--k: expected at most --d-sae (32) latents per token, found 40"),
    (["--arch", "topk", "--k", "4", "--d-sae", "100000000"], "choose a smaller --d-sae or --batch-size"),
    (["--arch", "topk", "--k", "4", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--arch", "topk", "--k", "4", "--d-in", "0"], "--d-in: expected an integer >= 1, found 0"),
    (["--arch", "topk", "--k", "4", "--max-freq", "2"], "--max-freq: expected a number in (0, 1]"),
    (["--arch", "topk", "--k", "4", "--holdout-tokens", "5"], "--holdout-tokens needs --activations"),
])
def test_bad_train_values_fail_at_once_in_one_line(tmp_path, capsys, extra, words):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) if "invalid int" in words else _no_raise():
        assert main(_train(tmp_path, *extra)) == 2
    err = _error_line(capsys)
    assert words in err, err
    assert not (tmp_path / "run").exists()  # nothing written, nothing trained
    assert time.perf_counter() - t0 < 5


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_other_commands_check_values_before_loading_anything(tmp_path, capsys):
    missing = str(tmp_path / "no_model")
    assert main(["cache", "--model", missing, "--site", "blocks.0.hook_resid_post", "--text", "t.txt",
                 "--out", str(tmp_path / "c"), "--batch-size", "0"]) == 2
    assert "--batch-size: expected an integer >= 1, found 0" in _error_line(capsys)
    assert main(["cache", "--model", missing, "--site", "blocks.0.hook_resid_post", "--text", "t.txt",
                 "--out", str(tmp_path / "c"), "--max-tokens", "0"]) == 2
    assert "--max-tokens" in _error_line(capsys)
    assert main(["compare", "--quick", "--out", str(tmp_path / "cmp"), "--targets", "4", "0"]) == 2
    assert "--targets: expected a number > 0, found 0.0" in _error_line(capsys)
    assert main(["compare", "--quick", "--out", str(tmp_path / "cmp"), "--seeds", "0"]) == 2
    assert "--seeds: expected an integer >= 1, found 0" in _error_line(capsys)
    assert main(["compare", "--quick", "--out", str(tmp_path / "cmp"), "--d-sae", "-5"]) == 2
    assert "--d-sae" in _error_line(capsys)
    t0 = time.perf_counter()  # every sweep setting is checked before the first SAE trains
    assert main(["compare", "--quick", "--out", str(tmp_path / "cmp"), "--d-sae", "4", "--targets", "2", "10",
                 "--no-progress"]) == 2
    assert "targets in (0, d_sae=4]" in _error_line(capsys) and time.perf_counter() - t0 < 5
    assert main(["compare", "--quick", "--out", str(tmp_path / "cmp"), "--variants", "jumprelu", "--lr", "0",
                 "--no-progress"]) == 2
    assert "--lr" in _error_line(capsys) and not (tmp_path / "cmp").exists()
    assert main(["eval", "--sae", "x", "--json", str(tmp_path / "no" / "e.json")]) == 2
    assert "its folder does not exist" in _error_line(capsys)
    for cmd in (["cache", "--out", str(tmp_path / "c")], ["eval", "--sae", "x/y"]):  # texts checked before the model
        assert main(cmd + ["--model", missing, "--site", "blocks.0.hook_resid_post", "--text", str(tmp_path / "t.txt")]) == 2
        assert "--text" in _error_line(capsys)
    assert main(["eval", "--sae", "x", "--lm-batch-size", "0"]) == 2
    assert "--lm-batch-size" in _error_line(capsys)
    for ratio in ("1", "0.5", "inf", "nan", "x"):
        with pytest.raises(SystemExit) as e:
            main(["cache", "--model", missing, "--site", "blocks.0.hook_resid_post", "--text", "t.txt",
                  "--out", str(tmp_path / "c"), "--max-norm-ratio", ratio])
        assert e.value.code == 2 and "--max-norm-ratio: expected a number > 1 or 'none'" in _error_line(capsys)
    assert not (tmp_path / "c").exists() and not (tmp_path / "cmp").exists()


def test_a_mistyped_local_path_does_not_ask_the_hub(tmp_path, capsys, monkeypatch):
    (tmp_path / "runs" / "jr").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    assert main(["eval", "--sae", "runs/jr/sea", "--synthetic"]) == 2
    assert "runs/jr/sea: no such file or folder" in _error_line(capsys)
    assert time.perf_counter() - t0 < 2


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--arch", "nope", "--out", "x"])
    assert e.value.code == 2
    assert "invalid choice: 'nope'" in _error_line(capsys)


# ---- --help -----------------------------------------------------------------------------------

def _short(v):
    """1000000 -> 1M, 10000000 -> 10M: how help texts may write round numbers."""
    return f"{v // 10**6}M" if isinstance(v, int) and v >= 10**6 and v % 10**6 == 0 else None


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_shows_every_default_and_no_spec(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    assert "SPEC" not in capsys.readouterr().out
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(getattr(a, "choices", None), dict)).choices[cmd]
    fmt = sub._get_formatter()
    for action in sub._actions:
        d = action.default
        if not action.option_strings or d is None or d is False or action.dest == "help":
            continue
        text = fmt._expand_help(action)  # the help text as --help prints it
        forms = {f"{d:g}" if isinstance(d, float) else str(d), _short(d)}
        assert "default" in text and any(f and f in text for f in forms), (cmd, action.dest, d, text)


def test_compare_help_states_the_true_defaults(capsys):
    from minisae.experiment.compare import DEFAULT_TARGETS

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    full, quick = CompareConfig(), quick_config()
    assert f"default {full.d_sae}; {quick.d_sae} with --quick" in text
    assert f"default {full.steps}; {quick.steps} with --quick" in text
    assert f"default {full.batch_size}; {quick.batch_size} with --quick" in text
    assert f"default {full.seeds}; {quick.seeds} with --quick" in text
    assert "default " + " ".join(full.variants) in text
    cpu = " ".join(f"{t:g}" for t in DEFAULT_TARGETS[full.preset])
    qt = " ".join(f"{t:g}" for t in quick.targets)
    assert f"default {cpu} for {full.preset}" in text and f"{qt} with --quick" in text
    assert f"every variant at {full.lr['jumprelu']:g} (or --lr)" in text  # --no-pilot
    assert "(default " + " ".join(f"{lr:.0e}".replace("e-0", "e-") for lr in full.pilot_lrs) in text
    assert " ".join(f"{lr:.0e}".replace("e-0", "e-") for lr in quick.pilot_lrs) + " with --quick" in text
    for flag, key in (("--n-features", "n_features"), ("--true-l0", "target_l0"), ("--max-freq", "max_freq"),
                      ("--noise-std", "noise_std"), ("--offset-norm", "offset_norm"), ("--d-in", "d_in")):
        assert re.search(rf"{flag} \S+ .*?\(default {DEFAULT_SYNTHETIC[key]:g}\)", text), flag


# ---- the README's and docs' commands ------------------------------------------------------------

def _shell_blocks(text):
    """The bodies of the ```bash / ```sh / ```console / plain fenced blocks of a Markdown text."""
    blocks, body, lang = [], None, None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if body is None:
                body, lang = [], line.strip()[3:].strip()
            else:
                if lang in ("bash", "sh", "console", "shell", ""):
                    blocks.append("\n".join(body))
                body = None
        elif body is not None:
            body.append(line)
    return blocks


def _doc_commands():
    """Every `minisae ...` command in the shell blocks of README.md and docs/ (continuations joined)."""
    found = []
    for path in [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md")):
        for block in _shell_blocks(path.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                if "minisae " not in line:
                    continue
                lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
                lex.whitespace_split, lex.commenters, cmd = True, "#", []
                for word in list(lex) + [";"]:
                    if word in (";", "&&", "||", "|", "&"):
                        if cmd[:1] == ["minisae"]:
                            found.append((path.relative_to(ROOT).as_posix(), cmd[1:]))
                        cmd = []
                    else:
                        cmd.append(word)
    return found


DOC_COMMANDS = _doc_commands()


def test_the_docs_have_commands():
    assert len(DOC_COMMANDS) >= 5 and any(f == "README.md" for f, _ in DOC_COMMANDS)


@pytest.mark.parametrize("where, argv", DOC_COMMANDS, ids=[" ".join(a[:3]) for _, a in DOC_COMMANDS])
def test_documented_commands_are_valid(where, argv):
    """What the docs say parses, passes the value and --arch checks, and a documented `train`
    resolves to a complete config (the README's `train ... --out runs/jr` once lacked a length)."""
    parser = build_parser()
    a = parser.parse_args(argv)
    check_values(parser, a)
    check_arch_flags(a)
    if a.command == "train":
        cfg = TrainConfig(architecture=a.arch, d_sae=a.d_sae, sparsity_coeff=a.sparsity_coeff, k=a.k,
                          steps=a.steps, tokens=a.tokens, batch_size=a.batch_size)
        cfg.resolved(d_in=64)


def test_memory_estimate_uses_the_device_memory_on_cupy():
    """On CuPy the bound is the device's memory (a stand-in module here: no GPU needed)."""
    from minisae.errors import ResourceError
    from minisae.training.train import check_memory, memory_estimate

    class FakeCupy:
        class cuda:
            class Device:
                mem_info = (0, 2**30)  # (free, total): a 1 GiB device

    cfg = TrainConfig("topk", d_sae=2**16, k=8, steps=1, batch_size=4096).resolved(d_in=64)
    assert memory_estimate(cfg, 64) > 2**30
    with pytest.raises(ResourceError, match="1.0 GiB of GPU memory"):
        check_memory(cfg, 64, FakeCupy)
    check_memory(TrainConfig("topk", d_sae=64, k=8, steps=1, batch_size=64).resolved(d_in=64), 64, FakeCupy)
