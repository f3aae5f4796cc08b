#!/usr/bin/env python3
"""Ingest benchmark: C-STORE throughput of ichnode against Orthanc and DCMTK storescp.

Generates N synthetic 512x512 int16 CT slices (one series), then for each
receiver -- ichnode (``ichnode serve``, fsync on), DCMTK ``storescp --fork``
and Orthanc (temporary configuration, fsync on) -- sends the same files with
DCMTK ``storescu`` over one association and over four concurrent
associations (four storescu processes, a quarter of the files each), timing
from the first storescu start to the last one's exit.  Each (receiver,
associations) run gets a fresh receiver, which must then hold all N
instances.  Prints slices/s and ichnode's ratio to each baseline measured in
the same run.

As root it re-runs itself inside a private network namespace (``unshare -n``,
``lo`` up) so that storescp and Orthanc, which bind every interface, are never
reachable from the network.  Without that (not root, no unshare, or
``--no-unshare``) it skips storescp and runs Orthanc with
``RemoteAccessAllowed: false``, and says so.

    benchmarks/ingest [--count 300] [--receivers ichnode,storescp,orthanc]
                      [--associations 1,4] [--repeat 1] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NETNS_MARK = "ICHNODE_BENCH_NETNS"
RECEIVERS = ("ichnode", "storescp", "orthanc")
BASELINES = ("storescp", "orthanc")


def _ensure_interpreter() -> None:
    """Re-run with the repository's virtual environment if this Python lacks pydicom."""
    try:
        import numpy  # noqa: F401
        import pydicom  # noqa: F401
        import pynetdicom  # noqa: F401
    except ImportError as exc:
        venv = REPO_ROOT / ".venv" / "bin" / "python"
        # Compare prefixes: the venv's python is a symlink to the system one.
        if venv.exists() and Path(sys.prefix).resolve() != (REPO_ROOT / ".venv").resolve():
            os.execv(str(venv), [str(venv), str(Path(__file__).resolve()), *sys.argv[1:]])
        sys.exit(f"{exc}: run with the node's environment (./.ci/run makes {venv}), or with a Python that has it")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- network namespace -------------------------------------------------------
def _interfaces() -> list[str]:
    """Interfaces of this process's network namespace (/proc, not /sys, is per-process)."""
    try:
        lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    except OSError:
        return []
    return [line.split(":", 1)[0].strip() for line in lines]


def in_private_netns() -> bool:
    return _interfaces() == ["lo"]


