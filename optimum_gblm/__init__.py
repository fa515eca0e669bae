"""optimum-gblm: gradient-based pruning (GBLM-Pruner) of Hugging Face causal language models."""

__version__ = "0.1.0"

from .config import GBLMConfig  # noqa: E402
from .data import get_calibration_data, get_evaluation_tokens  # noqa: E402
from .evaluation import PerplexityResult, perplexity, record_evaluation  # noqa: E402
from .modeling import load_model  # noqa: E402
from .integration import GBLMHfQuantizer, SparsityCallback, apply_masks  # noqa: E402
from .pruner import GBLMPruner, prune, sparsity_report  # noqa: E402

__all__ = [
    "GBLMConfig",
    "GBLMPruner",
    "prune",
    "load_model",
    "get_calibration_data",
    "get_evaluation_tokens",
    "perplexity",
    "PerplexityResult",
    "record_evaluation",
    "sparsity_report",
    "apply_masks",
    "SparsityCallback",
    "GBLMHfQuantizer",
    "__version__",
]
