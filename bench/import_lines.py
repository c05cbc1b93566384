"""Project lines each core module loads when imported, and whether an optional library comes along.

    python bench/import_lines.py            # train, predict, evaluate, export, data, unet

Each import runs in a fresh interpreter; the figure is the sum of `wc -l` over every module of this
repository in sys.modules afterwards (the imported module, what it imports at the top, nothing
imported later inside a function). Issue 31's targets: train <= 1,300, predict <= 1,100,
evaluate <= 1,600, export <= 2,100, with none of the optional libraries below.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = ("gradio", "matplotlib", "h5py", "tensorflow_model_optimization", "tf_keras",
            "tensorboard", "onnx", "onnxruntime", "tf2onnx")
PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
before = set(sys.modules)
import {module}
own = sorted({{m.__file__ for m in list(sys.modules.values())
               if getattr(m, "__file__", None) and m.__file__.startswith({root!r} + os.sep)}})
print(json.dumps({{"files": [os.path.relpath(f, {root!r}) for f in own],
                  "optional": [o for o in {optional!r} if o in sys.modules and o not in before],
                  "keras": "keras" in sys.modules}}))
"""


def probe(module):
    code = PROBE.format(root=ROOT, module=module, optional=OPTIONAL)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if result.returncode:
        sys.exit(f"import {module} failed: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    modules = sys.argv[1:] or ["train", "predict", "evaluate", "export", "data", "unet"]
    keras_own = set(probe("keras")["optional"])  # what `import keras` itself brings
    for module in modules:
        found = probe(module)
        if found["keras"]:
            found["optional"] = [o for o in found["optional"] if o not in keras_own]
        # The project's own .py files: not a virtual environment or cache inside the checkout.
        own = [f for f in found["files"] if f.endswith(".py") and not f.startswith(".")]
        lines = {f: sum(1 for _ in open(os.path.join(ROOT, f))) for f in own}
        optional = ", ".join(found["optional"]) or "none"
        print(f"import {module:<9} {sum(lines.values()):>5} lines  "
              f"({' + '.join(f'{f} {n}' for f, n in lines.items())}); optional libraries "
              f"beyond import keras's own: {optional}")


if __name__ == "__main__":
    main()
