"""optimum-gblm: gradient-based pruning (GBLM-Pruner) of Hugging Face causal language models."""

__version__ = "0.1.0"

# `methods` registers every pruning method and sparsity profile; `config` and `pruner` register quant_method "gblm"
# with transformers (its config and its quantizer), so `from_pretrained` reads a pruned checkpoint once this is imported.
from . import methods  # noqa: E402,F401
from .config import GBLMConfig, PruningRuntime  # noqa: E402
from .data import get_calibration_data, get_evaluation_tokens  # noqa: E402
from .evaluation import PerplexityResult, perplexity, record_evaluation  # noqa: E402
from .hub import push_folder_to_hub  # noqa: E402
from .modeling import load_model  # noqa: E402
from .pruner import GBLMPruner, prune  # noqa: E402
from .quantizer import GBLMHfQuantizer  # noqa: E402
from .record import PruningRecord  # noqa: E402
from .semi_structured import to_semi_structured  # noqa: E402
from .sparse_state import apply_masks, sparsity_report  # noqa: E402
from .training import SparsityCallback  # noqa: E402

# The public API: what the README and the docs use from `optimum_gblm` itself. Everything else is reached through
# its module (`optimum_gblm.checkpoint`, ...) and may change between versions.
__all__ = [
    "GBLMConfig",
    "PruningRuntime",
    "PruningRecord",
    "GBLMPruner",
    "prune",
    "GBLMHfQuantizer",
    "load_model",
    "get_calibration_data",
    "get_evaluation_tokens",
    "perplexity",
    "PerplexityResult",
    "record_evaluation",
    "sparsity_report",
    "apply_masks",
    "SparsityCallback",
    "to_semi_structured",
    "push_folder_to_hub",
    "__version__",
]
