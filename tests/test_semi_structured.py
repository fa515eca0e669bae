"""2:4 semi-structured sparse kernels: the layout check is a pure function tested here on the CPU; without a CUDA GPU
of compute capability >= 8.0 `to_semi_structured` refuses in one sentence; the conversion itself runs only where
such a GPU is present (and `benchmarks/semi_structured_speed.py` measures it there)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

from optimum_gblm import GBLMConfig, GBLMPruner, to_semi_structured
from optimum_gblm.masks import nm_mask
from optimum_gblm.semi_structured import (
    BACKENDS,
    check_semi_structured,
    kernel_constraints,
    semi_structured_problem,
)

HAS_SPARSE_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def pruned(family="llama", pattern="2:4", dtype=torch.bfloat16, model=None):
    model = (model if model is not None else tiny_model(family)).to(dtype)
    GBLMPruner(GBLMConfig(method="magnitude", pattern=pattern, sparsity=0.5), show_progress=False).prune(model)
    return model


def two_four(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    return nm_mask(scores, 2, 4)


# -- the constraints come from this torch version's tables ------------------------------------------------------------
def test_constraints_are_torch_s_own_for_the_dtypes_a_linear_can_use():
    for backend in BACKENDS:
        table = kernel_constraints(backend)
        assert torch.float16 in table and torch.bfloat16 in table and torch.int8 in table
        assert getattr(torch, "float8_e4m3fn", None) not in table  # float8 has no plain-matmul kernel
    assert kernel_constraints("cusparselt")[torch.bfloat16] == (16, 16)
    assert kernel_constraints("cutlass")[torch.bfloat16] == (32, 64)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernel_constraints("triton")


# -- the pure layout check ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_two_four_mask_along_the_inputs_fits(backend, dtype):
    assert semi_structured_problem((64, 128), dtype, two_four(64, 128), backend) is None


def test_groups_must_run_along_the_input_dimension():
    along_outputs = two_four(128, 64).t()  # 2:4 down each column: groups of 4 consecutive inputs keep 0 to 4
    problem = semi_structured_problem((64, 128), torch.bfloat16, along_outputs, "cusparselt")
    assert problem is not None and "not 2:4 along the input dimension" in problem


def test_four_eight_and_unstructured_masks_do_not_fit():
    generator = torch.Generator().manual_seed(0)
    four_eight = nm_mask(torch.rand(64, 128, generator=generator), 4, 8)
    assert (four_eight.reshape(64, 32, 4).sum(-1) > 2).any()  # some half-group keeps 3 or 4
    assert "not 2:4" in semi_structured_problem((64, 128), torch.float16, four_eight, "cusparselt")
    unstructured = torch.rand(64, 128, generator=generator) > 0.5
    assert "not 2:4" in semi_structured_problem((64, 128), torch.float16, unstructured, "cusparselt")


def test_dtypes_the_kernels_lack_are_named_with_the_fix():
    problem = semi_structured_problem((64, 128), torch.float32, two_four(64, 128), "cusparselt")
    assert "float32" in problem and "model.to(torch.bfloat16)" in problem
    cutlass = semi_structured_problem((64, 128), torch.float32, two_four(64, 128), "cutlass")
    assert (cutlass is None) == (torch.float32 in kernel_constraints("cutlass"))  # CUTLASS has float32 kernels in torch 2.13


@pytest.mark.parametrize(
    "shape, backend, fits",
    [
        ((48, 64), "cusparselt", True),  # 16 x 16 tiles
        ((48, 64), "cutlass", False),  # 48 rows: not a multiple of 32
        ((64, 32), "cutlass", False),  # 32 inputs: CUTLASS needs multiples of 64
        ((64, 40), "cusparselt", False),  # 40 inputs: not a multiple of 16
        ((8, 64), "cusparselt", False),  # fewer rows than one tile
    ],
)
def test_shapes_must_be_multiples_of_the_kernel_tiles(shape, backend, fits):
    problem = semi_structured_problem(shape, torch.bfloat16, two_four(*shape), backend)
    assert (problem is None) == fits, problem
    if not fits:
        assert "multiple of" in problem


def test_a_weight_that_is_not_a_matrix_or_a_mask_of_another_shape_is_refused():
    assert "2-D" in semi_structured_problem((64,), torch.bfloat16, None, "cusparselt")
    assert "shape" in semi_structured_problem((64, 128), torch.bfloat16, two_four(32, 128), "cusparselt")


# -- on whole models (CPU) ----------------------------------------------------------------------------------------
def test_a_two_four_bf16_llama_fits_cusparselt_but_its_narrow_layers_not_cutlass():
    model = pruned()
    assert all(problem is None for problem in check_semi_structured(model, "cusparselt").values())
    cutlass = check_semi_structured(model, "cutlass")
    assert cutlass["model.layers.0.self_attn.q_proj"] is not None  # 32 inputs < 64
    assert cutlass["model.layers.0.mlp.down_proj"] is None  # 32 x 64


def test_float32_four_eight_and_conv1d_models_are_refused_layer_by_layer():
    assert all("float32" in p for p in check_semi_structured(pruned(dtype=torch.float32), "cusparselt").values())
    assert any("not 2:4" in (p or "") for p in check_semi_structured(pruned(pattern="4:8"), "cusparselt").values())
    assert all("Conv1D" in p for p in check_semi_structured(pruned("gpt2"), "cusparselt").values())


def test_a_model_that_was_not_pruned_is_refused():
    with pytest.raises(ValueError, match="not pruned"):
        check_semi_structured(tiny_model("llama"), "cusparselt")


# -- the GPU requirement ------------------------------------------------------------------------------------------
def test_without_a_cuda_gpu_conversion_is_refused_in_one_sentence(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = pruned()
    with pytest.raises(ValueError, match=r"need a CUDA GPU with compute capability >= 8\.0") as error:
        to_semi_structured(model)
    assert str(error.value).count(". ") == 0  # one sentence
    assert all(type(m.weight) is torch.nn.Parameter for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_an_older_gpu_is_refused_naming_its_compute_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match=r"Tesla T4 has 7\.5"):
        to_semi_structured(pruned())


# -- on a GPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_SPARSE_GPU, reason="needs a CUDA GPU with compute capability >= 8.0")
def test_on_a_gpu_the_converted_model_gives_the_dense_outputs_and_refuses_to_be_saved(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = pruned(model=transformers.LlamaForCausalLM(config).eval(), dtype=torch.float16).to("cuda")
    ids = torch.randint(0, VOCAB, (2, 64), device="cuda")
    with torch.no_grad():
        dense = model(ids).logits
        to_semi_structured(model)
        sparse = model(ids).logits
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, torch.sparse.SparseSemiStructuredTensor)
    assert torch.allclose(dense, sparse, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="save the pruned model before converting"):
        model.save_pretrained(tmp_path)
