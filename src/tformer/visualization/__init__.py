"""Explaining a model and a run: attention maps (arrays, PNG heatmaps, an interactive HTML
view) and the self-contained HTML report of a training run.

Only :mod:`tformer.visualization.attention` is imported here: plots and reports import
matplotlib when they are used."""

from tformer.visualization.attention import AttentionMaps, attention_maps, attention_maps_batch

__all__ = ["AttentionMaps", "attention_maps", "attention_maps_batch"]
