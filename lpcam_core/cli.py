"""The ``lpcam`` command line: ``info``, ``eval``, ``demo``; host adapters add their own subcommands.

Hosts are found through the ``lpcam.hosts`` entry-point group: each entry names a callable that adds
a sub-command group to the parser (``register(subparsers)``), built without importing torch. The core
names no adapter.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Sequence

from .version import __version__

__all__ = ["main", "build_parser"]

#: Entry-point group of the host command groups (``lpcam <host> ...``).
HOSTS_GROUP = "lpcam.hosts"

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def _cmd_info(args: argparse.Namespace) -> int:
    from .bank import PrototypeBank
    from .config import short_repr

    bank = PrototypeBank.load(args.bank)
    meta = bank.meta
    print(f"{args.bank}: {bank!r}")
    print(f"  library version {bank.library_version or '?'}, classifier fingerprint "
          f"{short_repr(meta.get('classifier_fingerprint'), 40)}")
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if cfg:
        print(
            "  K={num_clusters} tau={fg_threshold} mu_f={class_threshold} context=({context_low}, {context_high}) "
            "seed={seed}".format(**{k: short_repr(cfg.get(k, "?"), 40) for k in
                                   ("num_clusters", "fg_threshold", "class_threshold", "context_low", "context_high", "seed")})
        )
    print(f"  images seen: {short_repr(meta.get('images_seen', '?'), 40)}")
    print()
    print("| class | name | class prototypes | context prototypes | class features seen | context features seen |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in bank.summary():
        print(
            f"| {row['class']} | {row['name']} | {row['class_prototypes']} | {row['context_prototypes']} | "
            f"{row['class_features_seen']} | {row['context_features_seen']} |"
        )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval import metrics
    from .io import read_id_list

    if not 2 <= args.num_classes <= 1000:  # the confusion matrices grow with its square
        raise ValueError(f"--num-classes {args.num_classes}: expected 2..1000 (classes including background)")
    ids = read_id_list(args.list)
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if repeated:
        raise ValueError(f"{args.list}: image {repeated[0]!r} is listed more than once ({len(repeated)} repeated ids); "
                         "each image counts once in the mIoU")
    names = list(VOC_CLASSES) if args.num_classes == 21 else [str(i) for i in range(args.num_classes)]
    if args.sweep:
        start, stop, step = args.sweep_start, args.sweep_stop, args.sweep_step
        if not (0 <= start <= stop <= 1 and step > 0):
            raise ValueError(f"--sweep-start {start} --sweep-stop {stop} --sweep-step {step}: expected "
                             "0 <= start <= stop <= 1 and step > 0")
        count = int(round((stop - start) / step)) + 1
        if count > 1000:
            raise ValueError(f"--sweep-step {step}: {count} thresholds; at most 1000 (a larger step)")
        thresholds = [round(start + i * step, 6) for i in range(count)]
        best, curve = metrics.sweep_thresholds(args.cams, args.gt, ids, thresholds, num_classes=args.num_classes,
                                               background=args.background)
        print("| threshold | mIoU (%) |")
        print("|---:|---:|")
        for threshold, miou in curve:
            mark = " (best)" if threshold == best else ""
            print(f"| {threshold:.2f}{mark} | {100 * miou:.2f} |")
        scores = dict(curve)
        inner = {thresholds[0]: thresholds[1], thresholds[-1]: thresholds[-2]} if len(thresholds) > 1 else {}
        if best in inner and scores[best] > scores[inner[best]]:  # still rising at the edge of the sweep
            end, flag = ("end", "--sweep-stop") if best == thresholds[-1] else ("start", "--sweep-start")
            print(f"\nthe best threshold {best} is the sweep's {end}: the best may lie beyond it (widen {flag})")
        threshold = best
    else:
        threshold = args.threshold
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"--threshold {threshold}: expected a CAM value in [0, 1] (the maps are max-normalised)")
    result = metrics.evaluate_seeds(args.cams, args.gt, ids, threshold, num_classes=args.num_classes,
                                    background=args.background)
    print(f"\nthreshold {threshold}: mIoU {100 * result['miou']:.2f}  precision {100 * result['mean_precision']:.2f}  "
          f"recall {100 * result['mean_recall']:.2f}  ({len(ids)} images)")
    print("| class | IoU (%) |")
    print("|---|---:|")
    for name, iou in zip(names, result["iou"]):
        print(f"| {name} | {100 * iou:.2f} |")
    return 0


def host_entry_points() -> dict:
    """The installed hosts' entry points (group ``lpcam.hosts``), by name."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in sorted(entry_points(group=HOSTS_GROUP), key=lambda ep: ep.name)}


def benchmark_names() -> list[str]:
    """The benchmarks shipped with lpcam (``lpcam_benchmarks``; the repository's ``benchmarks/``)."""
    import pkgutil

    try:
        import lpcam_benchmarks
    except ImportError:  # pragma: no cover - installed without them
        return []
    return sorted(m.name for m in pkgutil.iter_modules(lpcam_benchmarks.__path__) if not m.name.startswith("_"))


