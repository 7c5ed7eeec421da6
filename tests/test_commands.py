"""The commands the project prints for users, and the scripts on a machine without Triton.

- Every `python ...` / `torchrun ...` command line in README.md and in the docstrings of the scripts and of
  common/ and kernels/ is parsed by the argument parser of the script or module it runs (nothing is run), so a
  renamed or mistyped flag in the documentation fails here.
- In a process where `import triton` fails (as on macOS, Windows or a CPU-only image), every script's --help
  works and a few-step vit_micro run of mae.py and mim_refiner.py finishes on the torch references.
"""
import ast
import glob
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("mae.py", "mixmim.py", "mimco.py", "mae_ct.py", "mim_refiner.py")
MODULES = ("common.eval", "kernels.bench")


def documented_texts():
    """(where, text) pairs: README.md and the docstring of every first-party Python file."""
    texts = [("README.md", open(os.path.join(REPO, "README.md")).read())]
    for path in sorted(glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "common", "*.py"))
                       + glob.glob(os.path.join(REPO, "kernels", "*.py"))):
        docstring = ast.get_docstring(ast.parse(open(path).read()))
        if docstring:
            texts.append((os.path.relpath(path, REPO), docstring))
    return texts


def command_lines(text):
    """Candidate command lines of a text: lines of code blocks and docstrings (with `\\` continuations joined)
    and inline `code` spans, each cut at '&&'; only those that start with python or torchrun are kept."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    span = r"(?<!`)`([^`]+)`(?!`)"
    spans = [text.replace("\n", " ") for text in re.findall(span, prose)]
    blocks = fenced + [re.sub(span, " ", prose)] + spans
    lines = []
    for block in blocks:
        block = re.sub(r"\\\n\s*", " ", block)                 # shell line continuations
        for line in block.splitlines():
            line = re.sub(r"<[^<>]*>", "PLACEHOLDER", line.strip())   # <checkpoint>, <16-epoch MAE>
            for part in line.split("&&"):
                part = part.strip()
                if re.match(r"^(srun\s+)?(python|torchrun)\s", part):
                    lines.append(part)
    return lines


def target_and_args(command):
    """'python mae.py --x 1' -> ('mae.py', ['--x', '1']); 'python -m common.eval ...' -> ('common.eval', [...]);
    torchrun's own options are skipped up to the script. Returns (None, None) for other programs."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:
        return None, None
    tokens = [t for t in tokens if t != "..."]                   # "python mae.py ... --resume auto"
    if tokens[0] == "srun":
        tokens = tokens[1:]
    if "-m" in tokens[:2] and len(tokens) > 2 and tokens[0] == "python":
        return tokens[2], tokens[3:]
    for i, token in enumerate(tokens[1:], 1):
        if token.endswith(".py"):
            return os.path.basename(token), tokens[i + 1:]
    return None, None


def parse_function(target):
    module = importlib.import_module(target[:-3] if target.endswith(".py") else target)
    return module.get_args


def collected_commands():
    found = []
    for where, text in documented_texts():
        for line in command_lines(text):
            target, args = target_and_args(line)
            if target in SCRIPTS or (target in MODULES and args):   # a bare `python -m X` names a module
                found.append((where, line, target, args))
    return found


def test_every_documented_command_parses(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    commands = collected_commands()
    # Not vacuous: every script and module is documented with at least one command.
    assert {target for _, _, target, _ in commands} == set(SCRIPTS) | set(MODULES)
    failures = []
    for where, line, target, args in commands:
        try:
            parse_function(target)(args)
        except SystemExit as error:
            failures.append(f"{where}: `{line}` -> {error}")
    assert not failures, "documented commands that their parser rejects:\n" + "\n".join(failures)


def test_a_mistyped_flag_is_caught():
    """The check above is not vacuous: the parsers reject unknown flags and prefixes of flags."""
    with pytest.raises(SystemExit):
        parse_function("mae_ct.py")(["--protocols", "all"])
    with pytest.raises(SystemExit):
        parse_function("common.eval")(["--ckpt", "x.pth", "--protocols", "all"])


# ----------------------------------------------------------------------------------------------------------
# Without Triton
# ----------------------------------------------------------------------------------------------------------
BLOCK_TRITON = """
import importlib.abc, runpy, sys
class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoTriton())
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def run_without_triton(script, *args, cwd=REPO):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", BLOCK_TRITON, os.path.join(REPO, script), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def test_the_block_really_hides_triton():
    run = subprocess.run([sys.executable, "-c", BLOCK_TRITON.replace("runpy.run_path(script, run_name=\"__main__\")",
                                                                     "import triton"), "x"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "No module named 'triton'" in run.stderr


@pytest.mark.slow
def test_scripts_run_their_torch_path_without_triton(tmp_path, micro_checkpoint):
    for script in SCRIPTS:
        run = run_without_triton(script, "--help")
        assert run.returncode == 0 and "usage" in run.stdout, (script, run.stderr[-2000:])
    tiny = ["--model", "vit_micro", "--n_per_class", "4", "2", "--num_workers", "0"]
    run = run_without_triton("mae.py", *tiny, "--global_batch", "8", "--epochs", "1", "--output_dir", str(tmp_path / "mae"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert os.path.isfile(tmp_path / "mae" / "checkpoint-last.pth")
    micro_checkpoint(tmp_path / "start.pth")
    run = run_without_triton("mim_refiner.py", *tiny, "--ckpt", str(tmp_path / "start.pth"),
                             "--output_dir", str(tmp_path / "refiner"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert os.path.isfile(tmp_path / "refiner" / "checkpoint-last.pth")
    assert "using the torch backend" in run.stdout + run.stderr
