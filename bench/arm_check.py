"""Do exported .tflite files give the same masks on a 64-bit ARM CPU? Run them here and on emulated
ARM CPUs (QEMU user mode) on the same images, and print how far each run is from this machine's.

    bash bench/arm_setup.sh                   # once: ~20 s, ~190 MB in .arm/
    python bench/arm_check.py export/         # every .tflite in the folder, or name files
    python bench/arm_check.py export/model_int8.tflite --data data/isic --images 8 --cpus cortex-a53,max

The reference is this machine at 1 thread. Each row is one file on one CPU at one thread count:
whether its raw output tensor is bit-identical, the largest probability difference, and how many
mask pixels (probability > 0.5) differ. Exit 1 when an integer file's masks differ by more than
--int8-pixels pixels or a float file's probabilities by more than --float-atol; exit 2 for bad input.

What a pass shows: LiteRT's CPU path (XNNPACK), with the kernels it picks for each emulated CPU's
features (NEON, dot product, i8mm, SVE2), computes the same masks from the same file as here. What it
does not show: speed on a phone (emulation is ~100x slower and says nothing about latency), the
GPU / NNAPI / Core ML delegates, other LiteRT versions, or a phone's camera and resize path.
"""
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import arm_guest  # noqa: E402  (beside this file; the code that runs on both sides)
from machine import cpu_line  # noqa: E402  (the CPU every benchmark names)

import common  # noqa: E402
import data  # noqa: E402
import layouts  # noqa: E402
from extras import synthetic  # noqa: E402

# QEMU CPU models, each standing for a family of XNNPACK kernels a phone may get.
CPUS = {
    "cortex-a53": "Armv8.0 NEON only (older and budget phones)",
    "cortex-a55": "NEON dot product; XNNPACK has kernels tuned for this core (phones' little cores)",
    "cortex-a76": "NEON dot product, generic big-core kernels",
    "cortex-a710": "SVE2 and i8mm (int8 matrix multiply): recent flagship phones",
    "max": "every feature QEMU emulates, SME included",
}
DEFAULT_CPUS = ("cortex-a53", "cortex-a55", "cortex-a76", "cortex-a710")
FLOAT_ATOL = 1e-5   # float32 files: kernels with other summation orders and FMA use
THRESHOLD = 0.5
# Instruction families that tell XNNPACK's kernel choices apart, by mnemonic (or, for SVE / SME, by
# their z / za registers), as QEMU disassembles the guest code it translates.
FAMILIES = {
    "smlal": ("smlal", "smlal2"),          # plain NEON int8: widening multiply-accumulate
    "sdot": ("sdot", "udot"),               # dot product (Armv8.2 DotProd)
    "smmla": ("smmla", "ummla", "usmmla"),  # int8 matrix multiply (Armv8.6 i8mm)
    "sve": (),                              # any instruction on z registers (SVE, SVE2, streaming SVE)
    "sme": ("smstart", "fmopa", "smopa"),   # SME outer products
}
SVE_REGISTER = re.compile(r"\bz(?:a|\d)")  # z0..z31, za (SME's array)
SHOWN_FEATURES = ("asimd", "asimddp", "i8mm", "sve", "sve2", "sme")
GUEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arm_guest.py")


def arm_dir():
    return os.environ.get("SKIN_UNET_ARM") or os.path.join(ROOT, ".arm")


def emulator(root=None):
    """(qemu binary, sysroot, site folder) of a finished bench/arm_setup.sh, else a one-line Error."""
    root = root or arm_dir()
    if not os.path.isfile(os.path.join(root, "stamp")):
        raise common.Error(root, "no ARM emulator set up (run: bash bench/arm_setup.sh)")
    return os.path.join(root, "qemu-aarch64"), os.path.join(root, "sysroot"), os.path.join(root, "site")


