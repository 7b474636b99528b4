"""dsparse: SLoPe double-pruned N:M sparse pretraining on DeepSpeed."""
from .config import AdapterConfig, SparsityConfig
from .nn import SparseLinear, sparse_modules, sparsify

__version__ = "0.1.0"

__all__ = ["SparseLinear", "SparsityConfig", "AdapterConfig", "sparsify", "sparse_modules", "__version__"]
