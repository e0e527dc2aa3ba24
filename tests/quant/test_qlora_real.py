"""QLoRA on the real model: LoRA on the NF4-quantized MiniLM learns SST-2."""
import deltatune as dt
from realrun import finetune


def quantized_wrap(model, config):
    dt.quantize(model, "nf4")
    return dt.wrap(model, config)


def test_lora_on_nf4_base_learns_sst2():
    before, after, dm = finetune(dt.LoRAConfig(r=8, targets=["query", "value"]), steps=120, lr=2e-3,
                                 wrap=quantized_wrap)
    report = dt.memory_report(dm)
    print(f"QLoRA SST-2 dev accuracy: untrained {before:.3f} -> {after:.3f}; quantized weights "
          f"{report.quantized_ratio:.3f}x fp32, whole base {report.ratio:.3f}x")
    assert report.quantized_ratio <= 0.3
    assert before < 0.6
    assert after >= 0.72 and after - before >= 0.15
