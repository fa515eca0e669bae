"""How fast gblm_obs's refit converges on real layers: the output error of a pruned layer after 0, 1, 2, ... refit
steps, on the calibration sequences it was fitted on and on held-out ones, relative to the sweep's (0 steps).

    python benchmarks/refit_convergence.py --data-dir ../shared/data --model /path/to/Qwen2.5-Coder-1.5B \
        --output benchmarks/results/refit_convergence_qwen2.5_1.5b.md

Each refit step costs one (d_out, d_in) x (d_in, d_in) product per layer, so on a model with wide MLPs (down_proj's
d_in is 8,960 at 1.5B) the refit is most of what gblm_obs's layer pass costs beyond SparseGPT's. This asks how many
steps are worth it. Calibration: `--num-samples` x 512 tokens from the three Austen calibration novels (seed 0).
The last `--held-out` sequences are kept out of the fit; error = trace((W - W_pruned) H (W - W_pruned)^T)
with the fitted (train) or held-out sequences' Hessian. The model keeps its first blocks only (up to the last one in
`--blocks`), and each listed layer is pruned alone from dense inputs, at mu 0.5 with joint selection and no gradient
term (the refit's convergence does not depend on how the mask was chosen). Times are of one obs_prune call each.
"""

from __future__ import annotations

import time

import common
import torch

from optimum_gblm import get_calibration_data, load_model
from optimum_gblm.obs import obs_prune

LINEARS = ("mlp.down_proj", "mlp.gate_proj", "self_attn.o_proj")


def main() -> None:
    parser = common.argument_parser(
        __doc__, "data_dir", "num_samples", "output",
        model=dict(required=True, help="a local folder with a Llama/Qwen layout (model.model.layers)"),
        num_samples=dict(type=int, default=16),
        held_out=dict(type=int, default=4, help="calibration sequences kept out of the fit"),
        blocks=dict(default="3,20", help="block indices whose linears are pruned"),
        steps=dict(default="0,1,2,3,5,10,20", help="refit steps (0 first: the reference)"),
        output=dict(default="benchmarks/results/refit_convergence_qwen2.5_1.5b.md"),
    )
    args = parser.parse_args()
    blocks, steps = common.comma_list(args.blocks, int), common.comma_list(args.steps, int)
    model, tokenizer = load_model(args.model, dtype="float32")
    texts = common.read_texts(args.data_dir, common.SWEEP_CALIBRATION_FILES)
    input_ids = get_calibration_data(texts, tokenizer, args.num_samples, 512, 0)
    model.model.layers = model.model.layers[: max(blocks) + 1]
    layers = [(block, linear) for block in blocks for linear in LINEARS]
    sums: dict[tuple[int, str], list[torch.Tensor]] = {layer: [0, 0] for layer in layers}  # [held-out, train]
    sequence = 0

    def accumulate(layer):
        def hook(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[layer][int(sequence < args.num_samples - args.held_out)] += x.T @ x
        return hook

    for block, linear in layers:
        model.model.layers[block].get_submodule(linear).register_forward_pre_hook(accumulate((block, linear)))
    with torch.no_grad():
        for sequence in range(args.num_samples):
            model.model(input_ids[sequence : sequence + 1])
    tokens = input_ids.shape[1]
    lines = [
        f"# Refit convergence on {args.model}", "",
        f"- calibration {args.num_samples} x {tokens} tokens (seed 0), {args.held_out} sequences held out; mu 0.5, "
        f"joint selection, no gradient term; error relative to 0 steps; machine: {common.machine()}", "",
        "| block | linear | d_out x d_in | pattern | steps | train error | held-out error | s |", "|---|---|---|---|---|---|---|---|",
    ]
    for block, linear in layers:
        held_out_sum, train_sum = sums[(block, linear)]
        train = 2 * train_sum / ((args.num_samples - args.held_out) * tokens)
        held_out = 2 * held_out_sum / (args.held_out * tokens)
        dense = model.model.layers[block].get_submodule(linear).weight.detach().float()

        def error(pruned, hessian, dense=dense):
            difference = dense - pruned
            return ((difference @ hessian) * difference).sum().item()

        for pattern, nm in (("2:4", (2, 4)), ("50%", None)):
            reference = None
            for count in steps:
                start = time.perf_counter()
                pruned, _ = obs_prune(dense, train, 0.5, nm, mu=0.5, refit_steps=count)
                seconds = time.perf_counter() - start
                errors = (error(pruned, train), error(pruned, held_out))
                reference = reference or errors
                lines.append(
                    f"| {block} | {linear} | {dense.shape[0]} x {dense.shape[1]} | {pattern} | {count} | "
                    f"{errors[0] / reference[0]:.4f} | {errors[1] / reference[1]:.4f} | {seconds:.1f} |"
                )
                print(lines[-1], flush=True)
    common.atomic_write_text(args.output, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
