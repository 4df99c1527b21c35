"""What a speed option (cogvid_core.speed.fast) changes in the estimate: the denoise step's attention and
feed-forward phases, a compiled step's fragmentation, compile's host memory, and the report's note.

Units are the step's hidden-state units (batch x tokens x dim x bytes), as in :mod:`cogvid_core.plan.estimate`.
"""
from __future__ import annotations

from cogvid_core.speed import fast

# What compiling the blocks holds in the process's own host memory during the denoise (inductor's lowering and
# code generation; its worker processes come on top): H100, the 12 GB plan at 81x768x1360 from the files,
# denoise anonymous + pinned 2.81 GiB with fp8+fa3fp8+compile against 2.15 exact (bench/hostrun_estimate_h100.json),
# rounded up. A restart with the kept compile file holds less (the estimate is then on the safe side).
COMPILE_HOST_BYTES = int(0.7 * 1024 ** 3)

# What a speed option adds to the denoise step, from H200 runs of 1.5 at 81x768x1360. FP8 attention keeps float8
# q, k, v, K less its mean and the output's layout copy: +0.63 GiB allocated over exact in lowvram, one branch of
# 45,106 tokens (bench/hostrun_h200_s6.json), 2.4 units. compile, cudnn, sage and fp8+compile peaked at or below exact.
SPEED_ATTN_UNITS = {"fa3fp8": 2.4}

# The calibration's terms for a speed option, fitted from the grid's speed cells (bench_estimate --speeds); a file
# without them keeps these starts:
# - a compiled step: what it does not hold of the feed-forward phase (units of it), more with fp8, and the share of
#   the step's fragmentation it keeps; nothing saved (the safe side);
# - float8 matmuls without compile (eager `fp8`): units of the feed-forward phase's rows (the 12288-wide
#   intermediate in several forms: +10.97 GiB resident, batched, unchunked, bench/speed_h200.json: 21 units) and
#   full-size units on top (the H100's chunked steps held 0.4-1.7 GiB more than 21 units of their chunk's rows:
#   bench/estimate_h100_speed.json), and the share of the step's fragmentation it keeps (its large transient
#   float8 and bf16 copies of each weight are freed and taken again at one size: the H100's resident step
#   reserved 36.62 GiB where the exact share said 40.48).
NEUTRAL = {"step_ff_units_compile_saved": 0.0, "step_ff_units_fp8_compile_saved": 0.0,
           "reserved_frag_compile_mult": 1.0, "step_ff_units_fp8_eager": 21.0, "step_live_units_fp8_eager": 0.0,
           "reserved_frag_fp8_eager_mult": 1.0}


def fitted(constants: dict) -> bool:
    """Whether a calibration set was fitted with speed cells (any of its speed terms moved from NEUTRAL)."""
    return any(constants.get(k, v) != v for k, v in NEUTRAL.items())


def eager_fp8(speed: fast.Speed) -> bool:
    return speed.fp8 and not speed.compile


def attention_units(speed: fast.Speed) -> float:
    """Units the option's attention adds to the attention phase."""
    return SPEED_ATTN_UNITS.get(speed.attention, 0.0)


def ff_units(c: dict, speed: fast.Speed) -> float:
    """Units the option adds to (negative: takes from) the feed-forward phase, per row of it."""
    extra = c["step_ff_units_fp8_eager"] if eager_fp8(speed) else 0.0
    if speed.compile:
        extra -= c["step_ff_units_compile_saved"] + (c["step_ff_units_fp8_compile_saved"] if speed.fp8 else 0.0)
    return extra


def live_units(c: dict, speed: fast.Speed) -> float:
    """Full-size units the option holds beside the step's live hidden states."""
    return c["step_live_units_fp8_eager"] if eager_fp8(speed) else 0.0


def frag_mult(c: dict, speed: fast.Speed) -> float:
    """The share of the step's fragmentation the option keeps."""
    if speed.compile:
        return c["reserved_frag_compile_mult"]
    return c["reserved_frag_fp8_eager_mult"] if speed.fp8 else 1.0


def host_bytes(speed: fast.Speed, tiny: bool) -> int:
    """What the option holds in the process's host memory during the denoise."""
    return COMPILE_HOST_BYTES if speed.compile and not tiny else 0


def choice(cal: dict, speed: fast.Speed) -> dict:
    """The calibration's choice as the report shows it; a compiled option on a file fitted without speed cells
    (no compile terms) says the estimate errs high."""
    if not speed.compile or fitted(cal["constants"]) or not cal["choice"].get("card"):
        return cal["choice"]
    note = ("compiled speed options are counted as if compile saved nothing (this calibration has no speed "
            "measurements): the estimate errs high for them (H200, resident step: up to 20% of peak allocated)")
    return dict(cal["choice"], note="; ".join(x for x in (cal["choice"].get("note"), note) if x))
