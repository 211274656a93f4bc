"""The fused operators as PyTorch custom ops: accuracy per dtype, determinism, NaN/Inf,
opcheck, gradcheck, torch.compile, double backward and memory."""

import pytest
import torch

import hgloss

from conftest import FUSED_DEVICES, fused_backend_params, fused_op, grad_error, heatmaps, interpreted, loss_error

# docs/spec.md section 1: accuracy against a float64 evaluation of the formulas on the upcast inputs.
TOLERANCES = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def inputs_in(dtype, shape, generator, device="cpu"):
    pred = heatmaps(shape, generator=generator).to(device, dtype)
    target = heatmaps(shape, generator=generator).to(device, dtype)
    teacher = heatmaps(shape, generator=generator).to(device, dtype)
    alpha = torch.rand(shape[0], generator=generator, dtype=torch.float64).to(device)
    weight = torch.rand(shape[:2] + (1,), generator=generator).to(device, dtype)
    return pred, target, teacher, alpha, weight


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("stencil", ["forward", "central", "sobel"])
def test_accuracy_per_dtype(backend, dtype, stencil, generator):
    shape = (4, 17, 64, 48)
    pred, target, teacher, alpha, weight = inputs_in(dtype, shape, generator, FUSED_DEVICES[backend])
    pred.requires_grad_(True)
    # "sum" keeps the float16 gradient in its normal range; the mean's 1/(B*K*H*W) scale would
    # push it into float16's subnormals, where no implementation meets 2e-3.
    loss = hgloss.heatmap_gradient_loss(
        pred, target, weight, teacher=teacher, alpha=alpha, stencil=stencil, reduction="sum", backend=backend
    )
    (grad,) = torch.autograd.grad(loss, pred)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype

    upcast = [t.detach().double().requires_grad_(t is pred) for t in (pred, target, teacher, alpha, weight)]
    ref = hgloss.heatmap_gradient_loss(
        upcast[0], upcast[1], upcast[4], teacher=upcast[2], alpha=upcast[3], stencil=stencil,
        reduction="sum", backend="reference",
    )
    (ref_grad,) = torch.autograd.grad(ref, upcast[0])
    assert loss_error(loss, ref) <= TOLERANCES[dtype]
    assert grad_error(grad, ref_grad) <= TOLERANCES[dtype]


@pytest.mark.parametrize("backend", fused_backend_params())
def test_bfloat16_and_float16_inputs_are_not_rounded_before_the_sums(backend, generator):
    """A loss on half inputs equals the loss on the same values held in float32, exactly up to
    float32 rounding: the kernel upcasts on load and accumulates in float32."""
    for dtype in (torch.float16, torch.bfloat16):
        pred, target, teacher, alpha, weight = inputs_in(dtype, (2, 5, 32, 24), generator, FUSED_DEVICES[backend])
        half = hgloss.heatmap_gradient_loss(pred, target, weight, teacher=teacher, alpha=alpha, backend=backend)
        single = hgloss.heatmap_gradient_loss(
            pred.float(), target.float(), weight.float(), teacher=teacher.float(), alpha=alpha, backend=backend
        )
        assert loss_error(half, single) <= 1e-6


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_bit_identical(backend, dtype, generator):
    pred, target, teacher, alpha, weight = inputs_in(dtype, (16, 17, 64, 48), generator, FUSED_DEVICES[backend])
    results = []
    for threads in (1, torch.get_num_threads(), 1, torch.get_num_threads()):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            p = pred.detach().clone().requires_grad_(True)
            loss = hgloss.heatmap_gradient_loss(p, target, weight, teacher=teacher, alpha=alpha, backend=backend)
            loss.backward()
            results.append((loss.detach(), p.grad))
        finally:
            torch.set_num_threads(previous)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert torch.equal(grad, results[0][1])


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("stencil", ["forward", "central", "sobel"])
def test_loss_does_not_depend_on_whether_a_gradient_is_computed(backend, stencil, generator):
    pred, target, teacher, alpha, weight = inputs_in(torch.float32, (3, 17, 64, 48), generator, FUSED_DEVICES[backend])
    with torch.no_grad():
        without = hgloss.heatmap_gradient_loss(pred, target, weight, teacher=teacher, alpha=alpha, stencil=stencil, backend=backend)
    with_grad = hgloss.heatmap_gradient_loss(
        pred.requires_grad_(True), target, weight, teacher=teacher, alpha=alpha, stencil=stencil, backend=backend
    )
    assert torch.equal(without, with_grad.detach())


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["pred", "target", "teacher", "target-without-teacher"])
def test_non_finite_inputs_propagate(backend, bad_value, where, generator):
    pred, target, teacher, alpha, weight = inputs_in(torch.float32, (2, 3, 8, 6), generator, FUSED_DEVICES[backend])
    tensors = {"pred": pred, "target": target, "teacher": teacher, "target-without-teacher": target}
    tensors[where][1, 2, 0, 5] = bad_value
    if where == "target-without-teacher":
        teacher = None
    losses, ref = (
        hgloss.heatmap_gradient_loss(pred, target, weight, teacher=teacher, alpha=alpha, backend=name, reduction="none")
        for name in (backend, "reference")
    )
    assert not torch.isfinite(losses[1, 2])
    assert torch.isfinite(losses[0]).all() and torch.isfinite(losses[1, :2]).all()
    assert torch.equal(torch.isnan(losses), torch.isnan(ref))


