"""Cost-model weights fitted to measurements (written by benchmarks/calibrate_cost_model.py).

Keyed by a substring of the device name; ``cost_model.device_profile`` uses the first match and
falls back to its uncalibrated defaults for other devices.
Fitted from calibration_h100_sweep1.json, calibration_h100_sweep2.json: NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0, 2026-11-24T02:19:17;
median |log(predicted / measured)| = 0.172 over 224 timings.
"""

CUDA_WEIGHTS: dict[str, dict[str, float]] = {
    'H100': {
        'launch': 1.21504e-05,
        'byte': 1.81891e-11,
        'element': 0,
        'slot': 1.89201e-11,
        'bisect': 5.8432e-11,
        'radix': 7.59267e-10,
        'scan': 0,
        'network': 3.2511e-11,
        'sort_network': 9.84037e-11,
        'filter': 1.15452e-09,
        'sync': 4.94926e-09,
        'torch_launch': 7.80017e-05,
        'torch_element': 8.36591e-12,
        'torch_sort': 0,
        'torch_row': 7.26936e-09,
    },
}
