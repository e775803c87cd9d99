"""The coordinator's torch-free schema must equal the real model's parameters, for every dataset."""

from __future__ import annotations

import pytest

from fedmoe.common.config import make_config
from fedmoe.common.data import DATASET_SPECS
from fedmoe.common.model_schema import model_schema
from fedmoe.peer.model import MoEModel


@pytest.mark.parametrize("dataset", sorted(DATASET_SPECS))
@pytest.mark.parametrize("dims", [(256, 8, 256), (16, 3, 5)])
def test_schema_matches_the_torch_model(dataset: str, dims: tuple[int, int, int]) -> None:
    d, m, hidden = dims
    cfg = make_config(dataset=dataset, embed_dim=d, num_experts=m, expert_hidden=hidden, top_k=1)
    input_shape, classes = DATASET_SPECS[dataset]
    model = MoEModel(input_shape, classes, d, m, 1, hidden)
    real = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert model_schema(cfg) == real
