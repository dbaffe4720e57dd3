"""Parameter, FLOP and memory accounting for any ds_jax model config (`ds-jax analyze`).

    from ds_jax.analysis import count_params, flops_per_token
    count_params(mc)["total"], flops_per_token(mc, seq_len)["train"]
"""

from ds_jax.analysis.cost import (activation_bytes_per_token, attention_flops, bits_per_weight,
                                  flops_per_token, kv_cache_per_token, summary, train_state_bytes,
                                  weight_bytes)
from ds_jax.analysis.params import Tensor, abstract_params, count_params, param_table, tree_size
from ds_jax.analysis.report import cli, format_summary

__all__ = [
    "Tensor", "abstract_params", "activation_bytes_per_token", "attention_flops",
    "bits_per_weight", "cli", "count_params", "flops_per_token", "format_summary",
    "kv_cache_per_token", "param_table", "summary", "train_state_bytes", "tree_size",
    "weight_bytes",
]
