import pytest
import torch

import deltatune as dt
from deltatune.models import tiny_inputs, tiny_model


@pytest.mark.parametrize("cfg", [dt.LoRAConfig(r=4, dora=True), dt.BitFitConfig()], ids=["dora", "bitfit"])
def test_delta_layers_compile_without_graph_breaks(cfg):
    import torch._dynamo as dynamo

    dynamo.reset()
    model = tiny_model("bert")
    dm = dt.wrap(model, cfg)
    x = tiny_inputs(model)
    explained = dynamo.explain(dm)(**x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(dm, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(**x).logits, dm(**x).logits, atol=1e-6)
