"""What is particular to the CUDA backend: when it is available and why not, its just-in-time
build, its whole-plane, strided and tiled paths, big and degenerate planes, pixel weights, CUDA
graph capture, host synchronisation and memory.

The shared matrices (test_fused_vs_reference.py, test_fused_ops.py) run the CUDA backend like
every fused backend, where a GPU is present: accuracy per dtype, every shape, stencil,
reduction, teacher and weight form, determinism, opcheck, gradcheck and torch.compile."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import hgloss
from hgloss import functional, targets
from hgloss.backends import _build

from conftest import ROOT, grad_error, heatmaps, loss_error
from test_fused_pixel_weight import pixel_weight_of
from test_fused_vs_reference import STENCILS, assert_matches_reference, make_case

needs_cuda = pytest.mark.skipif(
    "cuda" not in hgloss.available_backends(),
    reason=f"backend 'cuda' unavailable: {functional.why_unavailable('cuda').strip(' ()')}",
)
needs_extension = pytest.mark.skipif(not _build.load_extension(), reason="the C++ extension did not load")


# ------------------------------------------------------------------------------------------------
# Availability and the just-in-time build: host-side, run everywhere


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch is a CUDA build")
def test_cpu_only_torch_says_why_cuda_is_unavailable():
    assert "cuda" not in hgloss.available_backends()
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available .* CPU-only build"):
        hgloss.heatmap_gradient_loss(torch.rand(2, 3, 8, 6), torch.rand(2, 3, 8, 6), backend="cuda")


@pytest.fixture
def gpu_without_cuda_kernels(monkeypatch):
    """A process that sees a GPU and a CUDA build of torch, but whose hgloss._C lacks the CUDA
    kernels; nothing is compiled for real."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_build, "cuda_kernels_registered", lambda: False)
    monkeypatch.setattr(_build, "_cuda_failure", None)
    monkeypatch.setattr(_build, "_cuda_ready", False)
    monkeypatch.setattr(functional, "_auto_choices", {})  # "auto" decides afresh for this process


@needs_extension
def test_missing_compiler_is_a_clear_error(gpu_without_cuda_kernels, monkeypatch):
    monkeypatch.setattr(_build, "cuda_compiler_home", lambda: None)
    assert "cuda" not in hgloss.available_backends()
    with pytest.raises(RuntimeError, match="no CUDA compiler was found.*CUDA_HOME"):
        _build.load_cuda_kernels()


@needs_extension
def test_first_cuda_call_compiles_with_a_message(gpu_without_cuda_kernels, monkeypatch, capsys, tmp_path):
    # An empty extension cache: a finished build of the same sources would be loaded, not compiled.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    compiled = []
    monkeypatch.setattr(_build, "cuda_compiler_home", lambda: "/opt/cuda")
    monkeypatch.setattr(_build, "cuda_kernels_registered", lambda: bool(compiled))  # once built
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kwargs: compiled.append(kwargs))
    assert "cuda" in hgloss.available_backends()
    assert _build.load_cuda_kernels() is True
    assert "hgloss: compiling the CUDA kernels" in capsys.readouterr().err
    (build,) = compiled
    assert build["name"] == "hgloss_cuda" and not build["is_python_module"]
    assert sorted(os.path.basename(path) for path in build["sources"]) == sorted(
        os.path.basename(name) for name in _build.CUDA_SOURCES
    )
    assert all(os.path.exists(path) for path in build["sources"])


@needs_extension
def test_failed_build_falls_back_under_auto_and_raises_when_named(gpu_without_cuda_kernels, monkeypatch):
    def broken_compiler(**kwargs):
        raise OSError("nvcc: exit status 1")

    monkeypatch.setattr(_build, "cuda_compiler_home", lambda: "/opt/cuda")
    monkeypatch.setattr("torch.utils.cpp_extension.load", broken_compiler)
    with pytest.warns(RuntimeWarning, match="compiling the CUDA kernels failed: nvcc: exit status 1"):
        fallback = functional.resolve_backend("auto", torch.device("cuda"))
    assert fallback != "cuda"
    assert "cuda" not in hgloss.available_backends()  # tried once, not on every call
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available .*nvcc: exit status 1"):
        functional.resolve_backend("cuda", torch.device("cuda"))


# ------------------------------------------------------------------------------------------------
# On a GPU


