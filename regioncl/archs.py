"""The backbone architectures regioncl pretrains and transfers: torchvision's ResNets, by
torchvision's name, with the short name a run's name carries (``moco_v2_r50_200ep``)."""

ARCH_SHORT_NAMES = {"resnet18": "r18", "resnet34": "r34", "resnet50": "r50", "resnet101": "r101"}
ARCHS = tuple(ARCH_SHORT_NAMES)
