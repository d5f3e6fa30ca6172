"""How many perplexity windows each of the eight sets has at a window length (what a full run scores).

    python bench/count_windows.py [--seqlen 2048] [--json FILE]

Tokenizes each set's text once with SmolLM2's tokenizer (``nsvd_lm.experiments.evaldata``, the
same text the ``nsvd_*`` tasks score) and counts its windows as ``nsvd_lm.experiments.ppl`` does
(``count_windows``, with the protocol cap: C4's 256). No model runs; a few seconds.
"""

from __future__ import annotations

import argparse
import json

from nsvd_lm.experiments.evaldata import DATASET_NAMES, load_eval_text
from nsvd_lm.experiments.ppl import count_windows, encode_text
from nsvd_lm.files import write_json_atomic
from nsvd_lm.smollm2 import smollm2_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    sets = {}
    for name in DATASET_NAMES:
        text = load_eval_text(name)
        n_tokens = len(encode_text(tokenizer, text.text))
        scored, available = count_windows(n_tokens, args.seqlen, text.max_windows)
        sets[name] = {"tokens": n_tokens, "windows": scored, "windows_uncapped": available}
    report = {
        "command": f"python bench/count_windows.py --seqlen {args.seqlen}",
        "tokenizer": "SmolLM2-135M-Instruct",
        "seqlen": args.seqlen,
        "sets": sets,
        "total_windows": sum(s["windows"] for s in sets.values()),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        write_json_atomic(args.json, report)


if __name__ == "__main__":
    main()
