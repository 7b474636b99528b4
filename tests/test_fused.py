"""dsparse.fuse_model: HF LLaMA blocks with the fused RMSNorm / SwiGLU / RoPE kernels compute what HF computes.

The tiny test models have fewer rows than ``fusion.min_rows``' default, so the tests that need
the kernels to run pass ``min_rows=0``."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from dsparse import FusionConfig, SparsityConfig, fuse_model, fused_counts, sparse_modules, sparsify
from dsparse.config import AutogradConfig, StepConfig
from dsparse.nn import FusedGatedMLP, FusedRMSNorm, fused_from
from kernels._triton import capture_launches

DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


def _llama(act: str = "silu", seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, hidden_act=act)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_matches_hf(device, dtype):
    hf = LlamaRMSNorm(80, eps=1e-5).to(device, dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.linspace(0.5, 1.5, 80))
    fused = FusedRMSNorm(copy.deepcopy(hf.weight), hf.variance_epsilon, min_rows=0)
    x = (torch.randn(80, 15) * 2).to(device, dtype).t()  # rows not contiguous: the module copies them
    dy = torch.randn(15, 80).to(device, dtype)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [m(xi) for m, xi in zip((hf, fused), xs)]
    for out in outs:
        out.backward(dy)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(outs[1], outs[0], **tol)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, **tol)
    torch.testing.assert_close(fused.weight.grad, hf.weight.grad, rtol=tol["rtol"], atol=tol["atol"] * 15)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_llama_matches_hf_forward_and_backward(device):
    hf = _llama().to(device)
    fused = copy.deepcopy(hf)
    counts = fuse_model(fused, min_rows=0)
    assert counts == {"rms_norm": 5, "swiglu": 2, "rope": 2}  # 2 norms per block and the final one; per block
    # one MLP and one attention
    assert isinstance(fused.model.norm, FusedRMSNorm) and isinstance(fused.model.layers[0].mlp, FusedGatedMLP)
    assert fused_counts(fused) == {**counts, "projections": 0} and set(fused_counts(hf).values()) == {0}
    assert list(fused.state_dict()) == list(hf.state_dict())
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    losses = [m(input_ids=ids, labels=ids).loss for m in (hf, fused)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    grads = [dict((n, p.grad) for n, p in m.named_parameters()) for m in (hf, fused)]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_fusion_and_sparsity_compose_in_either_order():
    """The swap keeps the linear layers' names, so the same layers become sparse either way."""
    config = SparsityConfig(backend="reference")
    first = _llama()
    fuse_model(first, min_rows=0)
    sparsify(first, config)
    second = _llama()
    sparsify(second, config)
    fuse_model(second, min_rows=0)
    names_a, names_b = ([name for name, _ in sparse_modules(m)] for m in (first, second))
    assert names_a == names_b and len(names_a) == 14
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first(input_ids=ids).logits, second(input_ids=ids).logits)


def test_other_activations_are_left_alone():
    model = _llama(act="gelu")
    assert fuse_model(model) == {"rms_norm": 5, "swiglu": 0, "rope": 2}
    assert fuse_model(_llama(), rms_norm=False, rope=False) == {"rms_norm": 0, "swiglu": 2, "rope": 0}
    assert fuse_model(model) == {"rms_norm": 0, "swiglu": 0, "rope": 0}  # fusing twice changes nothing
    apart = _llama()
    fuse_model(apart, swiglu_mvue=False)  # gate/up's MVUE operand from a pass of its own
    assert [m.mvue for m in apart.modules() if type(m).__name__ == "FusedGatedMLP"] == [False, False]


