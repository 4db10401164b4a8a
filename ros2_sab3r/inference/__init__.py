"""Inference backends behind one protocol: torch, onnxruntime, tensorrt (see ARCHITECTURE.md).

``load_model(ModelConfig)`` (in :mod:`ros2_sab3r.inference.factory`) picks one from the
``model.backend`` parameter; the pipeline and the node only see :class:`Backend`. Importing this
package is cheap: torch, onnxruntime, tensorrt and pycuda are imported by the backend that needs
them.
"""

from ros2_sab3r.inference.base import Backend, BackendUnavailable

__all__ = ['Backend', 'BackendUnavailable']
