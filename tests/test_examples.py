"""The README and examples/ cannot drift apart: every Python code block of README.md is preceded by
`<!-- example: examples/NAME.py -->` and is that file, byte for byte; every such file runs."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT, run_script

README = ROOT / "README.md"
MARK = re.compile(r"<!-- example: (\S+) -->")
SLURM_EXAMPLES = {"examples/slurm_pilots_demo.py"}


def readme_blocks():
    """(marker path or None, language, code) of every fenced block, in order."""
    text = README.read_text()
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, flags=re.M | re.S):
        before = text[:m.start()].rstrip("\n").splitlines()
        mark = MARK.fullmatch(before[-1].strip()) if before else None
        out.append((mark.group(1) if mark else None, m.group(1), m.group(2)))
    return out


def paired_examples():
    return [path for path, lang, _ in readme_blocks() if lang == "python"]


@pytest.mark.timeout(30)
def test_quick_start_has_exactly_the_two_commands():
    text = README.read_text()
    first = text.split("\n## ", 2)[1]           # the first section after the title
    assert first.startswith("Quick start")
    blocks = re.findall(r"```bash\n(.*?)```", first, flags=re.S)
    assert len(blocks) == 1
    assert [line for line in blocks[0].splitlines() if line.strip()] == [
        'pip install -e ".[test]" && python examples/decorator_demo.py',
        "python -m pytest",
    ]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "python -m pytest" in ci               # the very test command of the README


@pytest.mark.timeout(30)
def test_every_python_block_is_an_example_file():
    blocks = [b for b in readme_blocks() if b[1] == "python"]
    assert len(blocks) >= 3
    for path, _, code in blocks:
        assert path is not None, f"a python block in README.md has no '<!-- example: ... -->' line:\n{code[:200]}"
        f = ROOT / path
        assert f.is_file(), f"README names {path}, which does not exist"
        assert f.read_text().rstrip("\n") == code.rstrip("\n"), f"README block and {path} differ"
    assert len({p for p, _, _ in blocks}) == len(blocks), "two README blocks name the same file"
    # the three examples of the original README are there
    assert {"examples/decorator_demo.py", "examples/functional_demo.py", "examples/dag_demo.py"} <= set(
        p for p, _, _ in blocks)


@pytest.mark.timeout(30)
def test_readme_sections():
    text = README.read_text()
    for heading in ("## Installation", "## Build modes", "## Executors", "## Command line", "## Task logs",
                    "## Dry run and explain", "## Troubleshooting", "## Dependencies", "## Architecture in brief",
                    "## Performance", "## License"):
        assert heading in text, heading
    assert "python scripts/bench.py" in text.split("## Performance", 1)[1].split("\n## ", 1)[0]
    assert "GPL-3.0-or-later" in text
    for dep in ("pykka", "pyzmq", "cloudpickle", "tabulate", "submitit", "pytest-timeout"):
        assert dep in text.split("## Dependencies", 1)[1], dep


# run (and run again, to see them skip) by tests/test_integration.py's README test: not twice here
RUN_ELSEWHERE = {"examples/decorator_demo.py", "examples/functional_demo.py", "examples/dag_demo.py"}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("example", [p for p in paired_examples() if p not in SLURM_EXAMPLES | RUN_ELSEWHERE])
def test_example_runs(example, workdir):
    r = run_script(ROOT / example, workdir, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert "\033[" not in r.stdout                  # not a terminal: no escape codes
    if "dry_run" not in example:
        assert r.stdout.rstrip().endswith("All jobs done! Exit.") or "logs_demo" in example, r.stdout


@pytest.mark.slurm
@pytest.mark.timeout(300)
@pytest.mark.parametrize("example", sorted(SLURM_EXAMPLES))
@pytest.mark.parametrize("mode", ["pilots", "per-task"])
def test_slurm_example_runs(example, mode, workdir, slurm_cluster):
    env = {"DEPIO_ADDRESS": "127.0.0.1", "SBATCH_PARTITION": slurm_cluster["partition"], "DEPIO_SLURM_MODE": mode}
    r = run_script(ROOT / example, workdir, timeout=280, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.rstrip().endswith("All jobs done! Exit.")


@pytest.mark.timeout(150)
def test_rerun_example_reruns_only_the_edited_function(workdir):
    r = run_script(ROOT / "examples/rerun_demo.py", workdir, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    first, cosmetic, edited = r.stdout.split("--- ")[1:]
    assert "clean: product missing: build/clean.csv" in first
    assert "clean: up to date\ntotal: up to date" in cosmetic and "FINISHED" not in cosmetic
    assert "clean: up to date\ntotal: code of total changed (build/rerun_steps.py, def at line 11)" in edited
    final = edited[edited.rindex("Tasks:"):]
    assert final.count("SKIPPED") == 1 and final.count("FINISHED") == 1
    assert (workdir / "build" / "total.txt").read_text() == "3"
