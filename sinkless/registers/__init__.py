"""Repairs that give the model a place for its artifacts: registers.

Now: test-time registers (Jiang et al. 2025), no retraining. Trained and self-distilled registers follow.
"""

from sinkless.registers.discovery import SWEEP, DiscoverySettings, discover
from sinkless.registers.ttr import MaxMode, RegisterNeurons, TestTimeRegisters, ZeroNeurons, load_neurons

__all__ = ["discover", "DiscoverySettings", "SWEEP", "MaxMode", "RegisterNeurons", "TestTimeRegisters", "ZeroNeurons", "load_neurons"]
