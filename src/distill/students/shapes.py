"""Student shapes a config accepts: the checks every chosen or given shape passes before anything trains.

Its own module (build and minitron both import it) so the import graph stays one-way.
"""

from __future__ import annotations


def check_shape(model_cfg, where: str = "student.config") -> None:
    """Shapes a forward pass or save_pretrained would only reject mid-training (the first checkpoint), refused
    now in one line naming the `where` fields: key/value groups, hidden size per head, an even rotary head
    dimension, and the config class's own validation (what save_pretrained runs)."""
    hidden, heads = getattr(model_cfg, "hidden_size", None), getattr(model_cfg, "num_attention_heads", None)
    kv = getattr(model_cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(model_cfg, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if heads and kv and heads % kv:
        raise ValueError(f"{where}: num_attention_heads={heads} must be a multiple of num_key_value_heads={kv}")
    if head_dim and hidden and heads and not getattr(model_cfg, "head_dim", None) and hidden % heads:
        raise ValueError(f"{where}: hidden_size={hidden} must be a multiple of num_attention_heads={heads}")
    rotary = any(getattr(model_cfg, k, None) for k in ("rope_parameters", "rope_theta", "rope_scaling"))
    if rotary and head_dim and head_dim % 2:
        raise ValueError(f"{where}: head dimension {head_dim} (hidden_size={hidden} / num_attention_heads="
                         f"{heads}) must be even for rotary position embeddings; e.g. hidden_size={hidden + heads}")
    validate = getattr(model_cfg, "validate", None)  # transformers' strict configs: what save_pretrained runs
    if callable(validate):
        from huggingface_hub.errors import StrictDataclassError

        try:
            validate()
        except (StrictDataclassError, ValueError, TypeError) as exc:
            cause = exc.__cause__ or exc
            raise ValueError(f"{where}: hidden_size={hidden}, num_attention_heads={heads}, num_key_value_heads={kv}: "
                             f"{type(model_cfg).__name__} refuses it ({str(cause).splitlines()[0]}); saving the "
                             "first checkpoint would fail") from None
