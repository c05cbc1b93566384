"""What each command loads while it runs: the project's files, and their code lines.

    python bench/loaded_lines.py                 # train, predict, evaluate (real data if present)
    python bench/loaded_lines.py --data DIR      # another data folder with masks

Each command runs whole, in a fresh interpreter, as a user runs it (`python train.py ...`); when
it ends, every module of this repository that was imported while it ran (at the top of a file or
inside a function) is counted. Code lines: lines that hold code, so blank lines, comment-only lines
and docstrings are free. Issue 39's targets: train <= 1,400 code lines in <= 9 files and no
predict.py; predict <= 650 in <= 6; evaluate <= 1,050 in <= 8. The data: ../shared/data/isic2018
when it exists (the figures in docs/benchmarks.md), else the built-in synthetic set.
"""
import argparse
import ast
import io
import json
import os
import subprocess
import sys
import tempfile
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data", "isic2018")
TARGETS = {"train": (1400, 9), "predict": (650, 6), "evaluate": (1050, 8)}

# Runs the command as __main__ and, at exit (sys.exit included), lists the repository's modules.
WRAPPER = """
import atexit, json, os, runpy, sys
root, script, out = sys.argv[1], sys.argv[2], sys.argv[3]
sys.argv = sys.argv[3 + 1:]
sys.path.insert(0, root)
def dump():
    files = sorted({os.path.relpath(m.__file__, root) for m in list(sys.modules.values())
                    if getattr(m, "__file__", None) and m.__file__.startswith(root + os.sep)})
    with open(out, "w") as f:
        json.dump(files, f)
atexit.register(dump)
runpy.run_path(os.path.join(root, script), run_name="__main__")
"""


def code_lines(path):
    """Lines of `path` that hold code: not blank, not only a comment, not inside a docstring."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    docstring_lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                docstring_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    code = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                          tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        code.update(range(token.start[0], token.end[0] + 1))
    return len(code - docstring_lines)


def run(script, args, cwd):
    """The repository files `python script args` loaded, after it ran (its exit code too)."""
    out = os.path.join(cwd, "loaded.json")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, ROOT, script, out, script, *args],
                          cwd=cwd, env=env, capture_output=True, text=True)
    if not os.path.exists(out):
        sys.exit(f"{script} {' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    with open(out) as f:
        files = [p for p in json.load(f) if p.endswith(".py") and not p.startswith(".")]
    return files, proc.returncode


def commands(data, work):
    """The three default paths, as issue 39 measures them."""
    photos = os.path.join(work, "photos")
    os.makedirs(photos)
    images = sorted(os.path.join(data, d, f) for d in os.listdir(data) if "Input" in d
                    or d.endswith("_Data") or d == "images" for f in os.listdir(os.path.join(data, d)))
    for path in [p for p in images if p.lower().endswith((".jpg", ".png"))][:40]:
        os.symlink(path, os.path.join(photos, os.path.basename(path)))
    released = os.path.join(ROOT, "models", "skin_unet.keras")
    return {
        "train": ("train.py", ["--data", data, "--size", "64", "--epochs", "1",
                               "--out", os.path.join(work, "run")]),
        "predict": ("predict.py", ["--data", photos, "--out", os.path.join(work, "masks")]),
        "evaluate": ("evaluate.py", ["--weights", released, "--data", data,
                                     "--out", os.path.join(work, "eval")]),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="a data folder with masks (default: ../shared/data/isic2018, "
                   "else the built-in synthetic set)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("only", nargs="*", help=f"some of {', '.join(TARGETS)} (default: all)")
    args = p.parse_args()
    unknown = [name for name in args.only if name not in TARGETS]
    if unknown:
        p.error(f"unknown command {unknown[0]} (choose from {', '.join(TARGETS)})")
    with tempfile.TemporaryDirectory() as work:
        data = args.data or (SHARED if os.path.isdir(SHARED) else None)
        if data is None:
            sys.path.insert(0, ROOT)
            from layouts import data_folders
            data = data_folders(None)[0]
        result = {}
        for name, (script, argv) in commands(data, work).items():
            if args.only and name not in args.only:
                continue
            files, code = run(script, argv, work)
            lines = {f: code_lines(os.path.join(ROOT, f)) for f in files}
            lines = {f: n for f, n in lines.items() if n}  # an empty package __init__ is no read
            result[name] = {"exit": code, "files": lines, "code_lines": sum(lines.values())}
            if not args.json:
                most, count = TARGETS[name]
                print(f"{name:<9} {sum(lines.values()):>5} code lines in {len(files)} files "
                      f"(target <= {most} in <= {count}; exit {code}): "
                      + ", ".join(f"{f} {n}" for f, n in lines.items()), flush=True)
    if args.json:
        print(json.dumps({"data": data, **result}, indent=1))


if __name__ == "__main__":
    main()
