"""Transfer to detection: benchmark definitions, finetuning backends and COCO evaluation.

``benchmarks`` defines what a benchmark is; ``torchvision_backend`` finetunes torchvision's
R-CNNs; ``evaluate`` scores a finetuned detector. A detectron2 backend would sit beside the
torchvision one and be imported only when a benchmark asks for it (detectron2 is optional).
"""
