"""What a user's type checker says about lorambo's public API: ``mypy --strict`` on a script
that uses it correctly (``user_code.py``) reports nothing, and on one with typical mistakes
(``user_code_mistakes.py``) reports each of them. mypy analyses this checkout's lorambo (the
installed package carries ``py.typed``, tests/test_packaging.py) and reports on the two files
only, as it does for an installed package. One mypy run serves every test here."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CORRECT = HERE / "user_code.py"
MISTAKES = HERE / "user_code_mistakes.py"
REPORT = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): error: (?P<message>.*)  \[(?P<code>[a-z-]+)\]$")


# What a user's strict mypy reports on their own file. torch's own unannotated calls
# (Tensor.backward) are not lorambo's; the optional packages lorambo imports are not analysed,
# which keeps the run near 10 s (their types become Any; lorambo's own stay checked).
CONFIG = """\
[mypy]
strict = True
follow_imports = silent
untyped_calls_exclude = torch

[mypy-transformers.*,peft.*,accelerate.*,safetensors.*,matplotlib.*,triton.*]
follow_imports = skip
"""


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory):
    """{(file name, line): [(code, message)]} of one ``mypy --strict`` run over both files."""
    tmp = tmp_path_factory.mktemp("mypy")
    (tmp / "mypy.ini").write_text(CONFIG)
    env = {**os.environ, "MYPYPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")])}
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(tmp / "mypy.ini"), "--cache-dir", str(tmp / "cache"),
         "--no-error-summary", "--show-error-codes", "--no-pretty", str(CORRECT), str(MISTAKES)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    errors: dict = {}
    for line in proc.stdout.splitlines():
        match = REPORT.match(line)
        if match:
            key = (Path(match["file"]).name, int(match["line"]))
            errors.setdefault(key, []).append((match["code"], match["message"]))
    assert proc.returncode in (0, 1) and not proc.stderr.strip(), proc.stdout + proc.stderr
    return errors


def test_correct_use_of_the_public_api_type_checks(mypy_errors):
    reported = {key: found for key, found in mypy_errors.items() if key[0] == CORRECT.name}
    assert reported == {}


def test_each_mistake_is_reported_with_its_code_and_nothing_else(mypy_errors):
    expected = {(MISTAKES.name, number): code
                for number, text in enumerate(MISTAKES.read_text().splitlines(), start=1)
                for code in re.findall(r"# error: ([a-z-]+)", text)}
    assert len(expected) >= 6
    reported = {key: [code for code, _ in found] for key, found in mypy_errors.items() if key[0] == MISTAKES.name}
    assert reported == {key: [code] for key, code in expected.items()}
