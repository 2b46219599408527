"""Cost-model weights fitted to measurements (written by benchmarks/calibrate_cost_model.py).

Keyed by a substring of the device name; ``cost_model.device_profile`` uses the first match and
falls back to its uncalibrated defaults for other devices.
"""

CUDA_WEIGHTS: dict[str, dict[str, float]] = {}
