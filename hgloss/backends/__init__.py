"""The backends behind hgloss.heatmap_gradient_loss. Each computes the per-plane terms
mse_weight * V + grad_weight * R of docs/spec.md section 1; the target weight and the reduction are
applied once, in hgloss.functional."""
