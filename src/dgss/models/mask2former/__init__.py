"""A pure-PyTorch Mask2Former head (pixel decoder, masked-attention decoder, matcher, criterion) with
mmdet's module names, so official Rein/FisherTune checkpoints load by a key map."""

from .checkpoint import (
    HeadCheckpointError,
    convert_official_head_state_dict,
    head_to_official_key,
    load_official_head_state_dict,
    official_head_state_dict,
    official_to_head_key,
)
from .criterion import Mask2FormerCriterion, dice_loss
from .deformable_attention import (
    MultiScaleDeformableAttention,
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_per_level,
)
from .head import Mask2FormerHead, semantic_scores
from .matcher import Assignment, HungarianMatcher, present_classes
from .pixel_decoder import MSDeformAttnPixelDecoder
from .position_encoding import sine_position_encoding
from .transformer_decoder import Mask2FormerTransformerDecoder

__all__ = [
    "Mask2FormerHead",
    "Mask2FormerCriterion",
    "HungarianMatcher",
    "Assignment",
    "MSDeformAttnPixelDecoder",
    "Mask2FormerTransformerDecoder",
    "MultiScaleDeformableAttention",
    "multi_scale_deformable_attention",
    "multi_scale_deformable_attention_per_level",
    "sine_position_encoding",
    "semantic_scores",
    "present_classes",
    "dice_loss",
    "HeadCheckpointError",
    "load_official_head_state_dict",
    "convert_official_head_state_dict",
    "official_head_state_dict",
    "official_to_head_key",
    "head_to_official_key",
]
