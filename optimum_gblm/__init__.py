"""optimum-gblm: gradient-based pruning (GBLM-Pruner) of Hugging Face causal language models."""

__version__ = "0.1.0"

# Imported for their registrations: the mask file and the model card written by a pruned model's save_pretrained,
# its push_to_hub, and quant_method "gblm" in transformers' from_pretrained.
from . import (  # noqa: E402,F401
    checkpoint,
    compressed,  # compressed storage: what save_pretrained writes for GBLMConfig(storage="compressed")
    hub,
    methods,  # noqa: E402,F401  (registers every pruning method and sparsity profile)
    quantizer,
)
from .config import GBLMConfig  # noqa: E402
from .data import get_calibration_data, get_evaluation_tokens  # noqa: E402
from .evaluation import PerplexityResult, perplexity, record_evaluation  # noqa: E402
from .modeling import load_model  # noqa: E402
from .pruner import GBLMPruner, prune  # noqa: E402
from .semi_structured import to_semi_structured  # noqa: E402
from .sparse_state import GBLMHfQuantizer, apply_masks, sparsity_report  # noqa: E402
from .training import SparsityCallback  # noqa: E402

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
    "to_semi_structured",
    "GBLMHfQuantizer",
    "__version__",
]
