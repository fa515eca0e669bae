"""Peak memory of the gradient stage and of the layer-wise stage, over model sizes from tiny to the default model.

Each (model, stage) runs in a fresh subprocess so that peaks do not carry over. Reported per stage:
- peak RSS of the process, and its growth over the process with torch imported but no model loaded
  (so the model's own weights are part of the growth);
- peak CUDA memory (torch.cuda.max_memory_allocated) when the stage runs on a GPU;
- the foundation issue's target for the gradient stage: 1.5 x fp32 weights + one sequence's activations, where
  "activations" is measured as the RSS growth of one plain forward + backward with parameters frozen.

    python benchmarks/memory.py --output benchmarks/results/memory_smollm2.md
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import common
import psutil
from common import PeakRSS, gib

# name -> (hidden, layers, intermediate, heads, kv heads, vocab); None = the real default model
SIZES = {
    "tiny (llama, 2 x 64)": (64, 2, 172, 4, 2, 1024),
    "SmolLM2 width, 4 blocks": (576, 4, 1536, 9, 3, 49152),
    "SmolLM2 width, 15 blocks": (576, 15, 1536, 9, 3, 49152),
    "SmolLM2-135M (real, 30 blocks)": None,
}


def worker(size: str, stage: str, num_samples: int, seqlen: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401  (common.random_llama's): loaded before the baseline too

    from optimum_gblm import GBLMConfig, GBLMPruner, load_model
    from optimum_gblm.gradients import compute_gradient_norms
    from optimum_gblm.structure import prunable_modules

    try:
        import gguf  # noqa: F401  (the default model's loader): imported before the baseline, like everything else
    except ImportError:
        pass
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base_rss = psutil.Process().memory_info().rss
    shape = SIZES[size]
    if shape is None:
        model, _ = load_model(None)
    else:
        hidden, layers, intermediate, heads, kv, vocab = shape
        model = common.random_llama(0, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                                    num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab)
    model = model.to(device).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (num_samples, seqlen), generator=torch.Generator().manual_seed(0))
    modules = prunable_modules(model)
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    loaded_rss = psutil.Process().memory_info().rss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tick = time.perf_counter()
    with PeakRSS() as rss:
        if stage == "activations":  # one plain forward + backward, parameters frozen: the activations alone
            for p in model.parameters():
                p.requires_grad_(False)
            embeds = model.get_input_embeddings()(ids[:1].to(device)).detach().requires_grad_(True)
            model(inputs_embeds=embeds, labels=ids[:1].to(device)).loss.backward()
        elif stage == "gradients":
            compute_gradient_norms(model, ids.to(device), modules, show_progress=False)
        else:
            GBLMPruner(GBLMConfig(method="wanda", num_samples=num_samples, seqlen=seqlen), show_progress=False).prune(model, ids)
    return {
        "size": size,
        "stage": stage,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": weight_bytes,
        "base_rss": base_rss,
        "loaded_rss": loaded_rss,
        "peak_rss": rss.peak,
        "cuda_peak": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "seconds": round(time.perf_counter() - tick, 1),
        "device": device,
    }


def main() -> None:
    args = common.argument_parser(
        __doc__,
        sizes=dict(default=",".join(str(i) for i in range(len(SIZES))), help="indices into SIZES"),
        gradient_samples=dict(type=int, default=4, help="peaks do not grow with N: a few suffice"),
        layerwise_samples=dict(type=int, default=32, help="the layer-wise stage holds N x T activations"),
        seqlen={}, output=dict(default="benchmarks/results/memory_smollm2.md"),
        worker=dict(nargs=2, metavar=("SIZE_INDEX", "STAGE"), help=argparse.SUPPRESS),
    ).parse_args()
    names = list(SIZES)
    if args.worker:
        size, stage = names[int(args.worker[0])], args.worker[1]
        n = args.layerwise_samples if stage == "layerwise" else (1 if stage == "activations" else args.gradient_samples)
        print(json.dumps(worker(size, stage, n, args.seqlen)))
        return

    rows = []
    for index in common.comma_list(args.sizes, int):
        result = {}
        for stage in ("activations", "gradients", "layerwise"):
            result[stage] = common.run_worker(
                __file__, "--worker", index, stage, "--seqlen", args.seqlen, "--gradient-samples",
                args.gradient_samples, "--layerwise-samples", args.layerwise_samples, what=(names[index], stage),
            )
            print(names[index], stage, result[stage], flush=True)
        rows.append(result)

    lines = [
        "# Peak memory of the two stages",
        "",
        f"- machine: {psutil.cpu_count()} CPU cores, {gib(psutil.virtual_memory().total)} GiB RAM, {platform.machine()}; "
        f"device {rows[0]['gradients']['device'] if rows else '-'}",
        f"- gradient stage: {args.gradient_samples} x {args.seqlen} tokens (its peak does not grow with N); layer-wise "
        f"stage (Wanda, 50%): {args.layerwise_samples} x {args.seqlen} tokens; random token ids; fp32",
        "- growth = peak RSS minus the RSS before the model was created (torch and transformers imported), so it "
        "includes the fp32 weights",
        "- target (foundation issue): gradient-stage growth <= 1.5 x fp32 weights + activations of one sequence "
        "(activations = growth of one forward + backward with frozen parameters, minus the weights)",
        "",
        "| model | params | fp32 weights GiB | one-sequence activations GiB | gradient stage growth GiB | target GiB | "
        "ratio to target | layer-wise growth GiB | layer-wise growth - weights GiB | CUDA peak grad / layer-wise GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        act, grad, layer = r["activations"], r["gradients"], r["layerwise"]
        weights = grad["weight_bytes"]
        activations = max(act["peak_rss"] - act["base_rss"] - weights, 0)
        growth = grad["peak_rss"] - grad["base_rss"]
        target = 1.5 * weights + activations
        layer_growth = layer["peak_rss"] - layer["base_rss"]
        lines.append(
            f"| {grad['size']} | {grad['parameters'] / 1e6:.1f}M | {gib(weights)} | {gib(activations)} | {gib(growth)} | "
            f"{gib(target)} | {growth / target:.2f} | {gib(layer_growth)} | {gib(layer_growth - weights)} | "
            f"{gib(grad['cuda_peak'])} / {gib(layer['cuda_peak'])} |"
        )
    common.atomic_write_text(args.output, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
