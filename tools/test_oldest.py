"""Run the test suite against the oldest dependency versions spa claims to support.

pyproject.toml states a floor for each runtime dependency (``onnx>=1.17``...). This script
builds a fresh virtual environment, installs spa with its test extras while pinning every
runtime dependency to its floor, prints the versions it got, and runs pytest there. A floor
that does not install or does not pass is not a floor: raise it in pyproject.toml.

    python tools/test_oldest.py                       # venv in ./.venv-oldest, whole suite
    python tools/test_oldest.py --venv /tmp/v -- -x tests/test_cli.py

Exit status: pytest's, or 2 when the environment cannot be built.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CORE = ("onnx", "onnxruntime", "numpy", "networkx", "click", "sympy", "rich")
# The test tools themselves need newer releases of these, so the suite cannot run at their floors;
# they are left to the resolver and printed. spa uses only long-stable parts of their APIs.
HELD_BY_TEST_TOOLS = {
    "click": "huggingface-hub (through transformers) needs click>=8.4.2",
    "sympy": "torch 2.13 needs sympy>=1.13.3",
}


def floors() -> dict[str, str]:
    """``name -> lowest version`` for every runtime dependency with a ``>=`` bound."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for requirement in project["dependencies"]:
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", requirement)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def test_extras() -> list[str]:
    """The extra install line of the README's test command (torchvision without its deps)."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"pip install --no-deps (\S+)", readme)
    return [match.group(1)] if match else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-oldest")
    parser.add_argument("--skip-install", action="store_true", help="reuse an environment built before")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args()

    pins = {name: version for name, version in floors().items() if name not in HELD_BY_TEST_TOOLS}
    for name, why in HELD_BY_TEST_TOOLS.items():
        print(f"{name}: not pinned at its floor ({why})")
    python = args.venv / "bin" / "python"
    if not args.skip_install:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(args.venv)], check=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
            constraints.write("".join(f"{name}=={version}\n" for name, version in pins.items()))
        install = [str(python), "-m", "pip", "install", "--quiet", f"{ROOT}[test]", "-c", constraints.name]
        if subprocess.run(install).returncode != 0:
            print(f"cannot install the floors {pins}: raise the one pip names in pyproject.toml", file=sys.stderr)
            return 2
        extras = test_extras()
        if extras:
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", *extras], check=True)
    report = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m, sys; print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))",
            *CORE,
            "torch",
            "onnxscript",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = report.stdout.strip()
    print(f"oldest supported environment: {installed}", flush=True)
    got = dict(pair.split("==") for pair in installed.split())
    wrong = [f"{name}=={got[name]}" for name in pins if name in got and Version(got[name]) != Version(pins[name])]
    if wrong:
        print(f"not at their floors: {' '.join(wrong)}", file=sys.stderr)
        return 2
    return subprocess.run(
        [str(python), "-m", "pytest", "-p", "no:cacheprovider", *args.pytest_args], cwd=ROOT
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
