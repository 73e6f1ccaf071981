"""B4 memory stays flat: uploading a 100 MB file grows the API (its gunicorn worker) by at most
50 MB; assembling the files of a 50,000-line batch grows the control worker by at most 100 MB.
RSS of the processes themselves, sampled with psutil.

The batch has ~1.2 KB prompts, which the echo model returns, so its output file is large
(tens of MB) and a non-streaming assembly would show. It runs on local storage, then on S3 (a
moto server beside the stack), where the upload and the assembly are multipart uploads.
"""

from __future__ import annotations

import time

from benchmarks.b3_validation import measured, warm_up
from benchmarks.common import Options
from benchmarks.harness import (
    STORAGE_KINDS,
    BatchSampler,
    BenchStack,
    RssSampler,
    create_batch,
    download,
    get_batch,
    running,
    storage_for,
    storage_label,
    upload_file,
)
from benchmarks.inputs import write_jsonl
from benchmarks.profiling import profiled, summarize
from benchmarks.report import Section, fmt_mib, fmt_s

MODEL = "demo-echo"
UPLOAD_TARGET = 50 << 20
ASSEMBLY_TARGET = 100 << 20


def run(opts: Options) -> list[Section]:
    return [_run(opts, kind) for kind in STORAGE_KINDS]


def _run(opts: Options, kind: str) -> Section:
    up_lines = opts.size(50_000, 5_000)
    up_line_bytes = 2_000
    batch_lines = opts.size(50_000, 3_000)
    batch_line_bytes = 1_200
    max_s = 1800.0 if not opts.quick else 300.0
    section = Section(storage_label("B4", kind), "memory stays flat")
    stack = BenchStack(f"b4-{kind}", keep=opts.keep)
    with storage_for(stack, kind), running(stack):
        stack.start_redis()
        api = stack.start_api()
        creds = stack.create_project("bench-b4")
        warm_up(stack, creds)

        # -- 1. a 100 MB upload
        up = stack.root / "b4-upload.jsonl"
        up_size = write_jsonl(up, up_lines, MODEL, line_bytes=up_line_bytes, prefix="b4u")
        _, up_s, up_rss, up_base, up_all = measured(api, lambda: upload_file(stack, creds, up))
        up.unlink()

        # -- 2. assembling a 50,000-line batch
        control = stack.start_control()
        stack.start_worker()
        stack.start_beat()
        path = stack.root / "b4-batch.jsonl"
        size = write_jsonl(path, batch_lines, MODEL, line_bytes=batch_line_bytes, prefix="b4b")
        file_id = upload_file(stack, creds, path)["id"]
        rss = RssSampler({"control": control.service_pid}, interval=0.05, max_s=max_s)
        rss.start()
        t0 = time.monotonic()
        with profiled(
            opts.profile, control.service_pid, opts.profile_dir / "b4-control.pyspy.txt", max_s
        ) as prof:
            batch = create_batch(stack, creds, file_id)
            sampler = BatchSampler.follow(stack.redis, batch["id"], MODEL, max_s)
        rss.stop()
        final = get_batch(stack, creds, batch["id"])
        out_bytes, out_lines = download(stack, creds, final["output_file_id"])

    s_all = sampler.first(lambda s: s.total > 0 and s.recorded >= s.total)
    s_done = sampler.first(lambda s: s.status in BatchSampler.TERMINAL)
    if s_all is None or s_done is None:
        raise RuntimeError(f"batch did not finish: {final['status']}")
    at_start = rss.at("control", s_all.t)
    peak = rss.peak("control", since=s_all.t)
    growth = peak - at_start
    base = rss.samples[0][1]["control"]
    overall = rss.peak("control") - base

    section.check(
        f"API worker RSS growth, {up_size / 1e6:.0f} MB upload",
        fmt_mib(up_rss),
        f"<= {fmt_mib(UPLOAD_TARGET)}",
        up_rss <= UPLOAD_TARGET,
    )
    section.info(
        "  per gunicorn worker (baseline of the largest); upload time",
        ", ".join(fmt_mib(v) for v in up_all.values())
        + f" (base {fmt_mib(up_base)}); {fmt_s(up_s)}",
    )
    section.check(
        f"control worker RSS growth, assembling {batch_lines:,} lines",
        fmt_mib(growth),
        f"<= {fmt_mib(ASSEMBLY_TARGET)}",
        growth <= ASSEMBLY_TARGET,
    )
    section.info(
        "  control RSS: before the batch / at assembly start / peak in assembly",
        f"{fmt_mib(base)} / {fmt_mib(at_start)} / {fmt_mib(peak)}",
    )
    section.info("  control RSS growth over the whole batch (its start included)", fmt_mib(overall))
    section.info(
        "batch",
        f"{batch_lines:,} lines, {size / 1e6:.1f} MB in, "
        f"{out_bytes / 1e6:.1f} MB / {out_lines:,} lines out; {final['status']}; "
        f"assembly took {fmt_s(s_done.t - s_all.t)} (batch {fmt_s(s_done.t - t0)})",
    )
    section.note(
        "assembly = from the first 20 Hz sample with every line recorded to the "
        "first with `completed`; RSS sampled every 50 ms"
    )
    for line in summarize(prof):
        section.note(f"py-spy control worker: {line}")
    return section
