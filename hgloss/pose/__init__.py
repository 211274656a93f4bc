"""Reusable parts of the reference pose trainer: box and affine transforms, heatmap codecs, datasets, models and
evaluation. They need numpy, pillow and pycocotools (pip install hgloss[pose])."""
