"""Qwen3-VL: the Qwen-VL hooks (``qwen.py``) plus deepstack. The tower also returns features of some
intermediate blocks (deepstack), which the LLM adds at its first layers: they are filtered with the
final keep mask (never merged). Processor normalisation mean = std = 0.5: the paper's pixel scale."""

from __future__ import annotations

from medpruner.adapters.qwen import QwenVLAdapter


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    default_temperature = 2.0
    has_deepstack = True

