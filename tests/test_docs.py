"""Every command the README and docs/ show is run here, so the docs cannot drift from the code.

``lpcam ...`` (and ``torchrun ... -m lpcam_core.cli ...``) commands are parsed by lpcam's own parser as
written, flags, required arguments and all, with the command's function replaced (no data here);
``python benchmarks/<x>.py`` and ``lpcam bench <x>`` commands are parsed by that benchmark's parser; host
commands (``python run_sample.py``, ``python main.py``, CLIP-ES's scripts) are checked against the host's own parser when
$LPCAM_HOSTS holds the checkout. Set-up commands (make, pip, git) are listed and left to CI.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SETUP = ("make ", "pip ", "git ", "cd ", "export ", "ls ", "cat ", "mkdir ", "source ", "wget ", "curl ")


def commands() -> list[tuple[str, str]]:
    """(file:line, command) of every shell command in a fenced block (continuations joined, comments cut)."""
    found = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        inside, language = False, ""
        pending, start = "", 0
        for number, line in enumerate(lines, 1):
            if line.strip().startswith("```"):
                inside, language = (not inside), line.strip()[3:].strip()
                continue
            if not inside or language not in ("bash", "sh", "shell", "console", ""):
                continue
            text = line.split(" # ")[0].rstrip() if not line.lstrip().startswith("#") else ""
            if not pending:
                start = number
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            full = (pending + text).strip()
            pending = ""
            for part in re.split(r"\s*(?:&&|;)\s*", full):  # cd X && lpcam ... : each command on its own
                if part and re.match(r"^(\w+=\S*\s+)*(lpcam|torchrun|python|make|pip|git)\b", part):
                    found.append((f"{path.relative_to(ROOT)}:{start}", part))
    return found


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    while words and re.match(r"^\w+=", words[0]):  # VAR=value prefixes
        words.pop(0)
    return words


CASES = commands()
IDS = [f"{where}:{i}" for i, (where, _) in enumerate(CASES)]


def test_the_docs_show_commands():
    assert len(CASES) >= 8, CASES


@pytest.mark.parametrize("where, command", CASES, ids=IDS)
def test_documented_command_parses(where, command, monkeypatch):
    argv = _argv(command)
    if argv[0] == "torchrun":
        assert "-m" in argv and argv[argv.index("-m") + 1] == "lpcam_core.cli", f"{where}: {command}"
        argv = ["lpcam", *argv[argv.index("-m") + 2:]]
    if argv[0] == "lpcam":
        if argv[1:3] == ["bench"] or (len(argv) > 1 and argv[1] == "bench"):
            return _check_benchmark(where, argv[2], argv[3:])
        return _check_lpcam(where, argv[1:])
    if argv[0] == "python" and len(argv) > 1 and "benchmarks/" in argv[1]:
        return _check_benchmark(where, Path(argv[1]).stem, argv[2:])
    if argv[0] == "python" and len(argv) > 1 and argv[1] in HOST_SCRIPTS:
        return _check_host_script(where, argv[1], argv[2:])
    assert command.startswith(SETUP) or argv[0] in ("make", "pip", "git"), f"{where}: unchecked command {command!r}"


def _check_lpcam(where: str, argv: list[str]) -> None:
    from lpcam_core import cli

    parser = cli.build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            pytest.fail(f"{where}: `lpcam {' '.join(argv)}` does not parse (exit {exit_.code})")
        return
    assert getattr(args, "func", None) is not None, f"{where}: `lpcam {' '.join(argv)}` names no command"


def _check_benchmark(where: str, name: str, argv: list[str]) -> None:
    path = ROOT / "benchmarks" / f"{name}.py"
    assert path.is_file(), f"{where}: no benchmarks/{name}.py"
    spec = importlib.util.spec_from_file_location(f"docs_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    parse = getattr(module, "parse_args", None) or getattr(module, "build_parser", None)
    assert parse is not None, f"{where}: benchmarks/{name}.py has no parse_args(argv) to check its flags with"
    import inspect

    try:
        if inspect.signature(parse).parameters:
            parse(argv)
        else:
            parse().parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"{where}: `benchmarks/{name}.py {' '.join(argv)}` does not parse"


#: host script -> the clone under $LPCAM_HOSTS whose parser checks it
HOST_SCRIPTS = {"run_sample.py": "irn", "main.py": "MCTformer", "generate_cams_voc12.py": "CLIP-ES",
                "generate_cams_coco14.py": "CLIP-ES", "eval_cam.py": "CLIP-ES", "eval_cam_with_crf.py": "CLIP-ES"}
# CLIP-ES's clip/clip.py imports pkg_resources, gone from current setuptools: the adapter stands it in
WITH_ADAPTER = ("import runpy, sys; sys.path.insert(0, '.'); import lpcam_adapters.clip_es; "
                "script, sys.argv = sys.argv[1], sys.argv[1:]; runpy.run_path(script, run_name='__main__')")


def _check_host_script(where: str, script: str, argv: list[str]) -> None:
    hosts = os.environ.get("LPCAM_HOSTS")
    name = HOST_SCRIPTS[script]
    if not hosts or not (Path(hosts) / name / script).is_file():
        pytest.skip(f"{where}: the host's own {script} is checked when $LPCAM_HOSTS/{name} exists")
    flags = [a for a in argv if a.startswith("--")]
    cmd = [sys.executable, script, "--help"] if name != "CLIP-ES" else [sys.executable, "-c", WITH_ADAPTER, script, "--help"]
    proc = subprocess.run(cmd, cwd=Path(hosts) / name, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    if proc.returncode != 0:
        pytest.skip(f"{where}: {script} --help needs the host's dependencies ({proc.stderr.strip()[-200:]})")
    for flag in flags:
        assert flag.split("=")[0] in proc.stdout, f"{where}: {script} has no {flag}"


def python_snippets() -> list[tuple[str, str]]:
    """(file:line, code) of the ```python run blocks: snippets the docs promise run as written."""
    found = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        start = None
        for number, line in enumerate(lines, 1):
            if start is None and line.strip() == "```python run":
                start, body = number, []
            elif start is not None and line.strip() == "```":
                found.append((f"{path.relative_to(ROOT)}:{start}", "\n".join(body)))
                start = None
            elif start is not None:
                body.append(line)
    return found


