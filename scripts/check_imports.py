"""Import every dependency patternlake uses and print their versions (end of `make setup`)."""

import importlib
import sys

MODULES = [
    "torch", "pyspark", "deltalake", "delta", "great_expectations", "mlflow", "optuna", "onnx",
    "onnxruntime", "captum", "pyarrow", "pandas", "numpy", "pydantic", "yaml", "tqdm",
    "horovod.torch", "horovod.spark", "faiss", "patternlake",
]

failed = []
for name in MODULES:
    try:
        mod = importlib.import_module(name)
        top = importlib.import_module(name.split(".")[0])
        print(f"{name:20s} {getattr(mod, '__version__', None) or getattr(top, '__version__', '')}")
    except Exception as exc:  # report all, then fail
        failed.append(f"{name}: {exc}")
if failed:
    print("import check failed:\n  " + "\n  ".join(failed), file=sys.stderr)
    sys.exit(1)
import horovod.torch as hvd  # noqa: E402

if not hvd.gloo_built():
    sys.exit("horovod was built without Gloo")
print("all imports ok")
