"""The command line imports a recipe only when its command runs: `-h` and one command's parsing stay light."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys

import pytest

from ar2dlm.cli import COMMANDS, main, parse

HEAVY = ("torch", "transformers", "lm_eval", "matplotlib")


def _modules_after(code: str) -> tuple[set[str], str]:
    """The modules a fresh interpreter has loaded after running `code` (which may exit), and its stdout."""
    script = (
        "import json, sys\n"
        "try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) +
        "except SystemExit:\n    pass\n"
        "print('\\nMODULES ' + json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    text, _, modules = out.stdout.rpartition("\nMODULES ")
    return set(json.loads(modules)), text


def test_help_lists_every_command_without_importing_a_recipe():
    modules, out = _modules_after("from ar2dlm.cli import main\nmain(['-h'])")
    assert all(command in out for command in COMMANDS)
    assert not [m for m in modules if m.startswith("ar2dlm.recipes.")]
    assert not [m for m in modules if m.split(".")[0] in HEAVY]


def test_parsing_one_command_imports_that_recipe_alone():
    modules, _ = _modules_after("from ar2dlm.cli import parse\n"
                                "recipe, args = parse(['generate', '--model', 'm', '--prompt', 'p', '--stop', 'a',"
                                " '--stop', 'b'])\n"
                                "assert recipe.config_from_args(args).decode.stop_strings == ('a', 'b')")
    assert [m for m in modules if m.startswith("ar2dlm.recipes.")] == ["ar2dlm.recipes.generate"]
    for heavy in ("lm_eval", "matplotlib", "ar2dlm.training.trainer", "ar2dlm.distillation.trajectories",
                  "ar2dlm.evaluation.likelihood", "ar2dlm.evaluation.points", "ar2dlm.data.tokenize"):
        assert heavy not in modules, heavy


def test_every_command_is_a_recipe_with_the_four_parts():
    for command, (module, help_text) in COMMANDS.items():
        recipe = importlib.import_module(module)
        assert callable(recipe.add_arguments) and callable(recipe.config_from_args) and callable(recipe.run)
        assert recipe.__doc__ and help_text, command


def test_lm_eval_gets_every_argument_and_others_refuse_unknown_ones(capsys):
    recipe, args = parse(["lm-eval", "--model_args", "pretrained=x", "--tasks", "t", "-h"])
    assert recipe.config_from_args(args).args == ("--model_args", "pretrained=x", "--tasks", "t", "-h")
    with pytest.raises(SystemExit) as e:
        parse(["report", "r.json", "--no-such-flag"])
    assert e.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "ar2dlm", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("ar2dlm ")
    out = subprocess.run([sys.executable, "-m", "ar2dlm", "report", "missing.json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == "ar2dlm: error: missing.json: results file not found"


@pytest.mark.parametrize("command, extra, message", [
    ("generate", ["--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
    ("chat", ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    ("eval", ["--task", "gsm8k", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    ("compare", ["--cache-delay", "0"], "--max-open-blocks and --cache-delay must be >= 1, --refresh-every >= 0"),
    ("bench-batching", ["--p-add", "2"], "--p-add must be in [0, 1], got 2.0"),
    ("generate", ["--tau", "2"], "threshold --tau must be in [0, 1], got 2.0"),
    ("generate", ["--policy", "steps", "--steps-per-forward", "0"], "needs --steps-per-forward >= 1"),
    ("generate", ["--policy", "ar", "--block-parallel"], "--block-parallel decoding needs"),
])
def test_decoding_errors_name_the_flag_the_user_typed(tmp_path, capsys, command, extra, message):
    """DecodeParams validates field values (`max_new_tokens`); on the command line the error names the flag."""
    needs = {"generate": ["--prompt", "p"]}.get(command, [])
    assert main([command, "--model", str(tmp_path / "no-model"), *needs, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ar2dlm: error: ") and message in err[0], err


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_each_default_once_and_never_none(command, capsys):
    if getattr(importlib.import_module(COMMANDS[command][0]), "REST_ARGS", False):
        pytest.skip("its help is lm_eval's own")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "default: None" not in text and "(default: )" not in text
    doubled = re.findall(r"\(default: [^)]*\) \(default: [^)]*\)", text)
    assert not doubled, doubled
