"""Coverage-guided fuzzing of the parsers fed from outside (tests/fuzz/fuzz_parsers.py):
the kept corpus (seeds and every crash once fixed) replayed, and a bounded search."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

HARNESS = os.path.join(ROOT, "tests", "fuzz", "fuzz_parsers.py")
CORPUS = os.path.join(ROOT, "tests", "fuzz", "corpus")
SEARCH_SECONDS = 60  # CI's share; run the harness by hand for longer


def fuzz(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, HARNESS, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=SEARCH_SECONDS + 120,
    )


def test_every_kept_input_parses_without_a_crash(tmp_path):
    inputs = sorted(os.path.join(CORPUS, name) for name in os.listdir(CORPUS))
    assert len(inputs) >= 12  # a seed for every parser at least
    replay = fuzz(*inputs, cwd=str(tmp_path))
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert replay.stderr.count("Running: ") == len(inputs)


@pytest.mark.slow
def test_a_bounded_search_finds_no_crash(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)  # what the search adds stays out of the repository
    search = fuzz(
        f"-max_total_time={SEARCH_SECONDS}",
        f"-artifact_prefix={tmp_path}/",
        str(corpus),
        cwd=str(tmp_path),
    )
    crashes = [name for name in os.listdir(tmp_path) if name.startswith(("crash-", "timeout-"))]
    assert search.returncode == 0 and not crashes, search.stderr[-3000:]
    runs = re.search(r"^Done (\d+) runs", search.stderr, re.MULTILINE)
    assert runs and int(runs.group(1)) > 10_000  # it searched, rather than stopping early
