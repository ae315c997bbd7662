"""A site's last released update, kept so that a round asked again is answered with the same
update instead of a second training run (and a second privacy spend).

Privacy: a site's spend is recorded in its ledger *before* its update leaves
(``fedllm.site.runtime.SiteRuntime.train_round``). Re-sending an update that was already released is
post-processing of a released output and costs nothing extra. When the coordinator dies
mid-round and resumes, it asks the sites for that round again with the same global adapter; a
site that already trained and released that round finds its release here and sends it again.
Anything else (another run, another round, another global adapter, a damaged file) is a miss:
the site trains again and pays again, which is safe.

The cache is the site's own file and never leaves the site; it is exactly as sensitive as the
update that was already sent (written owner-only, 0600, by ``files.write_bytes_atomic``). It
holds only the **last** release: ``FOLDER/<site>.release.safetensors`` (a name outside the one site-name
rule, ``fedllm.config.SITE_NAME_RE``, is replaced by a hash of it) with the adapter tensors
and, as safetensors metadata, the run id, round, the digest of the global adapter the site was
sent (``input-digest``), the metrics, the ledger's entry count after the release, the digest of
the adapter tensors, and a sha256 over all of that (the file's own hash).

Order at the site: ledger record → :meth:`ReleaseCache.store` → send. A crash between the first
two leaves no cache entry (the site pays again: safe); storing before the ledger record could
re-send an update whose spend was never recorded, so never do that.

torch + safetensors; no flwr.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedllm.config import SITE_NAME_RE
from fedllm.files import write_bytes_atomic

log = logging.getLogger(__name__)

FORMAT = "fedllm-release-cache/1"


def adapter_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 (hex) over the tensors in sorted key order: each key, dtype, shape and raw bytes
    (length-prefixed, so no two different states share a digest by concatenation). Equal only
    for bit-identical tensors with the same names, dtypes and shapes."""
    h = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        name = key.encode("utf-8")
        header = f"{len(name)}:".encode() + name + f"|{tensor.dtype}|{tuple(tensor.shape)}|{len(raw)}\n".encode()
        h.update(header)
        h.update(raw)
    return h.hexdigest()


@dataclass(frozen=True)
class CachedRelease:
    """A release found in the cache: send ``adapter`` and ``metrics`` again, unchanged.
    ``ledger_entries`` is the count the site's ledger had right after recording it."""

    run_id: str
    server_round: int
    input_digest: str
    adapter: dict[str, torch.Tensor]
    metrics: dict[str, float | int]
    ledger_entries: int


class ReleaseCache:
    """One site's last release, in ``folder`` (created on the first store)."""

    def __init__(self, folder: Path, *, site: str) -> None:
        self.folder = Path(folder)
        self.site = site
        stem = site if SITE_NAME_RE.fullmatch(site) else "site-" + hashlib.sha256(site.encode("utf-8")).hexdigest()[:16]
        self.path = self.folder / f"{stem}.release.safetensors"

    def store(self, *, run_id: str, server_round: int, input_digest: str, adapter: dict[str, torch.Tensor],
              metrics: dict[str, float | int], ledger_entries: int) -> None:
        """Replace the cached release with this one, atomically (a crash leaves the previous
        release or this one). Call it after the ledger recorded the release, before sending.
        Metrics must be finite ints/floats (``TypeError``/``ValueError`` otherwise)."""
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"metric {key!r} = {value!r} is not a number")
            if not math.isfinite(value):
                raise ValueError(f"metric {key!r} = {value!r} is not a finite number")
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter.items()}
        meta = {
            "format": FORMAT,
            "site": self.site,
            "run-id": str(run_id),
            "server-round": str(int(server_round)),
            "input-digest": str(input_digest),
            "metrics": json.dumps(metrics, sort_keys=True, allow_nan=False),
            "ledger-entries": str(int(ledger_entries)),
            "adapter-digest": adapter_digest(tensors),
            "keys": json.dumps(list(tensors)),  # the order the site sent them in
        }
        meta["digest"] = _meta_digest(meta)
        write_bytes_atomic(self.path, save_tensors(tensors, metadata=meta))

    def lookup(self, *, run_id: str, server_round: int, input_digest: str) -> CachedRelease | None:
        """The cached release when it is for this run, this round and this global adapter
        (``input_digest``) and the file checks out; else None. A damaged or foreign file is
        ignored with a warning (the site then trains and pays again), never raised."""
        if not self.path.is_file():
            return None
        try:
            blob = self.path.read_bytes()
            meta = _read_metadata(blob)
            if meta.get("format") != FORMAT or meta.get("site") != self.site:
                raise ValueError(f"not this site's release cache (format {meta.get('format')!r}, "
                                 f"site {meta.get('site')!r})")
            if meta.get("digest") != _meta_digest(meta):
                raise ValueError("its metadata does not match its own hash")
            loaded = load_tensors(blob)
            order = json.loads(meta["keys"])
            if sorted(order) != sorted(loaded):
                raise ValueError("its tensors are not the ones its metadata lists")
            adapter = {k: loaded[k] for k in order}
            if adapter_digest(adapter) != meta["adapter-digest"]:
                raise ValueError("its tensors do not match their hash")
            release = CachedRelease(run_id=meta["run-id"], server_round=int(meta["server-round"]),
                                    input_digest=meta["input-digest"], adapter=adapter,
                                    metrics=json.loads(meta["metrics"]), ledger_entries=int(meta["ledger-entries"]))
        except Exception as exc:
            log.warning("site %s: ignoring the release cache %s (%s: %s); the round is trained again and its "
                        "privacy spend recorded again", self.site, self.path, exc.__class__.__name__, exc)
            return None
        if (release.run_id, release.server_round, release.input_digest) != (str(run_id), int(server_round),
                                                                             str(input_digest)):
            log.debug("site %s: cached release is for run %s round %d, not run %s round %d (or another adapter)",
                      self.site, release.run_id, release.server_round, run_id, server_round)
            return None
        return release


def _meta_digest(meta: dict[str, str]) -> str:
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def _read_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file held in memory (8-byte little-endian header
    length, then the JSON header)."""
    if len(blob) < 8:
        raise ValueError("file too short")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > len(blob) - 8:
        raise ValueError("header longer than the file")
    header = json.loads(blob[8:8 + size].decode("utf-8"))
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise TypeError("no metadata")
    return meta
