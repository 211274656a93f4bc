"""hgloss.heatmap_gradient_loss: the public function. It checks the arguments (the rules of
hgloss.contract, docs/spec.md section 2) before any kernel runs, chooses the backend, and calls
it; nothing else.
"""

import importlib.util
import os
import warnings

import torch

from . import contract, ops, targets
from .backends import _build, reference
from .stencils import STENCILS

BACKENDS = ("cuda", "triton", "cpu", "reference")


def _runs_on(name: str, device_type: str | None) -> bool:
    """Whether backend `name` is available here for tensors of `device_type` (None: any device)."""
    if name == "reference":
        return True
    if name == "cpu":
        return device_type in (None, "cpu") and ops.load_cpp_operators()
    if name == "cuda":
        on_cuda = device_type in (None, "cuda") and torch.version.cuda is not None
        return on_cuda and _build.cuda_failure_reason() is None
    if name == "triton" and ops.load_triton_operator():
        on_cuda = torch.cuda.is_available() and device_type in (None, "cuda")
        return on_cuda or (ops.triton_interpreting() and device_type in (None, "cpu"))
    return False


def why_unavailable(backend: str) -> str:
    """Why a backend is not available here, as a parenthesised remark ("" when nothing to say)."""
    if backend == "cpu" and not ops.load_cpp_operators():
        return f" (the C++ extension did not load: {_build.failure_reason()})"
    if backend == "cuda":
        return f" ({_build.cuda_failure_reason() or 'the CUDA kernels run on CUDA tensors only'})"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return " (triton is not installed)"
        return " (Triton runs on CUDA tensors, and on CPU tensors only under the interpreter, TRITON_INTERPRET=1)"
    return ""


def available_backends() -> list[str]:
    """The backends usable in this process, fastest first, e.g. ["cpu", "reference"]. Loads
    (and, the first time, may build) the C++ extension."""
    return [name for name in BACKENDS if _runs_on(name, None)]


