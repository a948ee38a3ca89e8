"""The training methods: each registers itself by name (see base.py for the protocol).

`MethodOptions` is the part of the training configuration that names the method and holds every
method's own section (`--method=opsd --opsd.beta=0`); jsdr.train's TrainConfig extends it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jsdr.config import field
from jsdr.losses.grpo import GRPOConfig
from jsdr.losses.opsd import OPSDConfig
from jsdr.losses.sft import SFTConfig
from jsdr.methods import grpo, opsd, sft  # noqa: F401  (registration)
from jsdr.methods.base import METHODS, Method, Setup, StepBatch, get, register

MethodName = Literal["sft", "grpo", "opsd"]


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    method: MethodName = field("opsd", "training method")
    sft: SFTConfig = field(SFTConfig(), "")
    grpo: GRPOConfig = field(GRPOConfig(), "")
    opsd: OPSDConfig = field(OPSDConfig(), "")

    def method_options(self):
        """The section of the selected method."""
        return getattr(self, self.method)


__all__ = ["METHODS", "Method", "MethodName", "MethodOptions", "Setup", "StepBatch", "get", "register"]
