"""Dense against 2:4 semi-structured sparse forward latency on an NVIDIA GPU (compute capability >= 8.0).

A Llama-shaped model (random weights by default: latency does not depend on their values, and the GPU machine needs
no download) is pruned 2:4 with magnitude, then timed twice, before and after `optimum_gblm.to_semi_structured`:

1. each distinct shape of pruned linear alone (q/k/v/o, gate/up, down), at several token counts (rows of the
   input: 1 to 16 is decoding, hundreds and more is prefill);
2. the whole model's forward (no KV cache) at several batch x sequence-length sizes.

Times are medians of CUDA-event timings after warm-up. The report states the GPU, torch, the backend (cuSPARSELt or
CUTLASS) and the largest logit difference between the dense and the sparse model. On a machine without such a GPU
the script refuses with one line and exit status 2.

    python benchmarks/semi_structured_speed.py --preset llama-3.1-8b --output benchmarks/results/semi_structured_speed.md
    python benchmarks/semi_structured_speed.py --preset smollm2-135m --layers 4 --tokens 1,128,2048   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from optimum_gblm import GBLMConfig, GBLMPruner, to_semi_structured  # noqa: E402
from optimum_gblm.files import write_atomically  # noqa: E402
from optimum_gblm.semi_structured import check_semi_structured, default_backend, require_sparse_gpu  # noqa: E402

# name -> LlamaConfig keywords (the published models' shapes)
PRESETS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE = "cuda"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS), help="model shape (random weights)")
    parser.add_argument("--model", default=None, help="a local checkpoint folder instead of a preset (its weights are pruned 2:4)")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder blocks (default: all)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--backend", default=None, choices=["cusparselt", "cutlass"], help="default: cuSPARSELt when available")
    parser.add_argument("--tokens", default="1,16,128,512,2048,8192", help="rows of the input to each linear, comma-separated")
    parser.add_argument("--sizes", default="1x1,1x128,1x2048,4x2048", help="whole-model batch x seqlen, comma-separated")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", default=None, help="write the table here (.md) and the numbers beside it (.json)")
    return parser.parse_args(argv)


def median_ms(run: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def build_model(args: argparse.Namespace, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=DEVICE)
    else:
        config = transformers.LlamaConfig(**PRESETS[args.preset])
        if args.layers:
            config.num_hidden_layers = min(args.layers, config.num_hidden_layers)
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype)
    if args.layers and args.model:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = len(model.model.layers)
    return model.eval()


def time_linears(
    model: torch.nn.Module, convertible: list[str], tokens: list[int], dtype: torch.dtype, args: argparse.Namespace
) -> dict[str, dict]:
    """One convertible pruned linear per distinct (out, in) shape, dense then sparse, at each token count."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name in convertible:
        shape = tuple(model.get_submodule(name).weight.shape)
        by_shape.setdefault(shape, []).append(name)
    results = {}
    tensor_class = (
        torch.sparse.SparseSemiStructuredTensorCUSPARSELT if args.backend == "cusparselt" else torch.sparse.SparseSemiStructuredTensorCUTLASS
    )
    for (rows, cols), names in sorted(by_shape.items()):
        dense = model.get_submodule(names[0]).weight.detach().contiguous()
        sparse = tensor_class.from_dense(dense)
        kind = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in names}))
        for count in tokens:
            x = torch.randn(count, cols, device=DEVICE, dtype=dtype)
            with torch.no_grad():
                dense_ms = median_ms(lambda x=x, w=dense: F.linear(x, w), args.warmup, args.repeats)
                sparse_ms = median_ms(lambda x=x, w=sparse: F.linear(x, w), args.warmup, args.repeats)
            results[f"{kind} {rows}x{cols} @ {count}"] = dict(layer=kind, out=rows, inp=cols, tokens=count,
                                                              dense_ms=dense_ms, sparse_ms=sparse_ms)
    return results


def time_model(model: torch.nn.Module, sizes: list[tuple[int, int]], args: argparse.Namespace) -> dict[str, float]:
    vocab = model.config.vocab_size
    results = {}
    for batch, seqlen in sizes:
        ids = torch.randint(0, vocab, (batch, seqlen), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
        with torch.no_grad():
            results[f"{batch}x{seqlen}"] = median_ms(lambda ids=ids: model(ids, use_cache=False), args.warmup, args.repeats)
    return results


def report(settings: dict, linears: dict, dense_model: dict, sparse_model: dict) -> str:
    lines = [
        "# 2:4 semi-structured sparse kernels: forward latency, dense vs sparse",
        "",
        f"GPU: {settings['gpu']}; torch {settings['torch']}; backend {settings['backend']}; {settings['dtype']}; "
        f"model {settings['model']} ({settings['layers']} blocks, random weights unless a checkpoint is named), "
        f"magnitude 2:4; {settings['converted']} of {settings['pruned']} pruned linears converted. Median of "
        f"{settings['repeats']} CUDA-event timings after {settings['warmup']} warm-up runs. Largest |logit| "
        f"difference, dense vs sparse model: {settings['max_logit_diff']:.3g}.",
        "",
        "## Each pruned linear alone",
        "",
        "| layer | out x in | tokens | dense ms | 2:4 ms | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for row in linears.values():
        lines.append(
            f"| {row['layer']} | {row['out']} x {row['inp']} | {row['tokens']} | {row['dense_ms']:.4f} | "
            f"{row['sparse_ms']:.4f} | {row['dense_ms'] / row['sparse_ms']:.2f}x |"
        )
    lines += ["", "## Whole model forward (no KV cache)", "", "| batch x seqlen | dense ms | 2:4 ms | speed-up |",
              "|---|---|---|---|"]
    for size, dense_ms in dense_model.items():
        lines.append(f"| {size} | {dense_ms:.3f} | {sparse_model[size]:.3f} | {dense_ms / sparse_model[size]:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        require_sparse_gpu()
    except ValueError as error:
        print(f"semi_structured_speed: {error}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    args.backend = args.backend or default_backend()
    tokens = [int(t) for t in args.tokens.split(",")]
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",")]

    start = time.perf_counter()
    model = build_model(args, dtype)
    GBLMPruner(GBLMConfig(method="magnitude", pattern="2:4", sparsity=0.5), show_progress=False).prune(model)
    problems = check_semi_structured(model, args.backend)
    print(f"built and pruned in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    convertible = [name for name, problem in problems.items() if problem is None]
    for name, problem in problems.items():
        if problem is not None:
            print(f"{name} stays dense: {problem}", file=sys.stderr)
    linears = time_linears(model, convertible, tokens, dtype, args)
    dense_model = time_model(model, sizes, args)
    probe = torch.randint(0, model.config.vocab_size, (1, 128), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    with torch.no_grad():
        dense_logits = model(probe, use_cache=False).logits.float()
        to_semi_structured(model, backend=args.backend, skip_incompatible=True)
        max_diff = float((model(probe, use_cache=False).logits.float() - dense_logits).abs().max())
    del dense_logits
    sparse_model = time_model(model, sizes, args)

    settings = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, backend=args.backend, dtype=args.dtype,
        model=args.model or args.preset, layers=model.config.num_hidden_layers,
        converted=len(convertible), pruned=len(problems),
        warmup=args.warmup, repeats=args.repeats, max_logit_diff=max_diff,
    )
    text = report(settings, linears, dense_model, sparse_model)
    print(text)
    if args.output:
        output = Path(args.output)
        write_atomically(output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), suffix=".md")
        data = dict(settings=settings, linears=linears, dense_model_ms=dense_model, sparse_model_ms=sparse_model)
        write_atomically(output.with_suffix(".json"),
                         lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
