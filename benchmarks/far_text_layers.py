"""Which layers' updates lose the far text: the output error of each pruned layer of a real model on in-domain and
far validation text, for a mask alone and for the OBS updates, relative to the mask alone.

    python benchmarks/far_text_layers.py --data-dir ../shared/data --model /path/to/Qwen2.5-Coder-1.5B \
        --output benchmarks/results/far_text_layers_qwen2.5_1.5b.md

At 1.5B every recipe that updates weights (SparseGPT, gblm_obs at any mu) loses the Debian handbook against the
masks alone (Wanda, GBLM), while it wins on Austen (docs/scaling.md). This asks where: each listed layer is pruned
alone from the dense model's inputs, with the Hessian of `--num-samples` x 512 calibration tokens (the three
Austen calibration novels, seed 0), and its error trace((W - W_pruned) H (W - W_pruned)^T) is measured with the
Hessians of the calibration sequences (in sample), of Northanger Abbey and of the Debian handbook (the validation
texts' first `--eval-tokens` tokens, windows of 512 opened as perplexity opens them). Errors are relative to Wanda's
mask alone on the same layer. No gradient term (that needs the gradient stage); the recipes are SparseGPT's
(mu 0, no refit), gblm_obs's update (mu 0.5 and 2, 5 refit steps) with joint selection, and gblm_obs's update on
Wanda's mask (selection=score), which separates what the mask and the update each do.
"""

from __future__ import annotations

import time

import common
import torch

from optimum_gblm import get_calibration_data, load_model
from optimum_gblm.data import strip_start_token, window_at, window_start_token
from optimum_gblm.masks import UNSTRUCTURED, select_mask
from optimum_gblm.obs import obs_prune

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# label -> (mu, refit steps, joint selection)
RECIPES = {
    "SparseGPT": (0.0, 0, True),
    "obs mu0.5 refit5": (0.5, 5, True),
    "obs mu2 refit5": (2.0, 5, True),
    "Wanda mask, obs mu0.5 refit5": (0.5, 5, False),
}
SETS = ("calibration", "Northanger Abbey", "Debian handbook")


def main() -> None:
    parser = common.argument_parser(
        __doc__, "data_dir", "num_samples", "output",
        model=dict(required=True, help="a local folder with a Llama/Qwen layout (model.model.layers)"),
        num_samples=dict(type=int, default=16),
        eval_tokens=dict(type=int, default=4096, help="tokens of each validation text"),
        blocks=dict(default="3,14,25", help="block indices whose linears are pruned"),
        sparsity=dict(type=float, default=0.5),
        output=dict(default="benchmarks/results/far_text_layers_qwen2.5_1.5b.md"),
    )
    args = parser.parse_args()
    blocks = common.comma_list(args.blocks, int)
    model, tokenizer = load_model(args.model, dtype="float32")
    model.model.layers = model.model.layers[: max(blocks) + 1]
    texts = common.read_texts(args.data_dir, common.SWEEP_CALIBRATION_FILES)
    sequences = {"calibration": get_calibration_data(texts, tokenizer, args.num_samples, 512, 0)}
    start_token = window_start_token(tokenizer)
    validation = common.evaluation_tokens(args.data_dir, tokenizer, args.eval_tokens, common.VALIDATION_FILES)
    for label, ids in validation.items():
        ids = strip_start_token(ids, start_token)
        width = 512 - (start_token is not None)  # windows opened as `evaluation.perplexity` opens them
        sequences[label] = torch.stack([window_at(ids, w * width, 512, start_token) for w in range(ids.numel() // width)])
    layers = [(block, linear) for block in blocks for linear in LINEARS]
    sums = {layer: {s: 0 for s in SETS} for layer in layers}
    current = {"set": None}

    def accumulate(layer):
        def hook(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[layer][current["set"]] += x.T @ x
        return hook

    for block, linear in layers:
        model.model.layers[block].get_submodule(linear).register_forward_pre_hook(accumulate((block, linear)))
    with torch.no_grad():
        for name, ids in sequences.items():
            current["set"] = name
            for row in ids:
                model.model(row.unsqueeze(0))
    counts = {name: ids.numel() for name, ids in sequences.items()}
    lines = [
        f"# Which layers' updates lose the far text: {args.model}", "",
        f"- calibration {args.num_samples} x 512 tokens (seed 0); validation texts {args.eval_tokens} tokens each; "
        f"{args.sparsity:.0%} unstructured; each layer pruned alone from dense inputs; no gradient term; "
        f"error relative to Wanda's mask alone (below 1: the recipe's output is closer to the dense layer's); "
        f"machine: {common.machine()}", "",
        "| block | linear | d_out x d_in | recipe | " + " | ".join(SETS) + " | s |", "|" + "---|" * (5 + len(SETS)),
    ]
    for block, linear in layers:
        hessians = {s: 2 * sums[(block, linear)][s] / counts[s] for s in SETS}
        dense = model.model.layers[block].get_submodule(linear).weight.detach().float()
        wanda = select_mask(dense.abs() * torch.diagonal(hessians["calibration"]).sqrt().unsqueeze(0), args.sparsity, UNSTRUCTURED)

        def errors(pruned, dense=dense, hessians=hessians):
            difference = dense - pruned
            return {s: ((difference @ h) * difference).sum().item() for s, h in hessians.items()}

        reference = errors(dense * wanda)
        for recipe, (mu, refit, joint) in RECIPES.items():
            start = time.perf_counter()
            pruned, _ = obs_prune(dense, hessians["calibration"], args.sparsity, None, mu=mu, refit_steps=refit,
                                  keep_mask=None if joint else wanda)
            seconds = time.perf_counter() - start
            relative = errors(pruned)
            lines.append(
                f"| {block} | {linear} | {dense.shape[0]} x {dense.shape[1]} | {recipe} | "
                + " | ".join(f"{relative[s] / reference[s]:.3f}" for s in SETS) + f" | {seconds:.1f} |"
            )
            print(lines[-1], flush=True)
    common.atomic_write_text(args.output, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
