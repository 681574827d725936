"""The embedded demo: LPCAM against CAM on a synthetic part-based benchmark, on a CPU.

* :mod:`lpcam_core.demo.synthetic`: the seeded procedural dataset in the VOC layout;
* :mod:`lpcam_core.demo.pipeline`: train a small CNN, build the bank, compute and score the seeds,
  write the report (:func:`run_demo`, ``lpcam demo``).
"""

from __future__ import annotations

from .pipeline import (
    METHODS,
    CAMNet,
    DemoSettings,
    add_demo_arguments,
    build_bank,
    compute_seeds,
    demo_settings,
    evaluate_seeds,
    format_gain,
    format_table,
    gain_interval,
    images_to_tensor,
    inference_model,
    main_from_args,
    run_demo,
    run_pipeline,
    seed_everything,
    train_classifier,
    write_report,
)

__all__ = [
    "DemoSettings", "CAMNet", "run_demo", "demo_settings", "run_pipeline", "train_classifier", "inference_model",
    "build_bank", "compute_seeds", "evaluate_seeds", "format_table", "gain_interval", "format_gain",
    "write_report", "add_demo_arguments", "main_from_args", "METHODS", "images_to_tensor", "seed_everything",
]
