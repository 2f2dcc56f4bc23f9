"""distill: train a small student model to imitate a large teacher, measure it, and serve it.

Public API (each stage also runs from the CLI as `distill STAGE CONFIG [key=value ...]`):
    load_config(path, overrides)     the typed config
    generate(config)                 teacher outputs into the resumable store (distill.store.read_store)
    generate(config)                 teacher outputs into the resumable store (distill.store.read_store)
    train(config)                    student training (online logits, offline top-k, or labels)
"""

from distill.config import Config, ConfigError, load_config, save_config
from distill.signals import SparseSignal
from distill.generate import generate  # eager (no torch import): binds the function over the submodule name
from distill.generate import generate  # eager (no torch import): binds the function over the submodule name

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "SparseSignal", "generate", "load_config", "save_config", "__version__"]