def enter_private_netns(args: argparse.Namespace) -> str | None:
    """Re-exec under ``unshare -n`` when possible; returns why not, or None if already inside."""
    if in_private_netns():
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return None
    if os.environ.get(NETNS_MARK):
        return "unshare -n did not give a private network namespace"
    if args.no_unshare:
        return "--no-unshare given"
    if os.geteuid() != 0:
        return "not root, so no unshare -n"
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if not unshare or not ip:
        return "unshare or ip is not installed"
    probe = subprocess.run([unshare, "-n", ip, "link", "set", "lo", "up"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare -n failed: {probe.stderr.decode(errors='replace').strip()}"
    env = dict(os.environ, **{NETNS_MARK: "1"})
    argv = [unshare, "-n", "--", sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(unshare, argv, env)
    raise AssertionError("unreachable")


# -- data --------------------------------------------------------------------
def generate_series(folder: Path, count: int, parts: int, seed: int = 0) -> list[Path]:
    """``count`` CT slices of one series, split round-robin into ``parts`` sub-folders.

    Returns the sub-folders; each holds about count/parts files.
    """
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    rng = np.random.default_rng(seed)
    size = 512
    yy, xx = np.mgrid[:size, :size]
    r2 = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (size * 0.42) ** 2
    head = np.where(r2 < 1.0, 40, -1000).astype(np.int16)  # brain-ish disc in air
    head[(r2 >= 0.88) & (r2 < 1.0)] = 1000  # skull
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    dirs = [folder / f"part{index}" for index in range(parts)]
    for path in dirs:
        path.mkdir(parents=True)
    for index in range(count):
        noise = rng.integers(-30, 31, size=(size, size), dtype=np.int16)
        hu = head + noise
        stored = (hu + 1024).astype(np.int16)  # RescaleIntercept -1024
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.PatientName = "BENCH^INGEST"
        ds.PatientID = "BENCH-INGEST"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = "BENCH1"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.Modality = "CT"
        ds.Manufacturer = "ichnode-benchmark"
        ds.SeriesNumber = 2
        ds.SeriesDescription = "HEAD AXIAL 5mm"
        ds.BodyPartExamined = "HEAD"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [-125.0, -125.0, float(index) * 0.625]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness = 0.625
        ds.PixelSpacing = [0.488, 0.488]
        ds.KVP = 120
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 80
        ds.PixelData = stored.tobytes()
        ds.save_as(dirs[index % parts] / f"CT{index:05d}.dcm", enforce_file_format=True)
    return dirs


# -- sending -----------------------------------------------------------------
@dataclass
class Run:
    receiver: str
    associations: int
    count: int
    seconds: float | None = None
    received: int | None = None
    receiver_cpu_s: float | None = None
    error: str | None = None

    @property
    def rate(self) -> float | None:
        if self.seconds is None or self.error:
            return None
        return self.count / self.seconds


def send(storescu: str, host: str, port: int, called: str, dirs: list[Path], associations: int, timeout: float, logdir: Path) -> float:
    """Send every file in ``dirs`` with ``associations`` storescu processes; wall seconds.

    One process per group of folders, all started together; the clock stops
    when the last one exits.  Raises if any fails or the timeout passes.
    """
    groups = [dirs[i::associations] for i in range(associations)]
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    env = dict(os.environ, TCP_NODELAY="1")
    start = time.perf_counter()
    try:
        for index, group in enumerate(groups):
            log_path = logdir / f"storescu-{called}-{associations}-{index}.log"
            argv = [storescu, "-aet", "BENCHSCU", "-aec", called, "-R", "+sd", "-ts", "60", host, str(port), *map(str, group)]
            handle = open(log_path, "wb")
            procs.append((subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, env=env), log_path))
            handle.close()
        deadline = start + timeout
        for proc, _ in procs:
            proc.wait(max(0.1, deadline - time.perf_counter()))
        elapsed = time.perf_counter() - start
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"storescu did not finish within {timeout:.0f} s") from None
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    for proc, log_path in procs:
        if proc.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-5:])
            raise RuntimeError(f"storescu exited with {proc.returncode}: {tail}")
    return elapsed


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def run_one(receiver: str, associations: int, dirs: list[Path], count: int, work: Path, args: argparse.Namespace, storescu: str) -> Run:
    from tests import peers

    run = Run(receiver, associations, count)
    workdir = Path(tempfile.mkdtemp(prefix=f"{receiver}-{associations}-", dir=work))
    timeout = max(60.0, count / 5.0)
    try:
        with contextlib.ExitStack() as stack:
            if receiver == "ichnode":
                peer = stack.enter_context(
                    peers.IchnodeProcess(
                        workdir,
                        fsync=True,
                        stable_seconds=60.0,
                        log_level="WARNING",
                        components=args.ichnode_components.split(","),
                        config={"node": {"receiver_processes": args.receiver_processes}},
                    )
                )
                port, called = peer.port, peer.ae_title
            elif receiver == "storescp":
                peer = stack.enter_context(peers.StoreSCP(workdir, fork=True))
                port, called = peer.port, peer.aet
            elif receiver == "orthanc":
                peer = stack.enter_context(peers.Orthanc(workdir, aet="ORTHANC"))
                port, called = peer.dicom_port, peer.aet
            else:
                raise ValueError(f"unknown receiver {receiver!r}")
            cpu_before = _cpu_seconds(peer.pid)
            run.seconds = send(storescu, "127.0.0.1", port, called, dirs, associations, timeout, workdir)
            if receiver != "storescp":  # storescp's forked children are not reaped until it stops
                run.receiver_cpu_s = round(_cpu_seconds(peer.pid) - cpu_before, 3)
            if receiver == "ichnode":
                rows, files = peer.count_instances(), peer.count_spool_files()
                run.received = rows
                if rows != count or files != count:
                    run.error = f"ichnode holds {rows} rows and {files} spool files, expected {count}"
            elif receiver == "storescp":
                run.received = peer.count_files()
            else:
                run.received = peer.count_instances()
            if run.error is None and run.received != count:
                run.error = f"{receiver} holds {run.received} instances, expected {count}"
    except peers.ToolMissing as exc:
        run.error = f"skipped: {exc}"
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return run


# -- report ------------------------------------------------------------------
@dataclass
class Summary:
    receiver: str
    associations: int
    count: int
    runs: list[Run] = field(default_factory=list)

    @property
    def rate(self) -> float | None:
        rates = [r.rate for r in self.runs if r.rate is not None]
        return statistics.median(rates) if rates else None

    @property
    def error(self) -> str | None:
        errors = [r.error for r in self.runs if r.error]
        return errors[0] if errors else None