def _cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    saved = sys.argv
    sys.argv = [f"lpcam bench {args.name}", *rest]
    try:
        runpy.run_module(f"lpcam_benchmarks.{args.name}", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    finally:
        sys.argv = saved
    return 0


def _command_of(argv: Sequence[str]) -> str | None:
    """The sub-command named in ``argv`` (the first token that is not an option)."""
    for token in argv:
        if not token.startswith("-"):
            return token
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; of the host groups, only the one ``argv`` names is loaded (the others are listed by name),
    so one host's import-time work never happens for another's command."""
    parser = argparse.ArgumentParser(
        prog="lpcam",
        description="LPCAM: class activation maps from local prototypes (CVPR 2023) for WSSS hosts.",
    )
    parser.add_argument("--version", action="version", version=f"lpcam {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = sub.add_parser("bench", help="run a shipped benchmark: lpcam bench NAME [its arguments] (--help each)",
                           description="Runs one of the benchmarks shipped with lpcam (the repository's benchmarks/) "
                                       "with the arguments that follow; `lpcam bench NAME --help` shows them.")
    bench.add_argument("name", choices=benchmark_names(), help="the benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    bench.set_defaults(func=_cmd_bench)

    info = sub.add_parser("info", help="what a prototype bank holds, per class",
                          description="Print a prototype bank's settings and its per-class prototype counts.")
    info.add_argument("bank", help="bank file written by PrototypeBuilder / `lpcam <host> prototypes`")
    info.set_defaults(func=_cmd_info)

    ev = sub.add_parser(
        "eval", help="seed mIoU of an IRN-format CAM directory",
        description="Seed mIoU (and precision/recall) of <cams>/<id>.npy files {keys, high_res} against "
                    "VOC-style palette PNGs <gt>/<id>.png, at one background threshold or a sweep.",
    )
    ev.add_argument("--cams", required=True, help="directory of <id>.npy CAM files (IRN format)")
    ev.add_argument("--gt", required=True, help="directory of <id>.png ground-truth palette PNGs (255 = ignore)")
    ev.add_argument("--list", required=True, help="image id list (e.g. voc12/train.txt)")
    group = ev.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, default=0.3, help="background threshold (default 0.3, the paper's)")
    group.add_argument("--sweep", action="store_true", help="sweep the threshold and report the best")
    ev.add_argument("--sweep-start", type=float, default=0.05, help="first threshold of --sweep (default 0.05)")
    ev.add_argument("--sweep-stop", type=float, default=0.6, help="last threshold of --sweep (default 0.6)")
    ev.add_argument("--sweep-step", type=float, default=0.05, help="step of --sweep (default 0.05)")
    ev.add_argument("--num-classes", type=int, default=21, help="classes including background (VOC: 21)")
    ev.add_argument("--background", choices=("plane", "channel0"), default="plane",
                    help="'plane': constant background at the threshold (IRN); 'channel0': AMN files")
    ev.set_defaults(func=_cmd_eval)

    try:
        from .demo import add_demo_arguments, main_from_args
    except ImportError:  # pragma: no cover - the demo module ships with the package
        pass
    else:
        demo = sub.add_parser("demo", help="CAM vs LPCAM on a synthetic part-based benchmark (CPU, minutes)",
                              description="Generate a synthetic VOC-layout dataset, train a small CNN from image "
                                          "labels, and compare CAM and LPCAM seeds; writes a report.")
        add_demo_arguments(demo)
        demo.set_defaults(func=main_from_args)

    selected = _command_of(sys.argv[1:] if argv is None else argv)
    for name, ep in host_entry_points().items():  # each host adapter adds its subcommand group
        if name == selected:
            ep.load()(sub)
        else:
            sub.add_parser(name, help=f"LPCAM for the {name} host (`lpcam {name} --help`)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)
    except (ValueError, TypeError, OSError) as err:  # a host's settings, checked as it loads
        sys.stderr.write(f"lpcam: error: {describe_error(err)}\n")
        return 2
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        hint = ""
        if "rest" in vars(args):  # a step that runs the host's own script: its arguments go after `--`
            hint = " (the host script's own arguments go after `--`: lpcam <host> <step> [lpcam flags] -- <script arguments>)"
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as err:  # OSError: missing, unreadable or read-only paths, full disk
        if args.verbose >= 2:
            raise
        parser.exit(2, f"lpcam {args.command}: error: {describe_error(err)}\n")
    except SystemExit:
        raise
    except KeyboardInterrupt:  # complete files stay; the next run resumes from them
        if args.verbose >= 2:
            raise
        parser.exit(130, f"lpcam {args.command}: interrupted; finished files are kept and a rerun resumes\n")
    except BaseException as err:  # anything else (a worker's failure, memory, the host's own code): still one line
        if args.verbose >= 2:
            raise
        parser.exit(2, f"lpcam {args.command}: error: {type(err).__name__}: {describe_error(err)} "
                       "(run with -vv for the traceback)\n")
    return 0


def describe_error(err: BaseException) -> str:
    """One line for a failure: the message, or for an OS error what failed and on which path."""
    if isinstance(err, OSError) and err.strerror:  # raised by the OS: what failed, on which path
        where = f": {str(err.filename)[:500]}" if err.filename else ""
        return f"{err.strerror}{where}"
    text = str(err).strip()
    if "Traceback (most recent call last)" in text:  # a spawned worker's failure carries its traceback: its last line
        text = text.splitlines()[-1]
    return " ".join(text.split())[:2000]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
