"""S3 save/load throughput: stashpoint against plain boto3 multipart transfers, one server, one run.

Both sides move the same bytes to the same bucket with the same part size and
concurrency: boto3's ``upload_fileobj`` / ``download_fileobj`` (its TransferManager:
parallel multipart upload, parallel ranged download) is the raw transfer baseline.

    python benchmarks/s3_bench.py [--gib 1] [--repeat 3] [--out benchmarks/results/s3-rgw.json]

The server is the one ``scripts/s3-server start`` runs (its state file), or any S3
endpoint given by ``STASHPOINT_TEST_S3_ENDPOINT`` / ``_ACCESS_KEY`` / ``_SECRET_KEY``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
import uuid

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import s3_server
import stashpoint
from stashpoint.storage import resolve

MiB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="checkpoint size")
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--part-mib", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    server = s3_server.find()
    if isinstance(server, str):
        sys.exit(f"no S3 server: {server}")
    os.environ.update(server.env)
    client = server.client()
    client.create_bucket(Bucket=server.bucket)

    total = int(args.gib * (1 << 30)) // args.tensors // 4 * 4 * args.tensors
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(total // args.tensors // 4, generator=g) for i in range(args.tensors)}
    blob = b"".join(t.numpy().tobytes() for t in state.values())  # the same bytes, as one object
    opts = f"part_size={args.part_mib}MiB&concurrency={args.concurrency}"

    from boto3.s3.transfer import TransferConfig

    tc = TransferConfig(
        multipart_threshold=args.part_mib * MiB,
        multipart_chunksize=args.part_mib * MiB,
        max_concurrency=args.concurrency,
        use_threads=True,
    )

    def sp_save(url: str) -> None:
        stashpoint.save(state, url)

    def sp_load(url: str) -> None:
        target = {k: torch.empty_like(v) for k, v in state.items()}
        stashpoint.load(target, url)

    def raw_save(key: str) -> None:
        client.upload_fileobj(io.BytesIO(blob), server.bucket, key, Config=tc)

    def raw_load(key: str) -> None:
        out = io.BytesIO()
        client.download_fileobj(server.bucket, key, out, Config=tc)
        assert out.getbuffer().nbytes == len(blob)

    names = ("stashpoint_save", "stashpoint_load", "boto3_save", "boto3_load")
    results: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(args.repeat):
        run = uuid.uuid4().hex[:8]
        url = f"s3://{server.bucket}/bench-{run}/ckpt?{opts}"
        key = f"bench-{run}/raw.bin"
        # alternate the order so neither side always runs on a warmer server
        pairs = [("boto3", raw_save, raw_load, key), ("stashpoint", sp_save, sp_load, url)]
        for name, save, load, where in pairs if rep % 2 == 0 else reversed(pairs):
            for kind, fn in (("save", save), ("load", load)):
                t0 = time.perf_counter()
                fn(where)
                results[f"{name}_{kind}"].append(len(blob) / (time.perf_counter() - t0) / 1e9)
        storage, path = resolve(url)
        storage.delete(path)
        client.delete_object(Bucket=server.bucket, Key=key)
        time.sleep(3)  # let the gateway's garbage collector reclaim the memstore

    best = {k: max(v) for k, v in results.items()}
    report = {
        "bytes": len(blob),
        "tensors": args.tensors,
        "part_size_mib": args.part_mib,
        "concurrency": args.concurrency,
        "repeat": args.repeat,
        "server": "Ceph 16 RADOS Gateway, single memstore OSD, loopback (scripts/s3-server)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "gb_per_s": results,
        "best_gb_per_s": best,
        "ratio_save": best["stashpoint_save"] / best["boto3_save"],
        "ratio_load": best["stashpoint_load"] / best["boto3_load"],
    }
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    try:
        resolve(f"s3://{server.bucket}")[0].delete("")
        client.delete_bucket(Bucket=server.bucket)
    except Exception:
        pass
    s3_server.stop(server)


if __name__ == "__main__":
    main()
