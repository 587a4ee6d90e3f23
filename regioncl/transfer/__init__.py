"""Transfer to detection: benchmark definitions, finetuning backends and evaluation.

``benchmarks`` defines what a benchmark is and ``registry`` the papers' protocols
(``config/benchmarks/*.yaml``); ``backends`` dispatches to ``torchvision_backend`` (+
``evaluate``, pycocotools) or ``detectron2_backend`` (imported only when a benchmark asks for
it: detectron2 is optional), whose config is ``detectron2_config`` (importable without it).
"""
