"""The model's parameter names and shapes, computed from the run config without torch (but for
a --model plug-in, whose network is built once to read them off).

The coordinator checks every upload against this schema, so it must mirror peer/model.py exactly;
tests/test_model_schema.py builds the torch model and compares, so the two cannot drift apart.
"""

from __future__ import annotations

from fedmoe.common.data import DATASET_SPECS, dataset_spec
from fedmoe.common.proto import pb

Shape = tuple[int, ...]


def embedding_schema(input_shape: Shape, d: int) -> dict[str, Shape]:
    if len(input_shape) == 3:  # small CNN: conv-relu-pool x3, flatten, linear, relu
        c, h, w = input_shape
        return {
            "embedding.0.weight": (32, c, 3, 3),
            "embedding.0.bias": (32,),
            "embedding.3.weight": (64, 32, 3, 3),
            "embedding.3.bias": (64,),
            "embedding.6.weight": (64, 64, 3, 3),
            "embedding.6.bias": (64,),
            "embedding.10.weight": (d, 64 * (h // 8) * (w // 8)),
            "embedding.10.bias": (d,),
        }
    (features,) = input_shape  # MLP: linear-relu-linear-relu
    return {
        "embedding.0.weight": (d, features),
        "embedding.0.bias": (d,),
        "embedding.2.weight": (d, d),
        "embedding.2.bias": (d,),
    }


def model_schema(cfg: pb.RunConfig) -> dict[str, Shape]:
    if cfg.dataset in DATASET_SPECS:
        input_shape, classes = DATASET_SPECS[cfg.dataset]
    else:  # a data set plug-in: its declared shapes, or a load of it
        input_shape, classes = dataset_spec(cfg.dataset, cfg.data_dir or None, cfg.seed)
    d, m, hidden = cfg.embed_dim, cfg.num_experts, cfg.expert_hidden
    if cfg.model:  # the user's network: built once here (torch) to learn its tensors
        from fedmoe.common.config import config_to_dict
        from fedmoe.common.model_plugin import plugin_embedding_schema

        # Without the weights file: shapes do not depend on it, and a coordinator on another
        # machine need not hold the peers' file.
        config = {**config_to_dict(cfg), "model_weights": ""}
        schema = plugin_embedding_schema(cfg.model, input_shape, d, config)
    else:
        schema = embedding_schema(input_shape, d)
    schema["gate.proxies"] = (d, m)
    for e in range(m):
        schema[f"experts.{e}.fc1.weight"] = (hidden, d)
        schema[f"experts.{e}.fc1.bias"] = (hidden,)
        schema[f"experts.{e}.fc2.weight"] = (classes, hidden)
        schema[f"experts.{e}.fc2.bias"] = (classes,)
    return schema
