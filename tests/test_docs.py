"""Every command in the README and docs/*.md runs: fenced blocks marked ``<!-- test: ... -->``.

The marker says how to run the block at a small scale:

- ``<!-- test: --flag=value ... -->`` above a bash block: each command (``&&`` parts of each
  line) runs with those flags appended (absl: the last value wins) and its output in a
  temporary folder; ``python3 -m venv``, ``. .venv/bin/activate`` and ``pip install`` are CI's
  part (``.ci/run``, checked here);
- ``<!-- test: ci -->``: the command is CI's (``.ci/run`` must run exactly it);
- ``<!-- test: name=value ... -->`` above a python block: the block runs as a program with
  those keyword arguments replaced.
"""

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
MARK = re.compile(r"<!-- test: (.*?) -->\n```(\w+)\n(.*?)\n```", re.S)
SETUP = ("python3 -m venv", ". .venv/bin/activate", "pip install")
COMMAND = re.compile(r"^(ntkdfl-\w+|python3? |pip |bash )")


def _blocks():
    for page in PAGES:
        text = open(page, encoding="utf-8").read()
        for mark, language, body in MARK.findall(text):
            yield os.path.relpath(page, ROOT), mark.strip(), language, body


def _commands(body):
    """The block's commands: continuation lines joined, comments dropped, split at &&."""
    for line in body.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        for part in filter(None, (p.strip() for p in line.split("&&"))):
            yield part


BLOCKS = list(_blocks())
RUNS = [(page, mark, command) for page, mark, language, body in BLOCKS
        if language == "bash" and mark != "ci" for command in _commands(body)
        if not command.startswith(SETUP)]
PROGRAMS = [(page, mark, body) for page, mark, language, body in BLOCKS if language == "python"]


def test_every_fenced_command_is_marked():
    """A fenced block that runs a command carries a test marker."""
    for page in PAGES:
        text = open(page, encoding="utf-8").read()
        marked = {body for _, _, body in MARK.findall(text)}
        for language, body in re.findall(r"```(\w*)\n(.*?)\n```", text, re.S):
            runs = any(COMMAND.match(c) for c in _commands(body))
            if language in ("bash", "sh") or (language == "" and runs):
                assert body in marked, f"{page}: unmarked commands\n{body}"


def test_ci_runs_the_readme_test_and_setup_commands():
    """.ci/run installs as the README says and ends with exactly the README's test command."""
    ci = open(os.path.join(ROOT, ".ci", "run")).read().strip().splitlines()
    readme_ci = [b for p, mark, _, b in BLOCKS if p == "README.md" and mark == "ci"]
    assert readme_ci == ["python -m pytest tests"]
    assert ci[-1] == readme_ci[0]
    assert any(line.startswith("python3 -m venv") for line in ci)
    assert any(line.startswith("pip install") and '".[test]"' in line for line in ci)


def _env_and_argv(command):
    words = shlex.split(command)
    env = dict(os.environ)
    while "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = os.path.abspath(os.path.join(ROOT, value)) if key.endswith("_DIR") else value
    if words[0].startswith("ntkdfl-"):
        words[0] = os.path.join(os.path.dirname(sys.executable), words[0])
    elif words[0] in ("python", "python3"):
        words[0] = sys.executable
    return env, words


@pytest.mark.parametrize("page, mark, command", RUNS,
                         ids=[f"{p}:{c[:60]}" for p, _, c in RUNS])
def test_documented_command_runs(tmp_path, page, mark, command):
    env, argv = _env_and_argv(command)
    if "--helpshort" not in argv:
        argv += shlex.split(mark) + [f"--logdir={tmp_path}/logs", "--verbose=2"]
        if not os.path.basename(argv[0]).endswith(("compare", "byzantine")):
            argv.append(f"--save_dir={tmp_path}/models")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    expected = 1 if "--helpshort" in argv else 0  # absl's help exits with 1
    assert out.returncode == expected, f"{command}\n{out.stderr[-3000:]}"
    assert out.stdout.strip(), command


def _with_keywords(code, mark):
    """``code`` with each ``name=value`` keyword argument of ``mark`` replacing the code's."""
    for item in re.findall(r"(\w+)=(\S+)", mark):
        name, value = item
        start = code.find(f"{name}=")
        assert start >= 0, f"{name}= is not in the block"
        i, depth = start + len(name) + 1, 0
        while depth > 0 or code[i] not in ",)\n":
            depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(code[i], 0)
            i += 1
        code = code[:start] + f"{name}={value}" + code[i:]
    return code


@pytest.mark.parametrize("page, mark, code", PROGRAMS, ids=[p for p, _, _ in PROGRAMS])
def test_documented_program_runs(tmp_path, page, mark, code):
    script = tmp_path / "example.py"
    script.write_text(_with_keywords(code, mark))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Round 1/1" in out.stdout  # the progress display of fit