def run_emulated(cpu, paths, images, threads, root=None, timeout=600):
    """Raw outputs {"<k>/<t>": array} and the guest's info dict, from arm_guest.py on CPU model `cpu`.

    info["instructions"] counts, per FAMILIES entry, the instructions of that family in all the code
    QEMU translated for the run (each translated once, so a count of code, not of executions): the
    evidence of which kernels XNNPACK picked for this CPU. Logging it costs ~20 MB and under 10%."""
    qemu, sysroot, site = emulator(root)
    with tempfile.TemporaryDirectory(prefix="arm_check-") as work:
        job, out, log = (os.path.join(work, name) for name in ("job.npz", "out.npz", "asm.log"))
        np.savez(job, images=images, job=json.dumps({"models": [os.path.abspath(p) for p in paths],
                                                    "threads": list(threads)}))
        # Only the guest sees PYTHONPATH; none of this process's Python settings leak into it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(PYTHONPATH=site, PYTHONNOUSERSITE="1")
        try:
            proc = subprocess.run([qemu, "-cpu", cpu, "-d", "in_asm", "-D", log, "-L", sysroot,
                                   os.path.join(sysroot, "usr/bin/python3.11"), GUEST, job, out],
                                  env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise common.Error(cpu, f"emulated run took over {timeout} s", exit_code=1) from None
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip()] or [f"exit code {proc.returncode}"]
            raise common.Error(cpu, f"emulated run failed ({common.one_line(lines[-1])})", exit_code=1)
        with np.load(out) as result:
            info = json.loads(str(result["info"]))
            outputs = {k: result[k] for k in result.files if k != "info"}
        return outputs, {**info, "instructions": instruction_families(log)}


def instruction_families(log):
    """{family: count} over a QEMU `-d in_asm` log (lines "0xADDR:  WORD  mnemonic  operands")."""
    by_mnemonic = {m: family for family, names in FAMILIES.items() for m in names}
    counts = dict.fromkeys(FAMILIES, 0)
    with open(log, errors="replace") as f:
        for line in f:
            parts = line.split(None, 3)
            if len(parts) < 3 or not parts[0].startswith("0x"):
                continue
            family = by_mnemonic.get(parts[2])
            if family is None and len(parts) == 4 and SVE_REGISTER.search(parts[3]):
                family = "sve"
            if family:
                counts[family] += 1
    return counts


def probabilities(path, raw):
    """A file's raw output as probabilities (integer outputs carry their own scale and zero point)."""
    from ai_edge_litert.interpreter import Interpreter

    detail = Interpreter(model_path=path).get_output_details()[0]
    scale, zero = detail["quantization"]
    if np.issubdtype(raw.dtype, np.integer) and scale:
        return (raw.astype(np.float32) - zero) * np.float32(scale)
    return raw.astype(np.float32)


def compare(path, reference, raw):
    """How far `raw` is from `reference` (both raw outputs of the file at `path`)."""
    p_ref, p = probabilities(path, reference), probabilities(path, raw)
    return {"identical": bool(np.array_equal(reference, raw)),
            "max_abs_diff": float(np.abs(p - p_ref).max()),
            "mask_pixels_differing": int(np.count_nonzero((p > THRESHOLD) != (p_ref > THRESHOLD))),
            "mask_pixels": int(p.size)}


