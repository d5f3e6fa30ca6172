"""One real-model check: SmolLM2-135M on a short WikiText-2 excerpt (a couple of minutes on CPU)."""

import copy
import math
import os
from pathlib import Path

import pytest
import torch

from nsvd_lm.compress import compress_model, get_statistics
from nsvd_lm.config import CalibrationConfig

DATA = Path(os.environ.get("NSVD_LM_DATA_DIR", "")) / "wikitext2"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "wiki.test.raw").exists(), reason="shared WikiText-2 data not beside the repo"),
]
SEQLEN, WINDOWS = 256, 8


def _perplexity(model, ids: torch.Tensor) -> float:
    """Disjoint windows, each predicting its last SEQLEN-1 tokens (SVD-LLM protocol), few lines on purpose."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(WINDOWS):
            window = ids[w * SEQLEN : (w + 1) * SEQLEN][None]
            logits = model(window).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
            count += SEQLEN - 1
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nsvd_lm.smollm2 import smollm2_path

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    raw = (DATA / "wiki.test.raw").read_text(encoding="utf-8")
    text = "\n\n".join(line if line.strip() else "" for line in raw.splitlines(keepends=True))
    ids = torch.tensor(tokenizer(text[:200_000], add_special_tokens=False)["input_ids"])
    assert ids.numel() >= SEQLEN * WINDOWS
    return model, tokenizer, ids, tmp_path_factory.mktemp("stats")


def test_method_ordering_at_ratio_0_3(smollm2):
    model, tokenizer, ids, cache = smollm2
    # Calibration: 16 x 256 tokens of the offline WikiText-2 calibration text (wiki.valid.raw).
    config = dict(ratio=0.3, calib_dataset="wikitext2", calib_nsamples=16, calib_seqlen=256, cache_dir=str(cache))
    calibration = {k: v for k, v in config.items() if k != "ratio"}
    get_statistics(model, tokenizer, CalibrationConfig(**calibration), progress=False)
    ppl = {"original": _perplexity(model, ids)}
    for method in ("svd", "asvd-0", "asvd-i", "asvd-ii"):
        compressed = copy.deepcopy(model)
        report = compress_model(compressed, tokenizer, method=method, progress=False, **config)
        assert report.stats_cache_hit in (None, True)
        ppl[method] = _perplexity(compressed, ids)
        del compressed
    print("SmolLM2-135M wikitext2 excerpt ppl at ratio 0.3:", {k: round(v, 2) for k, v in ppl.items()})
    assert ppl["original"] < ppl["asvd-i"]
    assert ppl["svd"] > 5 * ppl["asvd-0"]  # plain SVD collapses
    assert ppl["asvd-0"] > ppl["asvd-i"]
    assert abs(ppl["asvd-i"] - ppl["asvd-ii"]) / ppl["asvd-i"] < 0.05
