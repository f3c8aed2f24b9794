"""Plausible bugs that the fast test tier (``make test-fast``) must catch, planted one at a time by
``tests/mutants/run.py`` (``make mutants``) into a temporary copy of the package.

Each mutant is plain data: a name, the bug in words, and one or more exact text replacements
``(file, old, new)``.  ``old`` must occur exactly once in ``file``; otherwise the runner reports the mutant
as NOT APPLICABLE and fails, so a refactor cannot silently disable a mutant: re-anchor its text instead.
They target the default (CPU block) noise path: its fused C pass and the torch-op path it falls back to.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str
    edits: tuple[tuple[str, str, str], ...]


MUTANTS: list[Mutant] = [
    Mutant(
        "block_index_dropped",
        "every 2^18 noise block drawn with the same seed (block index dropped from the hash)",
        (("flatlora_dist/noise.py",
          "gen.manual_seed(block_seed(seed, step, name, block))",
          "gen.manual_seed(block_seed(seed, step, name, 0))"),),
    ),
    Mutant(
        "row_std_by_shard_local_row",
        "row std looked up by the shard-local instead of the global row",
        (("flatlora_dist/perturbation.py",
          "yield lo, self.layout.scale_(z, lo, std)",
          "yield lo, self.layout.scale_(z, lo - start, std)"),),
    ),
    Mutant(
        "norm_allreduce_skipped",
        "row-norm all-reduce skipped (still counted)",
        (("flatlora_dist/norms.py",
          "dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)",
          "pass  # all_reduce skipped"),),
    ),
    Mutant(
        "functional_backward_step_plus_one",
        "functional backward rebuilds W + e from step+1",
        (("flatlora_dist/functional.py",
          "    def make(dtype: torch.dtype) -> torch.Tensor:\n"
          "        return noisy_weight(backend, target, key, dtype)",
          "    def make(dtype: torch.dtype, ahead: int = 0) -> torch.Tensor:\n"
          "        nxt = NoiseKey(key.seed, key.step + ahead, key.name, key.layout, key.std)\n"
          "        return noisy_weight(backend, target, nxt, dtype)"),
         ("flatlora_dist/functional.py",
          "gx = grad @ ctx.make(grad.dtype)",
          "gx = grad @ ctx.make(grad.dtype, 1)")),
    ),
    Mutant(
        "global_offset_off_by_one",
        "a shard's global start off by one (FSDP2 region)",
        (("flatlora_dist/shards/fsdp2.py",
          "return [Region(piece.local, piece.covers[e.geo.me][0])]",
          "return [Region(piece.local, piece.covers[e.geo.me][0] + 1)]"),),
    ),
    Mutant(
        "whole_value_fixups_skipped",
        "restore skips the whole-value fix-ups (only the 16-bit xors are applied)",
        (("flatlora_dist/inplace.py",
          "        t[li] = values.to(t.device)",
          "        pass"),),
    ),
    Mutant(
        "cosine_ramp_off_by_one",
        "the cosine ramp evaluated at step+1 (factor(0) > 0)",
        (("flatlora_dist/schedule.py",
          "t = min(step, total_steps) / total_steps",
          "t = min(step + 1, total_steps) / total_steps"),),
    ),
    Mutant(
        "sigma_applied_twice",
        "noise strength multiplied by sigma twice",
        (("flatlora_dist/engine.py",
          "amp = factor * cfg.sigma",
          "amp = factor * cfg.sigma * cfg.sigma"),),
    ),
    Mutant(
        "noise_left_in_for_saves",
        "the app's saves run with the noise still in the base weights (clean_base does nothing)",
        (("flatlora_dist/hf.py",
          "if flat is None or not flat.is_perturbed:\n            yield",
          "if True:\n            yield"),),
    ),
    Mutant(
        "norm_reduction_over_world",
        "row norms all-reduced over the world instead of the shard group (HSDP replicas counted twice)",
        (("flatlora_dist/norms.py",
          "dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)",
          "dist.all_reduce(buffer, op=dist.ReduceOp.SUM)"),),
    ),
    Mutant(
        "out_axis_ignored_in_scale",
        "scale_ treats every layout as out_axis 0 (fan_in_fan_out layers get row, not column, stds)",
        (("flatlora_dist/layout.py",
          "            if self.out_axis == 0:\n                piece.view(nrows, ncols).mul_(",
          "            if True:\n                piece.view(nrows, ncols).mul_("),),
    ),
    Mutant(
        "fixups_keyed_by_local_index",
        "fix-ups recorded by region-local instead of global index (patched at the wrong element)",
        (("flatlora_dist/inplace.py",
          "records.append(_records(bad, bw, bb, w, lo))",
          "records.append(_records(bad, bw, bb, w, lo - region.start))"),),
    ),
    Mutant(
        "sqrt_of_out_features",
        "std divided by sqrt(out_features) instead of sqrt(in_features)",
        (("flatlora_dist/engine.py",
          "float(t.layout.in_features)",
          "float(t.layout.out_features)"),),
    ),
    Mutant(
        "norms_without_lora_delta",
        "row norms of W alone instead of W + s·B·A",
        (("flatlora_dist/norms.py",
          "x = values.float() + layout.delta_slice(factors, start, start + n)",
          "x = values.float()"),),
    ),
    Mutant(
        "norm_buffer_offsets_not_advanced",
        "every layer's norms land in the same slice of the flat norm buffer",
        (("flatlora_dist/targets.py",
          "        offset += m",
          "        offset += 0"),),
    ),
    Mutant(
        "wide_xor_truncated",
        "fix-ups whose bit difference reaches past 16 bits kept as a truncated xor, not the whole value",
        (("flatlora_dist/inplace.py",
          "if wide is not None and bool(wide.any()):",
          "if False:"),),
    ),
    Mutant(
        "fingerprint_hashes_a_prefix",
        "the base-weight fingerprint hashes only the first bytes of each weight",
        (("flatlora_dist/checkpoint.py",
          "h.update(t.view(torch.uint8).numpy().tobytes())",
          "h.update(t.view(torch.uint8).numpy().tobytes()[:256])"),),
    ),
    Mutant(
        "resume_noise_check_skipped",
        "--resume accepts other noise settings than the checkpoint's",
        (("flatlora_dist/train/preflight.py",
          "            check_resume_noise(ckpt, cfg, noise_scheme)\n",
          "            pass\n"),),
    ),
    Mutant(
        "native_fixups_keyed_by_local_index",
        "the fused CPU pass records fix-ups by region-local index (its chunk start without the region's)",
        (("flatlora_dist/roundtrip.py",
          "rc = lib.flatlora_perturb(code, _ptr(w), _ptr(z), _ptr(std), n, lo, layout.cols",
          "rc = lib.flatlora_perturb(code, _ptr(w), _ptr(z), _ptr(std), n, off, layout.cols"),),
    ),
    Mutant(
        "native_wide_xor_truncated",
        "the C kernel keeps xors up to 24 bits as 16-bit records (the whole value is lost)",
        (("flatlora_dist/native/roundtrip.c",
          "if (wide_ok && (x[j] >> 16)) {",
          "if (wide_ok && (x[j] >> 24)) {"),),
    ),
    Mutant(
        "native_bf16_rounds_down",
        "the C kernel truncates float32 to bfloat16 instead of rounding to nearest even",
        (("flatlora_dist/native/storage.h",
          "return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);",
          "return (uint16_t)(u >> 16);"),),
    ),
    Mutant(
        "native_norm_chunks_at_target_start",
        "each chunk's partial row sums are added at the target's first row instead of the chunk's",
        (("flatlora_dist/norms.py",
          "out[first_row : first_row + part.numel()] += part",
          "out[: part.numel()] += part"),),
    ),
    Mutant(
        "native_norm_scaling_dropped",
        "the C row-norm kernel adds B.A without the adapter scaling s",
        (("flatlora_dist/native/row_sumsq.c",
          "vec v = vload(x + j) + s * d;",
          "vec v = vload(x + j) + d;"),),
    ),
    Mutant(
        "failed_stream_not_undone",
        "a perturbation failing mid-stream leaves the chunks already written carrying noise",
        (("flatlora_dist/inplace.py",
          "        restore_regions(written, native)\n        raise",
          "        raise"),),
    ),
]  # fmt: skip
