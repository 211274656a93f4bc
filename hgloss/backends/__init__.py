"""The backends behind hgloss.heatmap_gradient_loss: the reference (plain PyTorch), the Triton
kernels, and the loader of the C++ extension (CPU and CUDA kernels). They build on hgloss.contract
and hgloss.stencils, and never import the registration layer, hgloss.ops."""
