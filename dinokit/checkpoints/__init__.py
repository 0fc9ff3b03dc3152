"""Every checkpoint format in and out.

Reads (always with ``torch.load(weights_only=True)``, never unpickling arbitrary objects):
1. released backbone weights: a flat state dict of the teacher backbone;
2. full training checkpoints (the reference trainer's and dinokit's): ``student`` / ``teacher``
   dicts with ``module.`` / ``backbone.`` / ``head.`` prefixes and an ``argparse.Namespace``;
3. linear-probe weights ``{"state_dict": {"module.linear.weight", ...}}`` (:func:`load_linear_head`);
4. timm state dicts (DINO's ViTs, ``vit_*_patch14_dinov2``, ``vit_*_patch14_reg4_dinov2``,
   ``vit_*_patch16_dinov3``) and dinokit's own files (``{"backbone": ..., "arch": ...}``);
   the official DINOv2 hub files and DINOv3 release files are case 1;
5. Hugging Face transformers DINO, DINOv2 (with and without registers) and DINOv3 checkpoints
   (``pytorch_model.bin`` or ``model.safetensors``, or the folder holding one);
6. fine-tuned models, backbone + classifier head + class names (:func:`load_finetuned`).
Writes dinokit's own files atomically.

One module per concept: :mod:`.reading` (safe reading and writing, fingerprints), :mod:`.conversion`
(HF / timm / DINOv2 / DINOv3 key names, the backbone out of any layout, the architecture a state dict
holds), :mod:`.backbone` (BackboneOptions, prepare_backbone, load_backbone, save_backbone) and
:mod:`.finetuned` (fine-tuned models and linear heads). Every name is importable from here.
"""

from ..errors import DinokitError
from ..presets import LINEAR_PRESETS, PRESETS
from .backbone import (
    BackboneOptions,
    PreparedBackbone,
    backbone_state_dict,
    describe,
    load_backbone,
    prepare_backbone,
    save_backbone,
    weights_needed,
)
from .conversion import (
    convert_hf_state_dict,
    extract_backbone_state_dict,
    infer_arch,
    is_hf_state_dict,
    map_weight_norm_keys,
    normalize_dino_state_dict,
    strip_prefixes,
    to_hf_state_dict,
)
from .finetuned import (
    FINETUNE_CHECKPOINT_FORMAT,
    FINETUNED_MODEL_FORMAT,
    export_finetuned,
    load_finetuned,
    load_linear_head,
)
from .reading import (
    error_line,
    file_fingerprint,
    read_checkpoint,
    require_finite_weights,
    save_checkpoint,
    state_dict_fingerprint,
)

__all__ = [
    "PRESETS",
    "LINEAR_PRESETS",
    "DinokitError",
    "FINETUNED_MODEL_FORMAT",
    "FINETUNE_CHECKPOINT_FORMAT",
    "BackboneOptions",
    "PreparedBackbone",
    "backbone_state_dict",
    "convert_hf_state_dict",
    "describe",
    "error_line",
    "export_finetuned",
    "extract_backbone_state_dict",
    "file_fingerprint",
    "infer_arch",
    "is_hf_state_dict",
    "load_backbone",
    "load_finetuned",
    "load_linear_head",
    "map_weight_norm_keys",
    "normalize_dino_state_dict",
    "prepare_backbone",
    "read_checkpoint",
    "require_finite_weights",
    "save_backbone",
    "save_checkpoint",
    "state_dict_fingerprint",
    "strip_prefixes",
    "to_hf_state_dict",
    "weights_needed",
]
