"""Checks shared by the tool integration tests (and the main suite's callback tests): the noise trace a
run wrote with ``FLATLORA_TRACE`` and the TensorBoard scalars it logged."""

from __future__ import annotations

from pathlib import Path

from flatlora_dist.trace import read, verify


def check_noise_trace(path: str | Path, steps: int, micro_batches: int) -> dict:
    """Noise in every forward of every step, one draw per step, a new draw each step, the base bitwise
    unchanged after training; ``micro_batches`` forwards per module and step (no recomputation)."""
    summary, problems = verify(read(path), forwards_per_step=micro_batches)
    assert not problems, "\n".join(problems)
    assert summary["steps"] == steps, summary
    return summary


def tensorboard_scalars(logdir: str | Path) -> dict[str, list[float]]:
    """Every scalar tag in the TensorBoard event files under ``logdir`` -> its values in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[float]] = {}
    for events in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            found.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return found


def check_tensorboard(logdir: str | Path, steps_logged: int) -> dict[str, list[float]]:
    """``flatlora/*`` scalars reached TensorBoard, one value per logged step, next to the training loss."""
    scalars = tensorboard_scalars(logdir)
    flat = {k: v for k, v in scalars.items() if "flatlora/" in k}
    assert flat, f"no flatlora/* scalars in TensorBoard under {logdir}; tags: {sorted(scalars)}"
    assert any(k.endswith("flatlora/factor") for k in flat), sorted(flat)
    for tag, values in flat.items():
        assert len(values) == steps_logged, (tag, values)
    return flat
