"""The contract between edge and cloud: adapter layout, directions from seeds, the ZO update, the wire.

Imports neither torch nor llama_cpp.
"""

from protocol.spec import AdapterSpec, ModelDims, TensorInfo
from protocol.zo import (
    Group,
    Guide,
    Schedule,
    StepRecord,
    apply_step,
    direction,
    online_lambda,
    orthonormal_basis,
    replay,
    to_gradient_units,
    update_direction,
    zo_gradient,
)

__all__ = [
    "AdapterSpec",
    "Group",
    "Guide",
    "ModelDims",
    "Schedule",
    "StepRecord",
    "TensorInfo",
    "apply_step",
    "direction",
    "online_lambda",
    "orthonormal_basis",
    "replay",
    "to_gradient_units",
    "update_direction",
    "zo_gradient",
]