def check(paths, images, cpus=DEFAULT_CPUS, threads=(1, 2), root=None, progress=None):
    """(rows, facts): the agreement table, every file on this machine and on each emulated CPU at each
    thread count against this machine at 1 thread; facts about the reference and each CPU's kernels."""
    progress = progress or (lambda message: None)
    reference_threads = sorted(set(threads) | {1})
    native, seconds = arm_guest.run(paths, images, reference_threads)
    host = f"{platform.machine()} (this machine)"
    runs = [(host, native, {"seconds": seconds}, [t for t in reference_threads if t != 1])]
    cpu_facts = {}
    for cpu in cpus:
        progress(f"arm_check: {cpu} ...")
        outputs, info = run_emulated(cpu, paths, images, threads, root)
        if info["machine"] != "aarch64":
            raise common.Error(cpu, f"the emulated run reports machine {info['machine']!r}, not aarch64", exit_code=1)
        runs.append((cpu, outputs, info, threads))
        cpu_facts[cpu] = {k: info[k] for k in ("features", "part", "instructions")}
    rows = []
    for k, path in enumerate(paths):
        reference = native[f"{k}/1"]
        for name, outputs, info, counts in runs:
            for t in counts:
                rows.append({"file": os.path.basename(path), "path": os.path.abspath(path), "cpu": name,
                             "threads": t, "seconds": round(info["seconds"][f"{k}/{t}"], 3),
                             "integer": bool(np.issubdtype(reference.dtype, np.integer)),
                             **compare(path, reference, outputs[f"{k}/{t}"])})
    lesion = {os.path.basename(p): float(np.mean(probabilities(p, native[f"{k}/1"]) > THRESHOLD))
              for k, p in enumerate(paths)}
    return rows, {"machine": platform.machine(), "cpu": cpu_line(), "lesion_fraction": lesion,
                  "images": int(len(images)), "size": int(images.shape[1]), "cpus": cpu_facts}


def failures(rows, float_atol=FLOAT_ATOL, int8_pixels=0):
    """(where, problem) for each row outside the tolerances (empty: the files agree)."""
    bad = []
    for r in rows:
        where = f"{r['file']} on {r['cpu']} at {r['threads']} thread(s)"
        if r["integer"] and r["mask_pixels_differing"] > int8_pixels:
            bad.append((where, f"{r['mask_pixels_differing']} mask pixels differ (allowed {int8_pixels})"))
        if not r["integer"] and r["max_abs_diff"] > float_atol:
            bad.append((where, f"probabilities differ by {r['max_abs_diff']:.2g} (allowed {float_atol:g})"))
    return bad


def check_images(size, data_dir=None, count=4):
    """uint8 (N, S, S, 3): `count` evenly spaced validation images of a data folder, or with no folder,
    the built-in synthetic dermoscopy images (not those training draws: another seed) and one image
    of uniform noise, which drives every activation through its whole range."""
    if data_dir:
        pairs, _, _ = layouts.find_pairs(data_dir)
        if not pairs:
            raise common.Error(data_dir, "no images found")
        split = next(s for s in ("val", "test", "train") if any(p.split == s for p in pairs))
        pairs = [p for p in pairs if p.split == split]
        pick = np.unique(np.linspace(0, len(pairs) - 1, min(count, len(pairs))).round().astype(int))
        return data.load_arrays([pairs[i] for i in pick], size, progress=False).images
    images, _ = synthetic.make_synthetic(max(count - 1, 1), seed=23, size_wh=(size, size))
    noise = np.random.default_rng(23).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    return np.concatenate([images, noise])


def model_files(args):
    paths = []
    for arg in args:
        if os.path.isdir(arg):
            found = sorted(os.path.join(arg, n) for n in os.listdir(arg) if n.endswith(".tflite"))
            if not found:
                raise common.Error(arg, "no .tflite files in this folder")
            paths += found
        elif not os.path.isfile(arg):
            raise common.Error(arg, "file not found")
        elif not arg.endswith(".tflite"):
            raise common.Error(arg, "expected a .tflite file (export.py's output)")
        else:
            paths.append(arg)
    return paths