def check_backend_name(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {list(BACKENDS)}")


def check_settings(
    *, mse_weight: float = 1.0, grad_weight: float = 1.0, stencil: str = "forward", reduction: str = "mean",
    backend: str = "auto", gradient_form: str = "components",
) -> tuple[float, float]:
    """The checks of the loss's non-tensor arguments, for the modules that take them at
    construction; returns mse_weight and grad_weight as floats. Whether a backend is available
    depends on the tensors' device, so that is checked at the call."""
    mse_weight = contract.check_term_weight("mse_weight", mse_weight)
    grad_weight = contract.check_term_weight("grad_weight", grad_weight)
    contract.check_choice("stencil", stencil, STENCILS)
    contract.check_choice("reduction", reduction, contract.REDUCTIONS)
    check_backend_name(backend)
    check_gradient_form(gradient_form, backend)
    return mse_weight, grad_weight


def check_gradient_form(gradient_form: str, backend: str) -> None:
    """The magnitude form is computed by the reference backend alone."""
    contract.check_choice("gradient_form", gradient_form, contract.GRADIENT_FORMS)
    if gradient_form == "magnitude":
        _check_reference_only("gradient_form='magnitude'", backend)


def _check_reference_only(feature: str, backend: str) -> None:
    """Raises when a backend other than the reference (or "auto", which then picks it) is named
    for a feature that only the reference backend computes."""
    if backend not in ("auto", "reference"):
        raise ValueError(
            f"{feature} is computed by the reference backend only, not by {backend!r}; "
            "use backend='reference' or 'auto'"
        )


def _under_functorch_transform() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is active. torch.compile traces
    transforms in its own way and is not asked."""
    return torch._C._functorch.peek_interpreter_stack() is not None and not torch.compiler.is_compiling()


# The backend "auto" picks for each device type, kept after the first call: which backends are
# available does not change within a process, and finding out costs a small call a tenth of its
# time.
_auto_choices: dict[str, str] = {}


def _first_available(device_type: str) -> str:
    """The fastest backend available for tensors of `device_type`, its kernels loaded."""
    # The interpreter exists for testing Triton kernels; it is never a default for CPU tensors.
    chosen = next(
        name for name in BACKENDS if _runs_on(name, device_type) and not (name == "triton" and device_type == "cpu")
    )
    if chosen == "cuda":
        try:
            _build.load_cuda_kernels()
        except RuntimeError as error:  # the build failed: the next backend, and say why once
            warnings.warn(f"{error}; falling back", RuntimeWarning, stacklevel=4)
            return _first_available(device_type)
    return chosen


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that computes on `device` for a requested name ("auto" included)."""
    if backend == "auto":
        backend = os.environ.get("HGLOSS_BACKEND", "auto") or "auto"
        if backend not in BACKENDS + ("auto",):
            raise ValueError(
                f"HGLOSS_BACKEND={backend!r} is not a backend; expected one of {list(BACKENDS)} or 'auto'"
            )
    if backend == "auto":
        if _under_functorch_transform():
            return "reference"
        device_type = device.type
        chosen = _auto_choices.get(device_type)
        if chosen is None:
            chosen = _first_available(device_type)
            if not torch.compiler.is_compiling():
                _auto_choices[device_type] = chosen
        return chosen
    check_backend_name(backend)
    if backend != "reference" and _under_functorch_transform():
        raise RuntimeError(
            f"backend {backend!r} does not support torch.func transforms (grad, vmap, jacrev, ...): its "
            "hand-written backward is not a functorch rule; use backend='reference' (or 'auto', which "
            "picks it under a transform)"
        )
    if not _runs_on(backend, device.type):
        usable = [name for name in BACKENDS if _runs_on(name, device.type)]
        raise RuntimeError(
            f"backend {backend!r} is not available for {device.type} tensors; "
            f"available here: {usable}" + why_unavailable(backend)
        )
    if backend == "cuda":
        _build.load_cuda_kernels()
    return backend


def heatmap_gradient_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    target_weight: torch.Tensor | None = None,
    *,
    teacher: torch.Tensor | None = None,
    alpha: float | torch.Tensor = 0.5,
    mse_weight: float = 1.0,
    grad_weight: float = 1.0,
    stencil: str = "forward",
    reduction: str = "mean",
    backend: str = "auto",
    gradient_form: str = "components",
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Heatmap MSE plus the MSE of the heatmaps' finite-difference gradients, fused.

    Per plane (b, k), with the soft target T = (1 - a_b) G + a_b S (T = G without a teacher)
    and D = P - T::

        V = mean_ij D^2
        R = (sum Ax(D)^2 + sum Ay(D)^2) / (Nx + Ny)     (0 when the stencil has no position)
        L[b, k] = w[b, k] * (mse_weight * V + grad_weight * R)

    then reduced over (b, k) by `reduction`. Ax, Ay are the `stencil`'s gradient maps ("forward"
    differences, "central" differences or "sobel"), taken on their valid positions only. With a
    pixel_weight M, V = sum_ij M D^2 / (H*W) and each entry of Ax and Ay is weighted by M at the
    entry's own index (i, j) (Nx + Ny unchanged).

    Args:
        pred: (B, K, H, W) predicted heatmaps, float16/bfloat16/float32/float64, any strides.
        target: (B, K, H, W) target heatmaps, any floating dtype.
        target_weight: (B, K), (B, K, 1) or (B, K, 1, 1) per-plane weights, default 1. Values are
            not checked; negative weights are the caller's business.
        teacher: (B, K, H, W) soft-target heatmaps (self-distillation), optional.
        alpha: blend of the teacher into the target, a float in [0, 1] or a (B,) tensor; only
            used with a teacher. No gradient flows to it.
        mse_weight, grad_weight: weights of V and R, finite and >= 0.
        stencil: "forward", "central" or "sobel".
        reduction: "mean", "sum" or "none" (returns the (B, K) plane losses).
        backend: "auto", or one of hgloss.available_backends(). The environment variable
            HGLOSS_BACKEND overrides "auto".
        gradient_form: "components" (R above), or "magnitude": R becomes the mean of
            (|grad P| - |grad T|)^2 over the positions where both maps are defined. The magnitude
            form is computed by the reference backend only ("auto" picks it).
        pixel_weight: per-pixel weights M, a floating tensor broadcastable to (B, K, H, W), e.g.
            (B, 1, H, W) or (H, W); any strides (an expanded tensor is not copied). It may
            require grad; its gradient is computed by the reference backend only ("auto" then
            picks it; a fused backend named raises ValueError).

    Returns:
        The loss, float64 for a float64 pred and float32 otherwise.

    The fused backends compute dL/dpred in the forward pass whenever pred (or target, or
    teacher) requires grad and grad mode is on, and the backward only scales it. Evaluate
    validation losses under ``torch.no_grad()`` so they skip that work and its buffer.

    Example::

        >>> pred = torch.rand(32, 17, 64, 48, requires_grad=True)
        >>> target = torch.rand(32, 17, 64, 48)
        >>> loss = hgloss.heatmap_gradient_loss(pred, target, torch.ones(32, 17, 1))
        >>> loss.backward()
    """
    mse_weight, grad_weight = contract.check_loss_arguments(
        pred, target, teacher, alpha, target_weight, mse_weight, grad_weight, stencil, reduction,
        pixel_weight=pixel_weight,
    )
    if gradient_form != "components":
        check_gradient_form(gradient_form, backend)
        backend = "reference"
    if contract.pixel_weight_wants_grad(pixel_weight):
        check_backend_name(backend)
        _check_reference_only("the gradient of pixel_weight", backend)
        backend = "reference"
    backend = resolve_backend(backend, pred.device)
    return _run(
        backend, pred, (target, teacher, alpha, target_weight, pixel_weight), mse_weight, grad_weight, stencil,
        reduction, gradient_form,
    )


def keypoint_heatmap_loss(
    pred: torch.Tensor,
    keypoints: torch.Tensor,
    keypoint_weights: torch.Tensor | None = None,
    *,
    sigma: float = 2.0,
    encoding: str = "msra",
    teacher: torch.Tensor | None = None,
    alpha: float | torch.Tensor = 0.5,
    mse_weight: float = 1.0,
    grad_weight: float = 1.0,
    stencil: str = "forward",
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """heatmap_gradient_loss with the Gaussian targets built from keypoints inside the loss.

    The target of plane (b, k) is what hgloss.pose.codecs.MSRAHeatmap ("msra") or UDPHeatmap
    ("udp") encodes for keypoints[b, k]: a Gaussian of peak 1 and standard deviation `sigma`
    (heatmap pixels) on the int(3 sigma) window around the rounded keypoint, centred on the
    rounded ("msra") or exact ("udp") position, zero elsewhere, stored as float32. A keypoint
    whose window misses the heatmap gets plane weight 0 (the codecs' rule), and a plane of weight
    0 has an all-zero target. The fused backends evaluate the Gaussian in registers from two
    per-plane factors (hgloss.targets), so no (B, K, H, W) target is ever built or read; the
    reference backend builds it. docs/spec.md section 7.

    Args:
        pred: (B, K, H, W) predicted heatmaps, as in heatmap_gradient_loss.
        keypoints: (B, K, 2) floating (x, y) in heatmap pixels, pixel centres at integers (the
            codecs' keypoint divided by their stride). Must be finite where the weight is not 0;
            no gradient flows to them.
        keypoint_weights: (B, K), (B, K, 1) or (B, K, 1, 1) plane weights (visibility times
            joint weight), default 1. It may require grad.
        sigma: the Gaussian's standard deviation in heatmap pixels, > 0.
        encoding: "msra" or "udp".
        teacher, alpha, mse_weight, grad_weight, stencil, reduction, backend: as in
            heatmap_gradient_loss.

    Checking that the weighted keypoints are finite reads their values: one device
    synchronisation per call on a GPU, and a graph break under torch.compile.

    Example::

        >>> loss = hgloss.keypoint_heatmap_loss(pred, keypoints, visible, sigma=2.0)
    """
    mse_weight, grad_weight = contract.check_loss_arguments(
        pred, None, teacher, alpha, keypoint_weights, mse_weight, grad_weight, stencil, reduction,
        target_optional=True, weight_name="keypoint_weights",
    )
    targets.check_keypoints(pred, keypoints)
    sigma = targets.check_sigma(sigma)
    targets.check_encoding(encoding)
    backend = resolve_backend(backend, pred.device)
    batch, joints, height, width = pred.shape
    if backend == "cpu":
        # One C++ pass that also checks the keypoints; the composite of PyTorch operations
        # below costs about as much as the loss itself on the CPU.
        weights = None if keypoint_weights is None else keypoint_weights.detach()
        rows, cols, reaches = torch.ops.hgloss.gaussian_factors(
            keypoints.detach(), weights, height, width, sigma, encoding
        )
    else:
        targets.check_finite_where_weighted(keypoints, keypoint_weights)
        rows, cols, reaches = targets.gaussian_factors(keypoints, keypoint_weights, height, width, sigma, encoding)
    plane_weight = reaches.to(contract.accumulation_dtype(pred))
    if keypoint_weights is not None:
        plane_weight = keypoint_weights.reshape(batch, joints) * plane_weight
    return _run(
        backend, pred, (None, teacher, alpha, plane_weight, None), mse_weight, grad_weight, stencil, reduction,
        "components", (rows, cols),
    )


def _run(backend, pred, inputs, mse_weight, grad_weight, stencil, reduction, gradient_form, target_factors=None):
    """The loss from `backend` on checked arguments; inputs = (target, teacher, alpha,
    target_weight, pixel_weight), the target None when `target_factors` (rows, cols) stand for it."""
    target, teacher, alpha, target_weight, pixel_weight = inputs
    blend = None
    if teacher is not None:
        blend = alpha if isinstance(alpha, torch.Tensor) else _constant_blend(float(alpha), pred)
    kept = (target, teacher, blend, target_weight, pixel_weight)
    settings = (mse_weight, grad_weight, stencil, reduction, gradient_form, target_factors)
    try:
        return _compute(backend, pred, *kept, *settings)
    except RuntimeError:
        # The backward keeps these inputs, and one made under torch.inference_mode cannot be
        # kept ("Inference tensors cannot be saved for backward"); its copy can. Asked only after
        # a failure, so that the usual call pays nothing (and Dynamo, which cannot ask
        # is_inference, never gets here).
        if not any(tensor is not None and tensor.is_inference() for tensor in kept):
            raise
    copies = (tensor.clone() if tensor is not None and tensor.is_inference() else tensor for tensor in kept)
    return _compute(backend, pred, *copies, *settings)


def _compute(backend, pred, target, teacher, blend, target_weight, pixel_weight, mse_weight, grad_weight, stencil,
             reduction, gradient_form, target_factors):
    """The loss from the chosen backend, on checked arguments."""
    if backend != "reference":
        rows, cols = target_factors or (None, None)
        return ops.fused_heatmap_loss(
            backend, pred, target, teacher, blend, target_weight, mse_weight, grad_weight, stencil, reduction, rows,
            cols, pixel_weight,
        )
    if target is None:
        target = targets.materialise(*target_factors)
    dtype = contract.accumulation_dtype(pred)
    if blend is not None:
        blend = blend.detach().to(dtype)  # no gradient flows to alpha
    terms = reference.plane_terms(
        pred, target, teacher, blend, mse_weight, grad_weight, stencil, gradient_form, pixel_weight
    )
    if target_weight is not None:
        terms = terms * target_weight.reshape(pred.shape[:2]).to(dtype)
    return contract.reduce_plane_losses(terms, reduction)


# A float alpha's (B,) tensor, kept between calls: a tensor made afresh on every call costs a
# small input's forward+backward about 7 us, a quarter of the public function's own cost.
_BLENDS: dict[tuple, torch.Tensor] = {}
_MAX_BLENDS = 64


def _constant_blend(alpha: float, pred: torch.Tensor) -> torch.Tensor:
    """alpha as a (B,) tensor in the accumulation dtype on pred's device. The tensors are only
    read, never modified, so one can serve every call with the same key."""
    dtype = contract.accumulation_dtype(pred)
    if torch.compiler.is_compiling():
        return torch.full((pred.shape[0],), alpha, dtype=dtype, device=pred.device)
    key = (alpha, pred.shape[0], dtype, pred.device)
    blend = _BLENDS.get(key)
    if blend is None:
        if len(_BLENDS) >= _MAX_BLENDS:
            _BLENDS.clear()
        # Made outside inference mode, so that a backward may save it whatever mode the first
        # call ran in.
        with torch.inference_mode(False):
            blend = _BLENDS[key] = torch.full((pred.shape[0],), alpha, dtype=dtype, device=pred.device)
    return blend
