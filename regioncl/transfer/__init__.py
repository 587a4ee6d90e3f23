"""Transfer to detection: benchmark definitions, finetuning backends and evaluation.

``benchmarks`` is the settings schema of a benchmark, ``registry`` resolves one by name (the
papers' protocols, ``config/benchmarks/*.yaml``) and ``records`` holds what the stages hand on
(the finetuned detector file, the metrics record). ``backends`` dispatches to a backend module
exposing ``finetune`` and ``evaluate``: ``torchvision_backend`` (its evaluator
``torchvision_eval``, pycocotools) or ``detectron2_backend`` (imported only when a benchmark
asks for it: detectron2 is optional), whose config is ``detectron2_config`` (importable without it).
"""