def ratios(summaries: dict[tuple[str, int], Summary]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for (receiver, assoc), summary in summaries.items():
        if receiver != "ichnode":
            continue
        for baseline in BASELINES:
            other = summaries.get((baseline, assoc))
            if summary.rate and other is not None and other.rate:
                out.setdefault(assoc, {})[baseline] = summary.rate / other.rate
    return out


def print_table(summaries: dict[tuple[str, int], Summary], notes: list[str]) -> None:
    rel = ratios(summaries)
    print(f"{'receiver':<10} {'assoc':>5} {'slices':>6} {'seconds':>8} {'slices/s':>9} {'cpu s':>6}  ichnode/receiver")
    for (receiver, assoc), summary in summaries.items():
        seconds = [r.seconds for r in summary.runs if r.seconds is not None and not r.error]
        cpu = [r.receiver_cpu_s for r in summary.runs if r.receiver_cpu_s is not None]
        ratio = ""
        if receiver in BASELINES and receiver in rel.get(assoc, {}):
            ratio = f"ichnode/{receiver} {rel[assoc][receiver]:.2f}x"
        if summary.rate is None:
            print(f"{receiver:<10} {assoc:>5} {summary.count:>6} {'-':>8} {'-':>9} {'-':>6}  {summary.error}")
            continue
        line = (
            f"{receiver:<10} {assoc:>5} {summary.count:>6} {statistics.median(seconds):>8.2f} "
            f"{summary.rate:>9.1f} {(f'{statistics.median(cpu):.1f}' if cpu else '-'):>6}  {ratio}"
        )
        if summary.error:
            line += f"  (a repeat failed: {summary.error})"
        print(line)
    for note in notes:
        print(f"note: {note}")


def _interrupt(signum: int, _frame: object) -> None:
    """SIGTERM cleans up like Ctrl-C does."""
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="slices to send (default 300)")
    parser.add_argument("--receivers", default=",".join(RECEIVERS), help="comma-separated subset of ichnode,storescp,orthanc")
    parser.add_argument("--associations", default="1,4", help="comma-separated association counts (default 1,4)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per receiver and association count; the median is shown")
    parser.add_argument(
        "--ichnode-components",
        default="receiver",
        help="ichnode serve --components (default: receiver; the worker would load the model)",
    )
    parser.add_argument(
        "--receiver-processes",
        type=int,
        default=1,
        help="ichnode node.receiver_processes (processes sharing the port; default 1)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    parser.add_argument("--no-unshare", action="store_true", help="do not enter a private network namespace")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where to put the temporary folder")
    args = parser.parse_args()
    if not 1 <= args.count <= 20000:
        parser.error(f"--count must be in 1..20000, got {args.count}")
    if not 1 <= args.repeat <= 5:
        parser.error(f"--repeat must be in 1..5, got {args.repeat}")
    receivers = [name.strip() for name in args.receivers.split(",") if name.strip()]
    for name in receivers:
        if name not in RECEIVERS:
            parser.error(f"unknown receiver {name!r}; choose from {', '.join(RECEIVERS)}")
    assoc_counts = [int(value) for value in args.associations.split(",")]
    if any(not 1 <= n <= 16 for n in assoc_counts) or math.lcm(*assoc_counts) > 64:
        parser.error("--associations values must be in 1..16 (and their LCM at most 64)")

    notes: list[str] = []
    why_not = enter_private_netns(args)
    if why_not is None:
        notes.append("ran inside a private network namespace (unshare -n, lo up)")
    else:
        notes.append(f"no private network namespace ({why_not}): storescp skipped, Orthanc with RemoteAccessAllowed false")
        if "storescp" in receivers:
            receivers.remove("storescp")

    signal.signal(signal.SIGTERM, _interrupt)
    sys.path.insert(0, str(REPO_ROOT))
    from tests import peers

    storescu = peers.require_tool("storescu")
    work = Path(tempfile.mkdtemp(prefix="ichnode-bench-ingest-", dir=args.tmpdir))
    summaries: dict[tuple[str, int], Summary] = {}
    try:
        parts = math.lcm(*assoc_counts)  # every association count splits the folders evenly
        log(f"generating {args.count} CT slices (512x512 int16) in {work} ...")
        t0 = time.perf_counter()
        dirs = generate_series(work / "data", args.count, parts)
        log(f"  {time.perf_counter() - t0:.1f} s, {sum(p.stat().st_size for d in dirs for p in d.iterdir()) / 2**20:.0f} MiB")
        for assoc in assoc_counts:
            for receiver in receivers:
                summary = summaries.setdefault((receiver, assoc), Summary(receiver, assoc, args.count))
                for _ in range(args.repeat):
                    run = run_one(receiver, assoc, dirs, args.count, work, args, storescu)
                    summary.runs.append(run)
                    shown = f"{run.rate:.1f} slices/s" if run.rate else run.error
                    log(f"  {receiver:<9} {assoc} assoc: {shown}")
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    # Keep the receivers together, association counts in order.
    ordered = dict(sorted(summaries.items(), key=lambda item: (item[0][1], RECEIVERS.index(item[0][0]))))
    if args.json:
        payload = {
            "benchmark": "ingest",
            "baseline": list(BASELINES),
            "count": args.count,
            "notes": notes,
            "results": [
                {"receiver": s.receiver, "associations": s.associations, "slices_per_s": s.rate, "runs": [asdict(r) for r in s.runs]}
                for s in ordered.values()
            ],
            "ratios": {str(a): {f"ichnode/{b}": round(v, 3) for b, v in r.items()} for a, r in ratios(ordered).items()},
        }
        print(json.dumps(payload, indent=2))
    else:
        print_table(ordered, notes)
    failed = [s for s in ordered.values() if s.rate is None and not (s.error or "").startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    _ensure_interpreter()
    sys.exit(main())