def input_size(paths):
    """The one square input size of all files (the check feeds them the same images)."""
    from ai_edge_litert.interpreter import Interpreter

    sizes = {}
    for path in paths:
        try:
            shape = tuple(Interpreter(model_path=path).get_input_details()[0]["shape"])
        except Exception as e:
            raise common.Error(path, f"cannot load TFLite model ({common.one_line(e)})") from None
        if len(shape) != 4 or shape[0] != 1 or shape[1] != shape[2] or shape[3] != 3:
            raise common.Error(path, f"input shape {shape} is not export.py's (1, S, S, 3)")
        sizes[path] = shape[1]
    if len(set(sizes.values())) > 1:
        raise common.Error(", ".join(paths), f"input sizes differ ({sorted(set(sizes.values()))}); check them one at a time")
    return next(iter(sizes.values()))


def print_table(rows, facts, file=sys.stdout):
    print(f"reference: {facts['machine']}, {facts['cpu']}, 1 thread; {facts['images']} images "
          f"at {facts['size']} px; lesion pixels in its masks: " +
          ", ".join(f"{n} {100 * v:.1f}%" for n, v in facts["lesion_fraction"].items()), file=file)
    print(f"{'file':<24}{'cpu':<24}{'thr':>4}{'same bits':>11}{'max |dp|':>11}{'mask px differing':>20}"
          f"{'run s':>8}", file=file)
    for r in rows:
        print(f"{r['file']:<24}{r['cpu']:<24}{r['threads']:>4}{'yes' if r['identical'] else 'no':>11}"
              f"{r['max_abs_diff']:>11.2g}{r['mask_pixels_differing']:>11} / {r['mask_pixels']:<6}"
              f"{r['seconds']:>8.2f}", file=file)
    print(f"\n{'cpu':<14}{'features (of those XNNPACK looks for)':<40}instructions in the translated code", file=file)
    for cpu, f in facts["cpus"].items():
        features = " ".join(x for x in SHOWN_FEATURES if x in f["features"])
        print(f"{cpu:<14}{features:<40}" + "  ".join(f"{k} {v}" for k, v in f["instructions"].items()), file=file)


def main(argv=None):
    return cli(argv)


@common.command
def cli(argv):
    parser = common.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help=".tflite files or export folders")
    parser.add_argument("--data", help="data folder: check on its validation images (default: synthetic + noise)")
    parser.add_argument("--images", type=int, default=4, help="images to run (emulation is ~100x slower)")
    parser.add_argument("--cpus", default=",".join(DEFAULT_CPUS), help=f"QEMU CPU models: {', '.join(CPUS)}")
    parser.add_argument("--threads", default="1,2", help="LiteRT thread counts")
    parser.add_argument("--float-atol", type=float, default=FLOAT_ATOL, help="float files: allowed probability difference")
    parser.add_argument("--int8-pixels", type=int, default=0, help="integer files: allowed differing mask pixels")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    cpus = tuple(c.strip() for c in args.cpus.split(",") if c.strip())
    unknown = [c for c in cpus if c not in CPUS]
    if unknown or not cpus:
        raise common.Error(f"--cpus {args.cpus}", f"unknown CPU model (choose from {', '.join(CPUS)})")
    try:
        threads = tuple(int(t) for t in args.threads.split(","))
    except ValueError:
        raise common.Error(f"--threads {args.threads}", "expected a comma list of integers") from None
    if min(threads) < 1:
        raise common.Error(f"--threads {args.threads}", "thread counts start at 1")
    if args.images < 1:
        raise common.Error(f"--images {args.images}", "at least 1")
    emulator()  # before any work: a missing setup is one line
    paths = model_files(args.models)
    images = check_images(input_size(paths), args.data, args.images)
    rows, facts = check(paths, images, cpus, threads,
                        progress=lambda message: print(message, file=sys.stderr, flush=True))
    print_table(rows, facts)
    if args.json:
        with common.atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump({"reference": facts, "rows": rows}, f, indent=2)
    bad = failures(rows, args.float_atol, args.int8_pixels)
    if bad:
        where, problem = bad[0]
        raise common.Error(where, problem + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""), exit_code=1)
    print(f"agree: {len(paths)} file(s) on {len(cpus)} emulated CPU(s) at {len(threads)} thread count(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
