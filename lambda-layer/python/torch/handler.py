"""A PyTorch inference function on a pooled GPU (Lambda, Python 3.12).

INIT (once per execution environment): imports torch, builds the model of
`model.py` (weights from `MODEL_WEIGHTS`, default `model.pt` next to this
file, written into the image at build time; from the seed when the file is
absent), moves it to the device and runs one warm-up batch, so the first
invocation pays no CUDA context, module load or cuBLAS setup.

Each invocation: the event is `{"tokens": [[id, ...], ...]}`, 1 to
MAX_BATCH rows of the same length, 1 to model.MAX_LEN ids each, every id in
0..model.VOCAB. The answer: `{"logits", "classes", "checksum", "device",
"kernels", "cold", "timing": {"init_ms", "invoke_ms"}, "init"}`. A bad event
raises ValueError with what is wrong (Lambda answers it as an error).

The device is `TORCH_DEVICE` (default `cuda`; `cpu` checks the handler, or
computes a reference, without a GPU). With gpupool's `libcuda.so.1` ahead
on the library path and a lease in `GPUPOOL_LEASE_FILE` (the layer's
extension leases during INIT), `cuda` is a GPU of the pool: PyTorch's own
CUDA runtime and libraries run here, their kernels run on the gpu-server.
Unlike the Rust example, CUDA lives in this process: an environment frozen
longer than the server's grace period gets CUDA errors afterwards and
should be replaced (the handler raises; Lambda starts a new environment).
"""
import os
import time

_t0 = time.perf_counter()
import torch  # noqa: E402  (timed: importing torch is part of a cold start)

import model  # noqa: E402

MAX_BATCH = 64
DEVICE = os.environ.get("TORCH_DEVICE", "cuda")
WEIGHTS = os.environ.get("MODEL_WEIGHTS", os.path.join(os.path.dirname(__file__), "model.pt"))


def _ms(since):
    return round((time.perf_counter() - since) * 1e3, 3)


def parse_tokens(event):
    """The event's token batch as a list of equal-length lists of ids."""
    if not isinstance(event, dict) or "tokens" not in event:
        raise ValueError('the event must be a JSON object {"tokens": [[id, ...], ...]}')
    rows = event["tokens"]
    if not isinstance(rows, list) or not 1 <= len(rows) <= MAX_BATCH:
        raise ValueError(f"tokens must be a list of 1 to {MAX_BATCH} rows")
    length = len(rows[0]) if isinstance(rows[0], list) else 0
    if not 1 <= length <= model.MAX_LEN:
        raise ValueError(f"each row must be a list of 1 to {model.MAX_LEN} token ids")
    for r, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != length:
            raise ValueError(f"row {r} is not a list of {length} ids (all rows must have the same length)")
        for i, t in enumerate(row):
            # bool is an int in Python; JSON true is not a token id.
            if type(t) is not int or not 0 <= t < model.VOCAB:
                raise ValueError(f"tokens[{r}][{i}] = {t!r}: ids are integers in 0..{model.VOCAB - 1}")
    return rows


def _forward(tokens):
    with torch.inference_mode():
        logits = MODEL(tokens.to(DEVICE)).float().cpu()
    return logits


# INIT.
_import_ms = _ms(_t0)
_t = time.perf_counter()
MODEL = model.build(WEIGHTS if os.path.exists(WEIGHTS) else None).to(DEVICE)
_model_ms = _ms(_t)
_t = time.perf_counter()
_forward(torch.zeros(1, 8, dtype=torch.long))  # warm-up: context, modules, cuBLAS
_warmup_ms = _ms(_t)
INIT = {
    "import_ms": _import_ms,
    "model_ms": _model_ms,
    "warmup_ms": _warmup_ms,
    "weights": "file" if os.path.exists(WEIGHTS) else "seed",
    "torch": torch.__version__,
}
INIT_MS = _ms(_t0)
DEVICE_NAME = torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else "cpu"
_invocations = 0


def handler(event, context):
    global _invocations
    t0 = time.perf_counter()
    _invocations += 1
    tokens = torch.tensor(parse_tokens(event), dtype=torch.long)
    logits = _forward(tokens)
    return {
        "logits": [[round(x, 6) for x in row] for row in logits.tolist()],
        "classes": logits.argmax(dim=1).tolist(),
        "checksum": round(float(logits.double().sum()), 6),
        "device": DEVICE_NAME,
        "kernels": "pytorch",
        "cold": _invocations == 1,
        "timing": {"init_ms": INIT_MS, "invoke_ms": _ms(t0)},
        "init": INIT,
    }
