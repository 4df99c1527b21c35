"""An estimate's result: each stage's bytes, and the verdict against a budget with the calibration's margins
(what :func:`cogvid_core.plan.estimate.estimate` returns; the report and chart are :mod:`cogvid_core.plan.chart`'s)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class StageEstimate:
    name: str
    weights: int           # bytes of weights on the GPU during the stage
    activations: int       # bytes of activations (and transients) at the stage's peak
    peak_allocated: int
    peak_reserved: int
    host_bytes: int = 0        # host RAM the process owns (anonymous + pinned): see hostplan
    host_file_bytes: int = 0   # file pages the stage re-reads, which the page cache would like to keep

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Estimate:
    variant_key: str
    frames: int
    height: int
    width: int
    profile_name: str
    precision: dict
    cfg_mode: str
    ff_chunk: int | None
    tile: tuple | None
    tokens: int
    stages: list[StageEstimate]
    budget_bytes: int | None = None
    calibration_source: str = ""
    keep_loaded: bool = False
    profile: object = field(default=None, repr=False, compare=False)
    margin: float = 0.0
    allocator: str = "native"
    calibration: dict = field(default_factory=dict)   # calibration()'s "choice": card, tolerance, note
    stage_margins: dict = field(default_factory=dict)  # {stage or "stage:cfg mode": margin} where calibrated
    stage_margin_bytes: dict = field(default_factory=dict)  # the same keys: largest under-estimate in bytes
    cache: str = "none"       # the step cache counted (the Sampler's must be the same: plan.match)

    def _of_stage(self, table: dict, name: str, default=None):
        """A stage's entry in a per-stage table: its CFG mode's ("denoise_step:batched") before its own."""
        return table.get(f"{name}:{self.cfg_mode}", table.get(name, default))

    def stage_margin(self, name: str) -> float:
        return float(self._of_stage(self.stage_margins, name, self.margin))

    def stage_margin_extra(self, name: str) -> int | None:
        """The stage's largest under-estimate in bytes, None where not calibrated."""
        return self._of_stage(self.stage_margin_bytes, name)

    @property
    def transfer_margin(self) -> float:
        """What a card with no calibration file of its own adds to every stage's verdict (cards.choose:
        the margin measured between two calibrated cards); 0 on a calibrated card."""
        return float(self.calibration.get("transfer_margin") or 0.0)

    def stage_needed(self, name: str) -> int:
        """A stage's peak reserved plus its margin: the largest relative under-estimate the calibration saw
        for that stage, or where it also knows the largest one in bytes and its tolerance, the larger of
        those two (+bytes, +tolerance) when that is less. Each bound holds every measured cell, so does
        the smaller; the big misses in relative terms are small peaks (H200 grid: 29-47% at under 2 GiB,
        at most 7% above 3 GiB), so a 6 GiB decode no longer carries the 31% a 1 GiB one needs.
        On a card with no file of its own, that times 1 + the transfer margin."""
        p = self.stage(name).peak_reserved
        relative = p * (1 + self.stage_margin(name))
        extra, tol = self.stage_margin_extra(name), self.calibration.get("tolerance")
        own = relative if extra is None or tol is None else min(relative, max(p + extra, p * (1 + tol)))
        return int(own * (1 + self.transfer_margin))

    @property
    def needed_stage(self) -> str:
        """The stage whose reserved peak plus its own margin is largest (what a budget must hold)."""
        return max(self.stages, key=lambda s: self.stage_needed(s.name)).name

    @property
    def needed_bytes(self) -> int:
        """What the verdict compares with the budget: each stage's peak reserved plus its calibrated
        margin (a stage the model predicts worse gets a wider one), the largest."""
        return self.stage_needed(self.needed_stage)

    @property
    def peak_allocated(self) -> int:
        return max(s.peak_allocated for s in self.stages)

    @property
    def peak_reserved(self) -> int:
        return max(s.peak_reserved for s in self.stages)

    @property
    def host_peak_bytes(self) -> int:
        return max(s.host_bytes for s in self.stages)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda s: s.peak_reserved).name

    @property
    def fits(self) -> bool | None:
        """Peak reserved (what the process takes from the card) within the budget; None: no budget."""
        if self.budget_bytes is None:
            return None
        return self.needed_bytes <= self.budget_bytes

    def stage(self, name: str) -> StageEstimate:
        return next(s for s in self.stages if s.name == name)

    def advice(self) -> str:
        """What to change when it does not fit ("" when it fits or there is no budget)."""
        from cogvid_core.plan.chart import advice
        return advice(self)

    def decode_note(self) -> str:
        """One line when this plan's decode tile gives frames slightly unlike the resident profile's."""
        from cogvid_core.plan.chart import decode_tile_note
        return decode_tile_note(self.tile)

    def report(self, host_available: int | None = None) -> str:
        from cogvid_core.plan.chart import report_text
        return report_text(self, host_available)

    def to_dict(self) -> dict:
        return {"variant": self.variant_key, "frames": self.frames, "height": self.height, "width": self.width,
                "profile": self.profile_name, "precision": dict(self.precision), "cfg_mode": self.cfg_mode,
                "ff_chunk": self.ff_chunk, "vae_tile": list(self.tile) if self.tile else None,
                "tokens": self.tokens, "stages": {s.name: s.to_dict() for s in self.stages},
                "peak_allocated": self.peak_allocated, "peak_reserved": self.peak_reserved,
                "peak_stage": self.peak_stage, "host_peak_bytes": self.host_peak_bytes, "needed_bytes": self.needed_bytes, "margin": self.margin,
                "transfer_margin": self.transfer_margin,
                "budget_bytes": self.budget_bytes, "fits": self.fits,
                "advice": self.advice(), "keep_loaded": self.keep_loaded, "allocator": self.allocator,
                "calibration": self.calibration_source, "calibrated_on": self.calibration.get("card"),
                "decode_note": self.decode_note(),
                "tolerance": self.calibration.get("tolerance"), "calibration_note": self.calibration.get("note", "")}
