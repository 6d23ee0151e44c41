"""Repairs that give the model a place for its artifacts: registers.

- test-time registers (Jiang et al. 2025), no retraining: ``discover``, ``TestTimeRegisters``;
- trained registers (Darcet et al. 2024): ``add_registers`` puts register tokens into a pretrained ViT;
- self-distilled registers, PH-Reg (Chen et al. 2025): ``distill`` trains them from the model's own
  multi-view denoised features (``denoise_views``, usable alone to clean features).
"""

from sinkless.registers.add import add_registers, remove_registers
from sinkless.registers.discovery import SWEEP, DiscoverySettings, discover
from sinkless.registers.distill import DistillResult, DistillSettings, augmented, distill, training_photos
from sinkless.registers.multiview import ViewSettings, denoise_views
from sinkless.registers.ttr import MaxMode, RegisterNeurons, TestTimeRegisters, ZeroNeurons, load_neurons

__all__ = [
    "discover", "DiscoverySettings", "SWEEP", "MaxMode", "RegisterNeurons", "TestTimeRegisters", "ZeroNeurons", "load_neurons",
    "add_registers", "remove_registers", "denoise_views", "ViewSettings", "distill", "DistillSettings", "DistillResult",
    "training_photos", "augmented",
]