def op_samples(device):
    """Argument tuples for a fused operator covering its optional inputs."""
    generator = torch.Generator().manual_seed(7)
    samples = []
    for teacher in (False, True):
        for weight in (False, True):
            for reduction, stencil in (("mean", "forward"), ("sum", "sobel"), ("none", "central")):
                shape = (2, 3, 6, 5)
                pred = heatmaps(shape, torch.float32, device, generator).requires_grad_(True)
                target = heatmaps(shape, torch.float32, device, generator).requires_grad_(True)
                teacher_t = heatmaps(shape, torch.float32, device, generator).requires_grad_(True) if teacher else None
                alpha = torch.rand(2, generator=generator).to(device) if teacher else None
                weight_t = torch.rand(2, 3, generator=generator).to(device).requires_grad_(True) if weight else None
                samples.append((pred, target, teacher_t, alpha, weight_t, 0.5, 2.0, stencil, reduction, True))
    return samples


@pytest.mark.parametrize("backend", fused_backend_params())
def test_opcheck(backend):
    for args in op_samples(FUSED_DEVICES[backend]):
        torch.library.opcheck(fused_op(backend).default, args)


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("stencil", ["forward", "central", "sobel"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(backend, stencil, reduction, generator):
    shape, device = (2, 3, 5, 4), FUSED_DEVICES[backend]
    pred = heatmaps(shape, device=device, generator=generator).requires_grad_(True)
    target = heatmaps(shape, device=device, generator=generator).requires_grad_(True)
    teacher = heatmaps(shape, device=device, generator=generator).requires_grad_(True)
    weight = torch.rand(2, 3, 1, dtype=torch.float64, generator=generator).to(device).requires_grad_(True)
    alpha = torch.rand(2, dtype=torch.float64, generator=generator).to(device)

    def loss(p, t, s, w):
        return hgloss.heatmap_gradient_loss(
            p, t, w, teacher=s, alpha=alpha, stencil=stencil, reduction=reduction, backend=backend, grad_weight=1.5
        )

    # The interpreter needs ~0.1 s a call, too slow for the ~700 calls of a full check; fast mode
    # checks random projections of the same Jacobians.
    assert torch.autograd.gradcheck(loss, (pred, target, teacher, weight), fast_mode=interpreted(backend))


@pytest.mark.parametrize("backend", fused_backend_params())
def test_double_backward_raises(backend, generator):
    pred = heatmaps((2, 3, 6, 5), device=FUSED_DEVICES[backend], generator=generator).requires_grad_(True)
    target = heatmaps((2, 3, 6, 5), device=FUSED_DEVICES[backend], generator=generator)
    loss = hgloss.heatmap_gradient_loss(pred, target, backend=backend)
    # The graph of the gradient would be wrong, so asking for one is refused at once.
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(loss, pred, create_graph=True)


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_repeated_backward_through_retained_graph(backend, reduction, generator):
    """The first backward consumes the saved gradient in place; later ones must still be right."""
    pred = heatmaps((2, 3, 6, 5), device=FUSED_DEVICES[backend], generator=generator).requires_grad_(True)
    target = heatmaps((2, 3, 6, 5), device=FUSED_DEVICES[backend], generator=generator)
    loss = hgloss.heatmap_gradient_loss(pred, target, backend=backend, reduction=reduction, stencil="sobel")
    ref = hgloss.heatmap_gradient_loss(pred, target, backend="reference", reduction=reduction, stencil="sobel")
    for factor in (1.0, -2.5, 0.25):
        upstream = torch.full_like(loss, factor)
        (grad,) = torch.autograd.grad(loss, pred, upstream, retain_graph=True)
        (ref_grad,) = torch.autograd.grad(ref, pred, upstream, retain_graph=True)
        assert grad_error(grad, ref_grad) <= 1e-12


@pytest.mark.parametrize("backend", fused_backend_params())
def test_backward_of_an_op_run_without_compute_grad(backend, generator):
    pred = heatmaps((2, 3, 6, 5), device=FUSED_DEVICES[backend], generator=generator).requires_grad_(True)
    target = heatmaps((2, 3, 6, 5), device=FUSED_DEVICES[backend], generator=generator)
    loss, _, saved = fused_op(backend)(pred, target, None, None, None, 1.0, 1.0, "sobel", "sum", False)
    assert saved.numel() == 0
    (grad,) = torch.autograd.grad(3 * loss, pred)
    ref = hgloss.heatmap_gradient_loss(pred, target, stencil="sobel", reduction="sum", backend="reference")
    (ref_grad,) = torch.autograd.grad(3 * ref, pred)
    assert grad_error(grad, ref_grad) <= 1e-12


@pytest.mark.parametrize("backend", fused_backend_params())
def test_torch_compile_fullgraph_matches_eager(backend, generator):
    torch._dynamo.reset()
    shape, device = (4, 17, 16, 12), FUSED_DEVICES[backend]
    pred = heatmaps(shape, torch.float32, device, generator)
    target = heatmaps(shape, torch.float32, device, generator)
    teacher = heatmaps(shape, torch.float32, device, generator)
    weight = torch.rand(4, 17, 1, generator=generator).to(device)

    def step(p):
        loss = hgloss.heatmap_gradient_loss(
            p, target, weight, teacher=teacher, alpha=0.3, stencil="sobel", backend=backend
        )
        return loss * 3.0

    compiled = torch.compile(step, fullgraph=True)
    eager_pred = pred.clone().requires_grad_(True)
    compiled_pred = pred.clone().requires_grad_(True)
    eager_loss = step(eager_pred)
    eager_loss.backward()
    compiled_loss = compiled(compiled_pred)
    compiled_loss.backward()
    assert loss_error(compiled_loss, eager_loss) <= 1e-6
    assert grad_error(compiled_pred.grad, eager_pred.grad) <= 1e-6


def peak_extra_bytes(fn, device) -> int:
    """The peak of allocator bytes live during fn(), above those live when it starts: CUDA's
    allocator statistics on a GPU; on CPU, the allocation and free events the torch profiler
    records."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize(
    "dtype,heatmaps_allowed",
    # float16 keeps its saved gradient in float32 (two float16 heatmaps) for loss scaling, then
    # returns a float16 copy.
    [(torch.float32, 1.1), (torch.float64, 1.1), (torch.bfloat16, 1.1), (torch.float16, 3.1)],
    ids=str,
)
def test_forward_backward_allocates_one_heatmap(backend, dtype, heatmaps_allowed, generator):
    """docs/spec.md section 4: beyond the gradient itself only O(B*K) memory."""
    shape, device = (16, 17, 64, 48), FUSED_DEVICES[backend]
    pred = heatmaps(shape, dtype, device, generator).requires_grad_(True)
    target = heatmaps(shape, dtype, device, generator)
    teacher = heatmaps(shape, dtype, device, generator)
    weight = torch.rand(16, 17, 1, generator=generator).to(device)

    def step():
        hgloss.heatmap_gradient_loss(pred, target, weight, teacher=teacher, backend=backend).backward()

    step()
    pred.grad = None
    heatmap_bytes = pred.numel() * pred.element_size()
    assert peak_extra_bytes(step, device) <= heatmaps_allowed * heatmap_bytes
    # The reference backend materialises T, D and both gradient maps; the measure sees that.
    pred.grad = None
    assert peak_extra_bytes(
        lambda: hgloss.heatmap_gradient_loss(pred, target, weight, teacher=teacher, backend="reference").backward(),
        device,
    ) > 3 * heatmap_bytes
