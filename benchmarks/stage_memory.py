"""Peak RSS of each stage of one prune, beyond the loaded weights, on the first few blocks of a large model: where a
method's memory goes (the gradient norms by block, the OBS sweep, the rest of a layer's turn).

    python benchmarks/stage_memory.py --model /path/to/Qwen2.5-Coder-1.5B --method sparsegpt --blocks 2
    python benchmarks/stage_memory.py --model /path/to/Qwen2.5-Coder-1.5B --method gblm-obs-by-block-g4 --blocks 2

The model (Llama/Qwen layout: `model.model.layers`) keeps only its first `--blocks` blocks (embedding and head whole) and every weight is read first, so each
number is what the prune adds to a resident model. Calibration: random token ids (memory does not depend on the
text), 2:4. One process per method, on an otherwise idle machine. Prints one line of GiB per stage.
"""

from __future__ import annotations

import argparse
import functools
import json
import threading
import time

import common
import psutil
import reconstruction
import torch

import optimum_gblm.methods.gblm_obs as gblm_obs
import optimum_gblm.methods.sparsegpt as sparsegpt
import optimum_gblm.pruner as pruner
from optimum_gblm import GBLMConfig, GBLMPruner, load_model

# (module, function, stage): the innermost stage running is the one a sample is charged to
STAGES = [
    (pruner, "loss_gradient_norms_by_block", "gradient norms by block"),
    (gblm_obs, "obs_prune", "OBS sweep and refit"),
    (sparsegpt, "sparsegpt_prune", "OBS sweep and refit"),
    (gblm_obs.GBLMOBS, "prune_layer", "rest of prune_layer"),
    (sparsegpt.SparseGPT, "prune_layer", "rest of prune_layer"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", default="sparsegpt", help="a label of reconstruction.py's METHODS")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()

    process, stage, peaks = psutil.Process(), ["loading"], {}

    def sample() -> None:
        while True:
            peaks[stage[0]] = max(peaks.get(stage[0], 0), process.memory_info().rss)
            time.sleep(0.003)

    def charged(function, name):
        @functools.wraps(function)
        def wrapper(*a, **k):
            outer, stage[0] = stage[0], name
            try:
                return function(*a, **k)
            finally:
                stage[0] = outer

        return wrapper

    for owner, attribute, name in STAGES:
        setattr(owner, attribute, charged(getattr(owner, attribute), name))
    threading.Thread(target=sample, daemon=True).start()
    model, _ = load_model(args.model, dtype="float32")
    model.model.layers = model.model.layers[: args.blocks]
    model.config.num_hidden_layers = args.blocks
    common.read_every_weight(model)
    loaded = process.memory_info().rss
    stage[0] = "rest of the prune"
    ids = torch.randint(0, model.config.vocab_size, (args.num_samples, args.seqlen), generator=torch.Generator().manual_seed(0))
    config = GBLMConfig.from_dict(
        dict(reconstruction.METHODS[args.method]), pattern="2:4", sparsity=0.5, num_samples=args.num_samples,
        seqlen=args.seqlen, seed=0,
    )
    tick = time.perf_counter()
    GBLMPruner(config, use_cache=False, show_progress=False).prune(model, ids)
    seconds = time.perf_counter() - tick
    beyond = {name: round((rss - loaded) / 2**30, 2) for name, rss in peaks.items() if name != "loading"}
    print(json.dumps({"method": args.method, "blocks": args.blocks, "loaded_GiB": round(loaded / 2**30, 2),
                      "prune_s": round(seconds), "peak_beyond_loaded_GiB": beyond}))


if __name__ == "__main__":
    main()
