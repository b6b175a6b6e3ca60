"""cspify: turn a PyTorch model into its Cross Stage Partial (CSP) version.

    import torch, cspify
    csp = cspify.convert(model, torch.randn(1, 3, 224, 224), gamma=0.5)
    print(cspify.compare(model, csp, torch.randn(1, 3, 224, 224)))
"""

from cspify.api import compare, convert, find_stages
from cspify.bench import BenchResult, benchmark
from cspify.budget import Search
from cspify.calibrate import calibrate
from cspify.config import CSPConfig
from cspify.data import ImageData, open_data
from cspify.errors import CspifyError
from cspify.finetune import evaluate, finetune
from cspify.fuse import fuse_for_inference
from cspify.record import Conversion, conversion_of
from cspify.recovery import Recovery, recover
from cspify.report import Report
from cspify.stage import Stage
from cspify.sweep import Sweep, sweep

__all__ = ["convert", "find_stages", "compare", "benchmark", "sweep", "Report", "BenchResult", "Sweep", "CSPConfig",
           "CspifyError", "Stage", "Conversion", "conversion_of"]
__all__ += ["calibrate", "finetune", "evaluate", "open_data", "ImageData"]
__all__ += ["fuse_for_inference", "Search"]
__all__ += ["recover", "Recovery"]
__version__ = "0.1.0"
