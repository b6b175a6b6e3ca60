"""What the benchmark scripts share: building zoo models, percentages, a note's marked section.

    from common import build, pct
    model = build("resnet50")            # torchvision by default; "timm:darknet53" for timm
    pct(4.11e9, 3.70e9)                  # '-10.1%'

Each script runs as ``python benchmarks/NAME.py`` (this folder is then on sys.path).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cspify.load import load_model


# The paper's transform alone: the kinds of stage the CSPNet paper converts. The scripts
# that put cspify next to the paper's figures (paper.py, savings.py, accuracy.py) keep to
# them, so their figures do not move as cspify learns other kinds.
PAPER_KINDS = ("residual", "dense")


def build(spec: str, seed: int = 0) -> torch.nn.Module:
    """A zoo model in eval mode with seeded random weights: ``NAME`` (torchvision), ``timm:NAME``."""
    torch.manual_seed(seed)
    return load_model(spec if ":" in spec else f"torchvision:{spec}").model


def pct(before: float, after: float) -> str:
    """The change from ``before`` to ``after`` in percent, signed: '-10.1%'."""
    return f"{100 * (after - before) / before:+.1f}%"


def write_section(path: str, text: str, begin: str, end: str, heading: str | None = None) -> None:
    """Put ``text`` (which starts with ``begin`` and ends with ``end``) in the file at
    ``path`` in place of the section between those markers, or of the ``heading`` section up
    to the next "## " heading, else at its end; the rest of the file stays as it is."""
    file = Path(path)
    old = file.read_text() if file.exists() else ""
    text = text.rstrip("\n") + "\n"
    marked = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    titled = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE) if heading else None
    if marked.search(old):
        new = marked.sub(lambda _: text, old, count=1)
    elif titled is not None and titled.search(old):
        new = titled.sub(lambda match: text + ("\n" if match.end() < len(old) else ""), old, count=1)
    else:
        new = old.rstrip("\n") + ("\n\n" if old.strip() else "") + text
    file.write_text(new)
