"""What the benchmark scripts share: building zoo models, percentages, the README's writer.

    from common import build, pct
    model = build("resnet50")            # torchvision by default; "timm:darknet53" for timm
    pct(4.11e9, 3.70e9)                  # '-10.1%'

Each script runs as ``python benchmarks/NAME.py`` (this folder is then on sys.path).
"""

from __future__ import annotations

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
