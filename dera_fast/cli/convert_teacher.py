"""``dera_fast convert-teacher IN OUT.safetensors``: a pickle-free, self-describing copy of a teacher checkpoint."""
from __future__ import annotations

from ._common import CLIError, parse_set


def add_parser(sub) -> None:
    p = sub.add_parser("convert-teacher", help="convert a DINOv2/v3, InternVideo2 or VideoMAE checkpoint to "
                                               "safetensors (config inside)")
    p.add_argument("input", help="official .pth / .bin (read with weights_only=True), safetensors, or a folder")
    p.add_argument("output", help="OUT.safetensors (written atomically; never the input)")
    p.add_argument("--arch", default=None, help="teacher preset (internvideo2-s14/b14/l14, videomae-b, dinov2-b14, "
                                                "dinov2-b14-reg, dinov3-b16); default: detected from the keys")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (JSON value)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def run(args) -> int:
    from dera_fast.convert.teacher import convert_teacher

    overrides = parse_set(args.set)
    try:
        info = convert_teacher(args.input, args.output, arch=args.arch, overwrite=args.overwrite, **overrides)
    except FileExistsError as e:
        raise CLIError(str(e)) from None
    except TypeError as e:  # a --set value of the wrong type reaching the config's checks
        raise CLIError(f"--set: {e}") from None
    print(f"wrote {info['output']}: {info['arch']} ({info['teacher']}), {info['tensors']} tensors, "
          f"{info['parameters'] / 1e6:.2f}M values, from {info['source_tensors']} source tensors")
    return 0
