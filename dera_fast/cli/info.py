"""``dera_fast info``: versions, build info, backends (and why the others cannot run) and GPU."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, build info, backends and GPU")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from dera_fast import backends

    info = backends.info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    build = info["build"] or {}
    if info["triton"] is None:
        triton = "not installed"
    elif info["triton_usable"]:
        triton = info["triton"] + (" (TRITON_INTERPRET=1)" if info["triton_interpret"] else "")
    else:
        triton = f"BROKEN: {info['triton_error']}"
    rows = [
        ("dera_fast", f"{info['dera_fast']} (git {build.get('git_sha', '?')})"),
        ("python", info["python"]),
        ("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none'})"),
        ("GPU", f"{info['gpu']} (sm_{(info['gpu_capability'] or '').replace('.', '')})" if info["gpu"] else "none"),
        ("triton", triton),
        ("extension", "loaded" if info["extension_loaded"] else f"not loaded: {info['extension_error']}"),
        ("  built", f"{build.get('ext_kind', '?')} for torch {build.get('torch_version')} "
                    f"(CUDA {build.get('torch_cuda') or 'none'}, arch {build.get('cuda_arch_list') or '-'}) "
                    f"at {build.get('built_at', '?')}"),
        ("  ops", ", ".join(f"{k}[{'/'.join(v)}]" for k, v in info["extension_ops"].items()) or "none"),
        ("  cpu vq_nearest", {"amx": "amx (AVX-512 tile + AMX-BF16 screening pass)"}.get(
            info["cpu_kernel_isa"], info["cpu_kernel_isa"] or "-")),
        ("backends (cpu)", ", ".join(info["backends_cpu"])),
        ("backends (cuda)", ", ".join(info["backends_cuda"]) or "no CUDA device"),
        *[(f"  not on {dev}", f"{name}: {why}") for dev, reasons in info["unavailable"].items()
          for name, why in reasons.items()],
        ("DERA_FAST_BACKEND", info["env_backend"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
