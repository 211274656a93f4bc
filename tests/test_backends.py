"""Backend choice: available_backends, "auto", HGLOSS_BACKEND, the fallback when the C++ extension
is missing, and the just-in-time build."""

import pytest
import torch

import hgloss
from hgloss import functional

from conftest import run_python


def test_available_backends_lists_cpu_and_reference():
    backends = hgloss.available_backends()
    assert backends[-1] == "reference"
    assert "cpu" in backends, "the C++ extension should be built by `make install`"
    assert all(name in functional.BACKENDS for name in backends)


def test_auto_picks_the_fused_cpu_kernel(monkeypatch):
    monkeypatch.delenv("HGLOSS_BACKEND", raising=False)
    assert functional.resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("HGLOSS_BACKEND", "reference")
    assert functional.resolve_backend("auto", torch.device("cpu")) == "reference"
    # An explicit backend wins over the environment.
    assert functional.resolve_backend("cpu", torch.device("cpu")) == "cpu"
    # The override changes the numbers' source, not the numbers.
    pred, target = torch.rand(2, 3, 8, 6, dtype=torch.float64), torch.rand(2, 3, 8, 6, dtype=torch.float64)
    via_env = hgloss.heatmap_gradient_loss(pred, target)
    monkeypatch.setenv("HGLOSS_BACKEND", "cpu")
    assert torch.allclose(via_env, hgloss.heatmap_gradient_loss(pred, target), rtol=1e-12, atol=0)


def test_environment_with_unknown_backend(monkeypatch):
    monkeypatch.setenv("HGLOSS_BACKEND", "fast")
    with pytest.raises(ValueError, match="HGLOSS_BACKEND='fast' is not a backend"):
        hgloss.heatmap_gradient_loss(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2))


def test_without_the_extension_everything_runs_on_the_reference():
    result = run_python(
        """
        import warnings, torch
        warnings.simplefilter("always")
        import hgloss
        assert "cpu" not in hgloss.available_backends(), hgloss.available_backends()
        pred = torch.rand(2, 3, 8, 6, requires_grad=True)
        hgloss.heatmap_gradient_loss(pred, torch.rand(2, 3, 8, 6)).backward()
        assert pred.grad is not None
        try:
            hgloss.heatmap_gradient_loss(pred, torch.rand(2, 3, 8, 6), backend="cpu")
        except RuntimeError as error:
            print("refused:", error)
        else:
            raise AssertionError("backend='cpu' should be refused without the extension")
        """,
        HGLOSS_DISABLE_EXTENSION="1",
        HGLOSS_BACKEND="",
    )
    assert "refused: backend 'cpu' is not available for cpu tensors; available here: ['reference']" in result.stdout


HIDE_EXTENSION = """
import importlib.abc, sys
class HideExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "hgloss._C":
            raise ImportError("hidden for this test")
sys.meta_path.insert(0, HideExtension())
"""


def test_failed_just_in_time_build_warns_once_and_falls_back(tmp_path):
    result = run_python(
        HIDE_EXTENSION
        + """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch, hgloss
    from hgloss.backends import _build
    assert _build.load_extension() is False
    pred = torch.rand(2, 3, 8, 6, requires_grad=True)
    hgloss.heatmap_gradient_loss(pred, torch.rand(2, 3, 8, 6)).backward()
print("cpu" in hgloss.available_backends(), "cpu backend")
print(sum("the C++ extension is unavailable" in str(w.message) for w in caught), "warning")
""",
        TORCH_EXTENSIONS_DIR=str(tmp_path),
        CXX="/nonexistent/c++",
    )
    assert "False cpu backend" in result.stdout
    assert "1 warning" in result.stdout


def test_missing_extension_is_built_just_in_time(tmp_path):
    """With hgloss._C unimportable, the sources are compiled once with ninja and the fused
    kernel is used; the result equals the ahead-of-time build's."""
    result = run_python(
        HIDE_EXTENSION
        + """
import torch, hgloss
assert "cpu" in hgloss.available_backends(), hgloss.available_backends()
torch.manual_seed(0)
pred, target = torch.rand(2, 3, 8, 6, dtype=torch.float64), torch.rand(2, 3, 8, 6, dtype=torch.float64)
print(repr(hgloss.heatmap_gradient_loss(pred, target, backend="cpu").item()))
""",
        TORCH_EXTENSIONS_DIR=str(tmp_path),
    )
    assert "compiling the C++ extension" in result.stderr
    torch.manual_seed(0)
    pred, target = torch.rand(2, 3, 8, 6, dtype=torch.float64), torch.rand(2, 3, 8, 6, dtype=torch.float64)
    expected = hgloss.heatmap_gradient_loss(pred, target, backend="cpu").item()
    assert float(result.stdout.strip().splitlines()[-1]) == expected


def test_an_outdated_extension_is_detected(monkeypatch):
    from hgloss.backends import _build

    assert _build._has_required_operators()
    monkeypatch.setattr(_build, "REQUIRED_OPERATORS", _build.REQUIRED_OPERATORS + ("operator_of_a_newer_version",))
    assert not _build._has_required_operators()
