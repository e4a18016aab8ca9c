"""Pickle-free copies of alignment-teacher checkpoints (``python -m dera_fast convert-teacher``).

The input (an official ``.pth`` / ``.bin`` read with ``torch.load(weights_only=True)``, an HF / official
safetensors file, or a directory holding one) is loaded into its dera_fast teacher, which checks every key and
shape, and that teacher's state dict is written as safetensors with the preset name and the full config in the
metadata. The copy loads with ``load_image_teacher(path)`` / ``load_video_teacher(path)`` without naming the preset
and gives the same features as the original.
"""
from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from dera_fast._files import check_output, write_file
from dera_fast.models.teachers.loading import IMAGE_TEACHERS, VIDEO_TEACHERS, build_teacher, detect_arch
from dera_fast.models.teachers.weights import (META_ARCH, META_CLASS, META_CONFIG, META_FORMAT, TEACHER_FORMAT,
                                               config_to_json, read_state_dict, resolve_weights_file)


def convert_teacher(src: str | os.PathLike, dst: str | os.PathLike, *, arch: str | None = None,
                    overwrite: bool = False, **config_overrides) -> dict:
    """Convert ``src`` to the safetensors file ``dst`` (written atomically); returns a summary dict.

    Args:
        src: weight file or directory (see ``dera_fast.models.teachers.weights``).
        dst: output ``.safetensors`` path; never the input, and an existing file only with ``overwrite``.
        arch: teacher preset (``internvideo2-b14``, ``dinov3-b16``, ...); None detects it from the keys.
        **config_overrides: config fields for non-preset sizes (``dim``, ``depth``, ``heads``, ...).
    Raises:
        ValueError: bad paths, unknown preset, undetectable family, or keys / shapes that do not match.
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
    """
    src_file = resolve_weights_file(src)
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"output {dst} must be a .safetensors file")
    if dst.resolve() in (src_file.resolve(), Path(src).resolve()):
        raise ValueError(f"output {dst} is the input: write the copy elsewhere")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass --overwrite to replace it)")
    check_output(dst, inputs=[src, src_file], overwrite=True)  # same inode, folders, devices / FIFOs, ...
    state, meta = read_state_dict(src_file)
    name = arch or (meta.get(META_ARCH) if meta.get(META_FORMAT) == TEACHER_FORMAT else None) or detect_arch(state)
    if name not in IMAGE_TEACHERS and name not in VIDEO_TEACHERS:
        raise ValueError(f"unknown teacher preset {name!r}; available: {sorted({**IMAGE_TEACHERS, **VIDEO_TEACHERS})}")
    image = name in IMAGE_TEACHERS
    teacher = build_teacher(state, name, table=IMAGE_TEACHERS if image else VIDEO_TEACHERS,
                            kind="image" if image else "video", meta=meta, source=str(src_file), **config_overrides)
    tensors = {k: v.detach().contiguous() for k, v in teacher.state_dict().items()}
    from dera_fast import __version__

    metadata = {"format": "pt", META_FORMAT: TEACHER_FORMAT, META_ARCH: name,
                META_CLASS: type(teacher.config).__name__, META_CONFIG: config_to_json(teacher.config),
                "dera_fast.version": __version__, "dera_fast.source": src_file.name}
    write_file(dst, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))  # atomic
    return {"arch": name, "teacher": type(teacher).__name__, "tensors": len(tensors),
            "parameters": sum(v.numel() for v in tensors.values()), "source_tensors": len(state), "output": str(dst)}
