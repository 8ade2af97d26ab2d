"""Architectures 1 and 2 as plans of fusion units over branch leaves (labels `rgb@0.125`).

Architecture 1 (rates first)                 Architecture 2 (modalities first)

          rgb+flow+obj@0.125+0.5                      rgb+flow+obj@0.125+0.5
       ┌────────────┼────────────┐                    ┌─────────┴─────────┐
  rgb@0.125+0.5 flow@0.125+0.5 obj@0.125+0.5   rgb+flow+obj@0.125   rgb+flow+obj@0.5
   ┌────┴────┐    ┌────┴────┐   ┌────┴────┐     ┌─────┼─────┐      ┌─────┼─────┐
 rgb@    rgb@   flow@    flow@ obj@    obj@    rgb@  flow@ obj@   rgb@  flow@ obj@
 0.125   0.5    0.125    0.5   0.125   0.5     0.125 0.125 0.125  0.5   0.5   0.5

A level whose units would have a single input is left out: one rate over three modalities is
the original RU-LSTM with modality attention, one modality over several rates a pure slow-fast
fusion. Any number of rates and modalities works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Architecture = Literal["arch1", "arch2"]


def leaf_label(modality: str, alpha: float) -> str:
    """Label (and stream key) of a branch leaf, e.g. `rgb@0.125`."""
    return f"{modality}@{alpha:g}"


def _join(alphas: Sequence[float]) -> str:
    return "+".join(f"{a:g}" for a in alphas)


@dataclass(frozen=True)
class FusionUnit:
    """One attention fusion to train: its label, its inputs' labels and what it fuses."""

    label: str
    inputs: tuple[str, ...]
    fuses: Literal["modalities", "rates"]
    level: int  # 1 = the first fusion level, 2 = the fusion of level-1 units

    @property
    def dropout_field(self) -> str:
        return "modality_dropout" if self.fuses == "modalities" else "rate_dropout"


def plan_architecture(
    architecture: Architecture, modalities: Sequence[str], alphas: Sequence[float]
) -> list[FusionUnit]:
    """Fusion units bottom-up; the last one is the whole model (empty for a single branch)."""
    final_label = f"{'+'.join(modalities)}@{_join(alphas)}"
    if architecture == "arch2":
        firsts = [
            FusionUnit(
                f"{'+'.join(modalities)}@{a:g}",
                tuple(leaf_label(m, a) for m in modalities),
                "modalities",
                1,
            )
            for a in alphas
        ]
        second_fuses = "rates"
    else:
        firsts = [
            FusionUnit(f"{m}@{_join(alphas)}", tuple(leaf_label(m, a) for a in alphas), "rates", 1)
            for m in modalities
        ]
        second_fuses = "modalities"
    if len(firsts[0].inputs) == 1:  # nothing to fuse at level 1: level 2 fuses the branches
        inputs = tuple(unit.inputs[0] for unit in firsts)
        if len(inputs) == 1:
            return []
        return [FusionUnit(final_label, inputs, second_fuses, 1)]
    if len(firsts) == 1:  # level 1 already fuses everything
        return [FusionUnit(final_label, firsts[0].inputs, firsts[0].fuses, 1)]
    return [*firsts, FusionUnit(final_label, tuple(u.label for u in firsts), second_fuses, 2)]