def test_fusion_autograd_and_step_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="did you mean 'rms_norm'"):
        FusionConfig.from_dict({"rmsnorm": True})
    with pytest.raises(ValueError, match='true, false or "auto"'):
        FusionConfig.from_dict({"enabled": "yes"})
    with pytest.raises(ValueError, match="fusion.swiglu must be true or false"):
        FusionConfig.from_dict({"swiglu": "no"})
    with pytest.raises(ValueError, match="fusion.min_rows must be an integer >= 0"):
        FusionConfig.from_dict({"min_rows": -1})
    with pytest.raises(ValueError, match="fusion.swiglu_mvue must be true or false"):
        FusionConfig.from_dict({"swiglu_mvue": "off"})
    assert FusionConfig.from_dict(None).swiglu_mvue and not FusionConfig.from_dict({"swiglu_mvue": False}).swiglu_mvue
    auto = FusionConfig.from_dict(None)
    assert auto.active(on_cuda=True) and not auto.active(on_cuda=False)
    assert FusionConfig.from_dict({"enabled": True}).active(on_cuda=False)
    with pytest.raises(ValueError, match="did you mean 'multithreading'"):
        AutogradConfig.from_dict({"multithread": True})
    with pytest.raises(ValueError, match="true or false"):
        AutogradConfig.from_dict({"multithreading": "yes"})
    assert not AutogradConfig.from_dict(None).multithreading
    with pytest.raises(ValueError, match="did you mean 'sync_free'"):
        StepConfig.from_dict({"syncfree": True})
    with pytest.raises(ValueError, match="step.sync_free must be true or false"):
        StepConfig.from_dict({"sync_free": 1})
    assert StepConfig.from_dict(None).sync_free


def test_fused_model_under_activation_checkpointing_gives_the_same_gradients():
    """HF's gradient checkpointing recomputes the fused blocks in backward: same loss and gradients."""
    plain = _llama()
    fuse_model(plain, min_rows=0)
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    plain.train()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    losses = [m(input_ids=ids, labels=ids).loss for m in (plain, ckpt)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0])
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_rope_is_bit_identical_to_hf(device):
    """Rotary embedding alone fused: logits and gradients equal HF's exactly (bf16 on CUDA; fp32 on
    CPU, where the interpreter's bf16 casts truncate), and the other instances' forward is untouched."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf = _llama().to(device, dtype)
    fused = copy.deepcopy(hf)
    assert fuse_model(fused, rms_norm=False, swiglu=False, min_rows=0) == {"rms_norm": 0, "swiglu": 0, "rope": 2}
    assert "forward" not in vars(hf.model.layers[0].self_attn)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5)).to(device)
    outs = [m(input_ids=ids, labels=ids) for m in (hf, fused)]
    assert torch.equal(outs[1].logits, outs[0].logits)
    for out in outs:
        out.loss.backward()
    for (name, a), (_, b) in zip(hf.named_parameters(), fused.named_parameters()):
        assert torch.equal(b.grad, a.grad), name


def test_fewer_rows_than_min_rows_run_hf_code():
    """Below min_rows no kernel is launched (a decode step); from min_rows on, every fused block is."""
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(6))
    for min_rows, launched in ((25, set()), (24, {"_rms_norm_fwd_kernel", "_silu_mul_fwd_kernel", "_rope_kernel"})):
        model = _llama()
        fuse_model(model, min_rows=min_rows)
        with torch.no_grad(), capture_launches() as calls:  # launches are recorded, not run
            model(input_ids=ids)
        assert {kernel.fn.__name__ for kernel, *_ in calls} == launched


def test_fused_from_lowers_every_modules_threshold_within_the_block():
    """fused_from(rows) (GraphDecoder's captured steps) launches the kernels below min_rows, nested blocks
    restore the threshold they found, and a bad row count is refused with what it means."""
    ids = torch.randint(0, 96, (2, 1), generator=torch.Generator().manual_seed(8))  # a 2-row decode step
    model = _llama()
    fuse_model(model)  # the default threshold, 256 rows

    def launched() -> set[str]:
        with torch.no_grad(), capture_launches() as calls:
            model(input_ids=ids)
        return {kernel.fn.__name__ for kernel, *_ in calls}

    kernels = {"_rms_norm_fwd_kernel", "_silu_mul_fwd_kernel", "_rope_kernel"}
    assert launched() == set()
    with fused_from(1):
        assert launched() == kernels
        with fused_from(3):
            assert launched() == set()
        assert launched() == kernels
    assert launched() == set()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="integer >= 0"):
            fused_from(bad)


def test_fused_model_generates_what_hf_generates():
    """Greedy decoding with the KV cache: the prefill runs the kernels, each 2-row decode step HF's code."""
    hf = _llama()
    fused = copy.deepcopy(hf)
    fuse_model(fused, min_rows=8)
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(7))
    outs = [m.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0) for m in (hf, fused)]
    assert torch.equal(outs[1], outs[0])