SNIPPETS = python_snippets()


@pytest.mark.parametrize("where, code", SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_documented_snippet_runs(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {"__name__": "__docs__"})


def test_the_settings_guide_yaml_is_read_as_it_says(tmp_path):
    """docs/hosts/settings.md's YAML example, read by the IRN adapter's settings, gives what the page says;
    and the page names every variable every host reads."""
    from lpcam_adapters import irn
    from lpcam_adapters.settings import COMMON_ENV, read_settings

    page = (ROOT / "docs" / "hosts" / "settings.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml settings\n(.*?)```", page, re.S)
    assert block, "docs/hosts/settings.md: no ```yaml settings block"
    path = tmp_path / "settings.yaml"
    path.write_text(block.group(1))
    s = read_settings(irn.INFO.options, {"LPCAM_CONFIG": str(path)}, host="irn")
    assert (s.lpcam.preset_name, s.lpcam.num_clusters, s.lpcam.fg_threshold, s.lpcam.seed) == ("voc", 12, 0.15, 0)
    assert (s.bank_path, s.rebuild_bank, s.baseline_dir, s.proto_list, s.workers, s.device) == (
        "result/lpcam_bank.pt", False, "result/cam_baseline", "voc12/train.txt", 0, "cpu")
    assert s.option("amp") is False
    # later sources win: a variable over the file
    assert read_settings(irn.INFO.options, {"LPCAM_CONFIG": str(path), "LPCAM_K": "5"}).lpcam.num_clusters == 5
    missing = [var for var in COMMON_ENV if f"`{var}`" not in page]
    assert not missing, f"docs/hosts/settings.md does not name {missing}"
