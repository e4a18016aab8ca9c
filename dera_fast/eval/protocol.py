"""What makes two evaluation numbers comparable: the protocol record, provenance, atomic result files, compare.

A result file is JSON ``{"kind", "format_version", "metrics", "protocol", "throughput", "models", "real_stats"}``.
``protocol`` holds every setting that changes the numbers (dataset digest, clips, extractor digest, seed, CFG, ...)
plus, as :data:`INFORMATIONAL` fields, the world size, batch size and package version / git sha that produced it:
these change results only by float round-off (or not at all), so :func:`compare_results` lists them but does not
refuse on them unless ``strict``.
"""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
from pathlib import Path

FORMAT_VERSION = 1
RESULT_KINDS = ("dera_fast.eval/tokenizer", "dera_fast.eval/generator")

# Fields of `protocol` that differ between runs of one protocol without changing what is measured (the data and the
# extractor are identified by their digests; paths and file names may differ between machines).
INFORMATIONAL = ("world_size", "batch_size", "package_version", "git_sha", "device", "compile", "dataset",
                 "dataset_root", "extractor")
# Protocols of optional metrics: null on one side means "not computed" (the metric is simply absent from it).
OPTIONAL = ("lpips",)

# The clip each video contributes, as the dataset (VideoFolderDataset, train=False) takes it.
CLIP_SAMPLING = ("`frames` consecutive frames from a uniformly random start drawn from (seed, video index), native "
                 "frame rate, short side resized to `size` then centre crop, no flip; shorter videos padded by "
                 "repeating their last frame")
PSNR_DEF = "mean over videos of -10 log10(per-video MSE) on [0, 1] pixels, reconstruction clamped to [0, 1]"
SSIM_DEF = "per frame, 11-px Gaussian window (sigma 1.5), valid borders, data_range 1 on [0, 1]; mean over videos"
FVD_DEF = ("Frechet distance of Gaussian fits (float64, population covariance) to I3D features of "
           "i3d(2 x - 1, rescale=False, resize=True, return_features=True) on [0, 1] clips; TF-GAN symmetric "
           "square roots (eps 1e-10)")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dataset_record(source, root, dataset) -> dict:
    """Path, kind and digest of an evaluation set.

    CSV: sha256 of the CSV bytes (the split file defines the set). Folder: sha256 over the sorted relative paths
    and byte sizes of the videos the dataset found (cheap; a re-encoded video of equal size is not detected).
    """
    src = Path(source).resolve()
    if src.suffix.lower() == ".csv":
        kind, digest = "csv", sha256_bytes(src.read_bytes())
    else:
        paths = getattr(dataset, "paths", None)
        files = sorted(Path(p) for p in paths) if paths is not None else sorted(p for p in src.rglob("*")
                                                                               if p.is_file())
        h = hashlib.sha256()
        for p in files:
            rel = p.resolve().relative_to(src) if p.resolve().is_relative_to(src) else p
            h.update(f"{rel.as_posix()}\t{p.stat().st_size}\n".encode())
        kind, digest = "folder", h.hexdigest()
    return {"dataset": str(src), "dataset_kind": kind, "dataset_digest": f"sha256:{digest}",
            "dataset_root": None if root is None else str(Path(root).resolve()), "split": src.stem,
            "dataset_videos": len(dataset)}


def git_sha() -> str:
    """The checkout's ``HEAD`` (with ``-dirty`` when tracked files changed) for a source install, else the sha
    recorded at build time, else ``"unknown"``."""
    here = Path(__file__).resolve().parents[2]
    if (here / ".git").exists():
        try:
            sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=here, text=True,
                                          stderr=subprocess.DEVNULL).strip()
            dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=here,
                                   stderr=subprocess.DEVNULL).returncode != 0
            return sha + ("-dirty" if dirty else "")
        except (OSError, subprocess.CalledProcessError):
            pass
    from dera_fast._ext import BUILD_INFO  # the build record setup.py writes next to the extension

    return f"{BUILD_INFO['git_sha']} (build)" if BUILD_INFO else "unknown"


def provenance(info, batch_size: int) -> dict:
    from dera_fast import __version__

    return {"world_size": info.world_size, "batch_size": int(batch_size), "package_version": __version__,
            "git_sha": git_sha(), "device": info.device.type}