def test_fused_rotary_keeps_hf_signature():
    """Positional or keyword unsqueeze_dim run the kernel; the (b, s, heads, d) layout falls back to HF's code."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from dsparse.nn.fused import _fused_rotary

    fused = _fused_rotary(apply_rotary_pos_emb, min_rows=0)
    gen = torch.Generator().manual_seed(8)
    q, k = torch.randn(2, 3, 5, 8, generator=gen), torch.randn(2, 1, 5, 8, generator=gen)
    angles = torch.randn(1, 5, 4, generator=gen)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    for args, kwargs, launches in (((), {}, 2), ((1,), {}, 2), ((), {"unsqueeze_dim": 1}, 2),
                                   ((), {"unsqueeze_dim": 2}, 0)):
        qq, kk = (q, k) if launches else (q.transpose(1, 2), k.transpose(1, 2))
        with capture_launches() as calls:
            fused(qq, kk, cos, sin, *args, **kwargs)
        assert len(calls) == launches
        want = apply_rotary_pos_emb(qq, kk, cos, sin, *args, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(fused(qq, kk, cos, sin, *args, **kwargs), want))


@pytest.mark.parametrize("falls_back", [False, True])
def test_swiglu_backward_writes_the_gate_up_groups_mvue_operand(monkeypatch, fresh_plans, falls_back):
    """Where the backend takes the MVUE ``S(dYᵀ)`` compressed (cuSPARSELt), SwiGLU's backward writes it for
    the gate/up group in its own pass (kernels.mvue_compress_swiglu): same operand, same draws, same gradients.
    Where gate/up's MVUE plan falls back to the exact gradient it writes none, and the draws still agree."""
    from dsparse import fuse_projections
    from dsparse.backends import BACKENDS, ReferenceBackend, plans
    from dsparse.backends.base import padded_tokens
    from dsparse.backends.plans import Plan
    from kernels import mvue_compress_reference

    if falls_back:  # gate/up: 48 tokens (padded to 64) x 256 stacked rows x 64 inputs
        plans.set_plan("dw_mvue", 64, 256, 64, torch.bfloat16, Plan(dense=True))

    class TakesCompressed(ReferenceBackend):
        """The reference, told it compresses S(dYᵀ) as cuSPARSELt does: it checks what it is handed."""

        def __init__(self) -> None:
            self.handed: list[tuple[int, int]] = []

        def compresses_mvue(self, dy2d):
            return dy2d.shape[1] % 64 == 0

        def grad_values(self, dy2d, x2d, idx, n, m, mvue_key=None, mvue_packed=None):
            if mvue_packed is not None:
                want = mvue_compress_reference(dy2d, mvue_key, padded_tokens(dy2d.shape[0]))
                assert torch.equal(mvue_packed.view(torch.uint8), want.view(torch.uint8))
                self.handed.append(tuple(dy2d.shape))
            return super().grad_values(dy2d, x2d, idx, n, m, mvue_key)

    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    grads, keys = [], []
    for backend in (BACKENDS["reference"], TakesCompressed()):
        monkeypatch.setitem(BACKENDS, "reference", backend)
        model = _llama().to(torch.bfloat16)
        sparsify(model, {"mvue_dw": True})
        fuse_model(model, min_rows=0)
        fuse_projections(model)
        for _ in range(2):  # two micro-batches: two draws per layer
            model(input_ids=ids, labels=ids).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
        keys.append([layer._mvue_calls for _, layer in sparse_modules(model)])
    assert backend.handed == ([] if falls_back else [(48, 256)] * 4)  # each block's gate/up, each micro-batch
    # one draw per product and micro-batch either way (a group draws with its first layer: q of q/k/v, gate of gate/up)
    assert keys[0] == keys[1] == [2, 0, 0, 2, 2, 0, 2] * 2
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0])