@needs_cuda
@pytest.mark.parametrize("stencil", STENCILS)
@pytest.mark.parametrize(
    "shape",
    # tiled: 256x256, 1024x1024 and the one-pixel-wide planes; whole planes: 1x1 and 64x64
    [(2, 3, 256, 256), (1, 1, 1024, 1024), (2, 3, 1, 9000), (2, 3, 9000, 1), (3, 2, 1, 1), (2, 3, 64, 64)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_big_and_degenerate_planes_match_the_reference(stencil, shape, generator):
    inputs = make_case(shape, "per_sample", (1,), generator, device="cuda")
    assert_matches_reference("cuda", inputs, "mean", stencil, generator)


def float32_layouts(shape, generator):
    """The same float32 values as a contiguous tensor (the vectorised whole-plane path), a
    transposed one (strided loads), one whose planes start off a 16-byte boundary (scalar loads)
    and one in channels-last order."""
    values = heatmaps(shape, torch.float32, "cuda", generator)
    shifted = torch.empty(values.numel() + 1, device="cuda")[1:].view(shape)
    shifted.copy_(values)
    return {
        "contiguous": values,
        "transposed": values.transpose(2, 3).contiguous().transpose(2, 3),
        "misaligned": shifted,
        "channels-last": values.contiguous(memory_format=torch.channels_last),
    }


@needs_cuda
@pytest.mark.parametrize("stencil", STENCILS)
@pytest.mark.parametrize("shape", [(4, 17, 64, 48), (2, 5, 33, 17), (2, 3, 300, 200)], ids=lambda s: "x".join(map(str, s)))
def test_every_float32_layout_matches_the_float64_reference(stencil, shape, generator):
    preds = float32_layouts(shape, generator)
    targets = float32_layouts(shape, generator)
    teacher = heatmaps(shape, torch.float32, "cuda", generator)
    alpha = torch.rand(shape[0], generator=generator).cuda()
    weight = torch.rand(shape[:2], generator=generator).cuda()
    upstream = torch.randn(shape[:2], generator=generator).cuda()
    pred64 = preds["contiguous"].double().requires_grad_(True)
    ref = hgloss.heatmap_gradient_loss(
        pred64, targets["contiguous"].double(), weight.double(), teacher=teacher.double(), alpha=alpha.double(),
        stencil=stencil, reduction="none", backend="reference",
    )
    (ref_grad,) = torch.autograd.grad(ref, pred64, upstream.double())
    for layout in preds:
        pred = preds[layout].detach().requires_grad_(True)
        loss = hgloss.heatmap_gradient_loss(
            pred, targets[layout], weight, teacher=teacher, alpha=alpha, stencil=stencil, reduction="none", backend="cuda"
        )
        (grad,) = torch.autograd.grad(loss, pred, upstream)
        assert loss_error(loss, ref) <= 1e-5, layout
        assert grad_error(grad, ref_grad) <= 1e-5, layout


def assert_pixel_weighted_matches_reference(shape, dtype, pixel_weight, stencil, generator, tolerance):
    """Loss per plane and pred.grad, with a teacher and target weights, against the reference in
    float64 on the same (upcast) inputs."""
    pred = heatmaps(shape, dtype, "cuda", generator).requires_grad_(True)
    target = heatmaps(shape, dtype, "cuda", generator)
    teacher = heatmaps(shape, dtype, "cuda", generator)
    alpha = torch.rand(shape[0], generator=generator).cuda()
    weight = torch.rand(shape[:2], generator=generator).cuda()
    upstream = torch.randn(shape[:2], generator=generator, dtype=torch.float64).cuda()
    pred64 = pred.detach().double().requires_grad_(True)
    ref = hgloss.heatmap_gradient_loss(
        pred64, target.double(), weight.double(), teacher=teacher.double(), alpha=alpha.double(), stencil=stencil,
        reduction="none", backend="reference", pixel_weight=pixel_weight.double(),
    )
    ref.backward(upstream)
    loss = hgloss.heatmap_gradient_loss(
        pred, target, weight, teacher=teacher, alpha=alpha, stencil=stencil, reduction="none", backend="cuda",
        pixel_weight=pixel_weight,
    )
    loss.backward(upstream.to(loss.dtype))
    assert loss_error(loss, ref) <= tolerance
    assert grad_error(pred.grad, pred64.grad) <= tolerance


@needs_cuda
@pytest.mark.parametrize("stencil", STENCILS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "shape, form",
    [
        ((2, 3, 300, 300), "full"),  # tiled: M at the tiles' rings
        ((2, 3, 300, 300), "per_joint_column"),
        ((2, 3, 1, 9000), "per_sample"),  # tiled, one pixel high
        ((2, 3, 9000, 1), "plane"),  # tiled, one pixel wide
        ((4, 17, 64, 48), "full"),  # whole planes
        ((4, 17, 64, 48), "per_sample"),
        ((4, 17, 64, 48), "per_joint_column"),
        ((4, 17, 64, 48), "plane"),
        ((2, 5, 33, 17), "transposed"),
    ],
    ids=lambda case: "x".join(map(str, case)) if isinstance(case, tuple) else case,
)
def test_pixel_weight_matches_the_reference(stencil, dtype, shape, form, generator):
    pixel_weight = pixel_weight_of(form, shape, generator, "cuda", dtype)
    assert_pixel_weighted_matches_reference(shape, dtype, pixel_weight, stencil, generator, 1e-5)


@needs_cuda
@pytest.mark.parametrize("stencil", STENCILS)
@pytest.mark.parametrize(
    "pred_dtype, weight_dtype, tolerance",
    [
        (torch.float32, torch.float16, 1e-5),
        (torch.float32, torch.bfloat16, 1e-5),
        (torch.bfloat16, torch.float16, 1e-2),  # docs/spec.md section 1: bfloat16 inputs
    ],
    ids=str,
)
@pytest.mark.parametrize("shape", [(4, 17, 64, 48), (2, 3, 300, 200)], ids=lambda s: "x".join(map(str, s)))
def test_half_precision_pixel_weight_matches_the_reference(stencil, pred_dtype, weight_dtype, tolerance, shape,
                                                          generator):
    """M in a dtype of its own, read as it is stored: the reference upcasts the same values."""
    pixel_weight = pixel_weight_of("per_sample", shape, generator, "cuda", weight_dtype)
    assert_pixel_weighted_matches_reference(shape, pred_dtype, pixel_weight, stencil, generator, tolerance)


@needs_cuda
@pytest.mark.parametrize("stencil", STENCILS)
@pytest.mark.parametrize("shape", [(4, 17, 64, 48), (2, 3, 300, 200)], ids=lambda s: "x".join(map(str, s)))
def test_pixel_weight_with_a_separable_target_matches_the_reference(stencil, shape, generator):
    """A target from keypoints reaches the kernels as separable factors; the operator takes a pixel
    weight with them too (the public keypoint loss does not pass one)."""
    batch, joints, height, width = shape
    functional.resolve_backend("cuda", torch.device("cuda"))  # loads the kernels the operator runs
    keypoints = torch.rand(batch, joints, 2, generator=generator, dtype=torch.float64) * torch.tensor([width, height])
    rows, cols, _ = targets.gaussian_factors(keypoints.cuda(), None, height, width, 2.0, "msra")
    pred = heatmaps(shape, torch.float32, "cuda", generator)
    pixel_weight = pixel_weight_of("per_joint_column", shape, generator, "cuda")
    loss, _, grad = torch.ops.hgloss.heatmap_loss(
        pred, None, None, None, None, 1.0, 1.0, stencil, "mean", True, rows, cols, pixel_weight
    )
    pred64 = pred.double().requires_grad_(True)
    ref = hgloss.heatmap_gradient_loss(
        pred64, targets.materialise(rows, cols).double(), stencil=stencil, backend="reference",
        pixel_weight=pixel_weight,
    )
    (ref_grad,) = torch.autograd.grad(ref, pred64)
    assert loss_error(loss, ref) <= 1e-5
    assert grad_error(grad, ref_grad) <= 1e-5


@needs_cuda
def test_tiled_planes_are_bit_identical_run_to_run(generator):
    pred = heatmaps((2, 3, 1024, 768), torch.float32, "cuda", generator).requires_grad_(True)
    target = heatmaps((2, 3, 1024, 768), torch.float32, "cuda", generator)
    results = []
    for _ in range(3):
        loss = hgloss.heatmap_gradient_loss(pred, target, stencil="sobel", backend="cuda")
        (grad,) = torch.autograd.grad(loss, pred)
        results.append((loss, grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def graph_inputs(generator, dtype):
    shape = (8, 17, 64, 48)
    return {
        "pred": heatmaps(shape, dtype, "cuda", generator),
        "target": heatmaps(shape, dtype, "cuda", generator),
        "teacher": heatmaps(shape, dtype, "cuda", generator),
        "alpha": torch.rand(8, generator=generator).cuda(),
        "weight": torch.rand(8, 17, 1, generator=generator).cuda(),
    }


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_and_backward_replay_from_a_cuda_graph(dtype, generator):
    static = graph_inputs(generator, dtype)
    pred = static["pred"].requires_grad_(True)

    def step():
        loss = hgloss.heatmap_gradient_loss(
            pred, static["target"], static["weight"], teacher=static["teacher"], alpha=static["alpha"],
            stencil="central", backend="cuda",
        )
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture, as torch.cuda.graphs asks
            pred.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    pred.grad = None
    with torch.cuda.graph(graph):
        static_loss = step()

    for _ in range(2):
        fresh = graph_inputs(generator, dtype)
        with torch.no_grad():
            for name in static:
                static[name].copy_(fresh[name])
        graph.replay()
        expected_pred = fresh["pred"].requires_grad_(True)
        expected = hgloss.heatmap_gradient_loss(
            expected_pred, fresh["target"], fresh["weight"], teacher=fresh["teacher"], alpha=fresh["alpha"],
            stencil="central", backend="cuda",
        )
        expected.backward()
        torch.cuda.synchronize()
        assert torch.equal(static_loss, expected)
        assert torch.equal(pred.grad, expected_pred.grad)


@needs_cuda
def test_forward_and_backward_never_synchronise_with_the_host(generator):
    inputs = graph_inputs(generator, torch.float32)
    pred = inputs["pred"].requires_grad_(True)
    for reduction in ("mean", "none"):
        hgloss.heatmap_gradient_loss(pred, inputs["target"], backend="cuda")  # build and load outside the check
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = hgloss.heatmap_gradient_loss(
                pred, inputs["target"], inputs["weight"], teacher=inputs["teacher"], alpha=inputs["alpha"],
                reduction=reduction, backend="cuda",
            )
            loss.backward(torch.ones_like(loss))
        finally:
            torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("shape", [(64, 17, 64, 48), (2, 3, 512, 512)], ids=lambda s: "x".join(map(str, s)))
def test_peak_memory_is_the_gradient_plus_per_plane_values(shape, generator):
    """The issue's bound: one forward+backward allocates dL/dpred plus O(B*K) values; the tiled
    path's per-tile partial sums count as per-plane values times the tiles per plane."""
    pred = heatmaps(shape, torch.float32, "cuda", generator).requires_grad_(True)
    target = heatmaps(shape, torch.float32, "cuda", generator)
    teacher = heatmaps(shape, torch.float32, "cuda", generator)
    weight = torch.rand(shape[:2], generator=generator).cuda()

    def step():
        hgloss.heatmap_gradient_loss(pred, target, weight, teacher=teacher, alpha=0.4, backend="cuda").backward()

    step()
    pred.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    gradient_bytes = pred.numel() * pred.element_size()
    planes = shape[0] * shape[1]
    tiles = -(-shape[2] * shape[3] // 1024)  # tiles hold at least 1024 pixels
    assert extra <= gradient_bytes + 16 * 4 * planes * tiles + 64 * 1024, (extra, gradient_bytes)


# ------------------------------------------------------------------------------------------------
# The just-in-time build, for real: needs a GPU and nvcc, and takes a few minutes


@needs_cuda
@pytest.mark.skipif(_build.cuda_compiler_home() is None, reason="no CUDA compiler (CUDA_HOME) to build with")
def test_a_cpu_only_build_compiles_the_cuda_kernels_on_first_use(tmp_path, generator):
    """Builds hgloss._C without the CUDA kernels in a copy of the project, then calls the loss on
    CUDA tensors in a fresh process: it must say it compiles, register the kernels and match the
    reference."""
    for name in ("hgloss", "csrc"):
        shutil.copytree(os.path.join(ROOT, name), tmp_path / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    env = {**os.environ, "HGLOSS_DISABLE_CUDA": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    code = textwrap.dedent(
        """
        import torch, hgloss
        from hgloss.backends import _build
        assert hgloss.__file__.startswith(%r), hgloss.__file__
        assert not _build.cuda_kernels_registered()
        pred = torch.rand(4, 17, 64, 48, device="cuda", requires_grad=True)
        target = torch.rand(4, 17, 64, 48, device="cuda")
        loss = hgloss.heatmap_gradient_loss(pred, target, stencil="sobel")
        assert _build.cuda_kernels_registered()
        reference = hgloss.heatmap_gradient_loss(pred.double(), target.double(), stencil="sobel", backend="reference")
        print("relative error", abs(loss.item() - reference.item()) / reference.item())
        """
        % str(tmp_path)
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "hgloss: compiling the CUDA kernels" in run.stderr
    assert float(run.stdout.split("relative error")[1]) <= 1e-5