def model_record(path, model) -> dict:
    """Identity of a model: its folder and the sha256 of its weights file (or of its in-memory state dict)."""
    from dera_fast.metrics import sha256_file, sha256_module

    rec: dict = {"class": type(model).__name__}
    weights = None
    if path is not None:
        p = Path(path)
        weights = p if p.is_file() else p / "model.safetensors"
        rec["path"] = str(p.resolve())
    if weights is not None and weights.is_file():
        rec["weights_sha256"] = sha256_file(weights)
    else:
        rec["state_sha256"] = sha256_module(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        rec["config"] = config.to_dict()
    return rec


def _finite(obj):
    """JSON has no inf / nan: such floats become None (a perfect reconstruction has PSNR = inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(path, obj) -> None:
    """Write JSON atomically (:func:`dera_fast._files.write_text`: temporary file, fsync, ``os.replace``)."""
    from dera_fast._files import write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(_finite(obj), indent=2, sort_keys=False) + "\n")


def load_result(path) -> dict:
    """Read a result file written by ``eval tokenizer`` / ``eval generator`` (ValueError when it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"result file not found: {path}")
    try:
        res = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(res, dict) or res.get("kind") not in RESULT_KINDS or not isinstance(res.get("protocol"), dict):
        raise ValueError(f"{path} is not a dera_fast eval result (no kind/protocol)")
    return res


def protocol_differences(a: dict, b: dict) -> tuple[list[str], list[str]]:
    """(defining keys that differ, informational keys that differ), sorted; a key missing on one side differs,
    except an :data:`OPTIONAL` metric's protocol that is null on one side (that metric was not computed there)."""
    keys = sorted(set(a) | set(b))
    diff = [k for k in keys if a.get(k, "<missing>") != b.get(k, "<missing>")
            and not (k in OPTIONAL and (a.get(k) is None or b.get(k) is None))]
    return [k for k in diff if k not in INFORMATIONAL], [k for k in diff if k in INFORMATIONAL]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}" if abs(v) < 1e6 else f"{v:.4e}"
    return str(v)


def _short(v, width: int = 48) -> str:
    s = json.dumps(v) if isinstance(v, (dict, list)) else _fmt(v)
    return s if len(s) <= width else s[: width - 3] + "..."


def compare_results(a: dict, b: dict, *, names=("a", "b"), strict: bool = False) -> str:
    """A side-by-side table of two results' metrics (with b - a), or ValueError when they are not comparable:
    different kinds, or protocols that differ in a defining field (any field when ``strict``)."""
    if a.get("kind") != b.get("kind"):
        raise ValueError(f"{names[0]} is a {a.get('kind')} result and {names[1]} a {b.get('kind')} result")
    defining, info = protocol_differences(a["protocol"], b["protocol"])
    refused = defining + (info if strict else [])
    if refused:
        parts = [f"{k} ({_short(a['protocol'].get(k, '<missing>'), 24)} vs "
                 f"{_short(b['protocol'].get(k, '<missing>'), 24)})" for k in refused]
        raise ValueError(f"{names[0]} and {names[1]} were computed under different protocols: " + "; ".join(parts))
    ma, mb = a.get("metrics", {}), b.get("metrics", {})
    rows = [("metric", names[0], names[1], "b - a")]
    for k in list(ma) + [k for k in mb if k not in ma]:
        va, vb = ma.get(k), mb.get(k)
        delta = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
        rows.append((k, _fmt(va), _fmt(vb), "" if delta is None else f"{delta:+.6g}"))
    for label, key in (("model", "models"),):
        ra, rb = a.get(key, {}), b.get(key, {})
        for role in sorted(set(ra) | set(rb)):
            rows.append((f"{label}:{role}", _short(ra.get(role, {}).get("path", "-"), 40),
                         _short(rb.get(role, {}).get("path", "-"), 40), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    p = a["protocol"]
    lines.append("")
    lines.append(f"protocol: {p.get('task')} on {p.get('split')} ({p.get('dataset_digest', '')[:19]}), "
                 f"{p.get('num_videos')} clips of {p.get('frames')}x{p.get('size')}x{p.get('size')}, "
                 f"seed {p.get('seed')}, extractor {p.get('extractor')} ({str(p.get('extractor_sha256'))[:12]})")
    for k in info:
        lines.append(f"note: {k} differs ({_short(a['protocol'].get(k))} vs {_short(b['protocol'].get(k))}); "
                     f"informational only")
    return "\n".join(lines)
