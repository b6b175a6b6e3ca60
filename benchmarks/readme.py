"""Rewrite every generated block of README.md from the command that makes it, so no number in
the README is pasted by hand.

    python benchmarks/readme.py              # every block
    python benchmarks/readme.py --check      # exit 1 if a block's command now prints something else
    python benchmarks/readme.py --only bench # the blocks whose command contains "bench"

A generated block is a marker line followed by a fenced block:

    <!-- generated: cspify analyze torchvision:densenet121 -q -->
    ```console
    $ cspify analyze torchvision:densenet121 -q
    ...what the command printed...
    ```

The command runs in a fresh temporary folder (so files it writes vanish) with the repo's
examples and benchmarks reachable as ``$ROOT/...``; a ``console`` block shows the command
after ``$ `` (with ``$ROOT/`` dropped), any other block only its output. Timings change
from run to run: ``--check`` compares only blocks whose command does not time anything
(``bench``, ``timing.py``, progress lines).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- generated: (?P<command>.+?) -->\n```(?P<lang>\w*)\n(?P<body>.*?)^```\n", re.M | re.S)
TIMED = ("bench", "timing.py", "stability.py")


def run(command: str) -> str:
    """What ``command`` prints (stdout, then stderr), run from a fresh temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "ROOT": str(ROOT), "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
        done = subprocess.run(command, shell=True, cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"readme.py: `{command}` failed with exit code {done.returncode}:\n{done.stderr}")
    return (done.stderr + done.stdout) if "-q" not in command.split() else done.stdout


def block(command: str, lang: str) -> str:
    text = run(command).rstrip("\n") + "\n"
    if lang == "console":
        text = f"$ {command.replace('$ROOT/', '')}\n{text}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    parser.add_argument("--only", default="", help="only the blocks whose command contains this text")
    args = parser.parse_args()
    text = README.read_text()
    stale = []

    def regenerate(match: re.Match) -> str:
        command, lang = match["command"], match["lang"]
        if args.only not in command or (args.check and any(t in command for t in TIMED)):
            return match[0]
        print(f"readme.py: {command}", file=sys.stderr, flush=True)
        body = block(command, lang)
        if body != match["body"]:
            stale.append(command)
        return f"<!-- generated: {command} -->\n```{lang}\n{body}```\n"

    new = MARKER.sub(regenerate, text)
    if args.check:
        for command in stale:
            print(f"stale: {command}")
        raise SystemExit(1 if stale else 0)
    README.write_text(new)
    print(f"readme.py: {len(stale)} block(s) changed", file=sys.stderr)


if __name__ == "__main__":
    main()
